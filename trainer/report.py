"""`train.html`: loss curve (inline SVG), sample grid per checkpoint, CLIP-I per checkpoint.

Data first (`report_data`), then a Jinja2 template with autoescape renders it. The
page is self-contained: no CDN, images referenced by relative path next to it.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment

from core.files import atomic_write_text

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Training report: {{ d.name }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
.grid img{width:128px;height:auto;image-rendering:pixelated;margin:2px}
.best{background:#e8f6e8}
svg{background:#fafafa;border:1px solid #ddd}
</style></head><body>
<h1>Training report: {{ d.name }}</h1>
<table>
{% for k, v in d.summary %}<tr><th>{{ k }}</th><td>{{ v }}</td></tr>
{% endfor %}</table>
{% if d.notes %}<h2>Notes</h2><ul>{% for n in d.notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}
<h2>Loss</h2>
<svg id="loss" width="{{ d.chart.w }}" height="{{ d.chart.h }}" viewBox="0 0 {{ d.chart.w }} {{ d.chart.h }}"
 role="img" aria-label="training loss per step">
<polyline fill="none" stroke="#bbb" stroke-width="1" points="{{ d.chart.raw }}"/>
<polyline fill="none" stroke="#c33" stroke-width="2" points="{{ d.chart.smooth }}"/>
<text x="4" y="14" font-size="12">max {{ '%.4f'|format(d.chart.ymax) }}</text>
<text x="4" y="{{ d.chart.h - 4 }}" font-size="12">min {{ '%.4f'|format(d.chart.ymin) }} · steps 1–{{ d.chart.n }}</text>
</svg>
<h2>Samples per checkpoint</h2>
{% if not d.steps %}<p>No samples (the spec has no <code>samples:</code> section).</p>{% endif %}
<table>
<tr><th>step</th><th>CLIP-I</th><th>samples</th></tr>
{% for s in d.steps %}<tr class="{{ 'best' if s.best else '' }}"><td>{{ s.step }}{% if s.best %} (selected){% endif %}</td>
<td>{{ '%.4f'|format(s.clip_i) if s.clip_i is not none else '—' }}</td>
<td class="grid">{% for img in s.images %}<img src="{{ img }}" alt="step {{ s.step }} sample {{ loop.index }}">{% endfor %}</td></tr>
{% endfor %}</table>
</body></html>
"""


def _polyline(values: list[float], w: int, h: int, ymin: float, ymax: float) -> str:
    if not values:
        return ""
    span = (ymax - ymin) or 1.0
    n = max(len(values) - 1, 1)
    return " ".join(f"{4 + (w - 8) * i / n:.1f},{h - 20 - (h - 40) * (v - ymin) / span:.1f}" for i, v in enumerate(values))


def report_data(trainer, result) -> dict:
    losses = result.losses
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    ymin, ymax = (min(losses), max(losses)) if losses else (0.0, 1.0)
    w, h = 720, 260
    spec = trainer.spec
    summary = [
        ("LoRA", str(result.lora_file or result.kohya_file or "—")),
        ("kind", spec.kind),
        ("base model", trainer.resolved.ref),
        ("steps", result.steps),
        ("rank / alpha", f"{spec.lora.rank} / {spec.lora.alpha}"),
        ("learning rate", spec.train.learning_rate),
        ("device / precision", f"{result.device} / {result.mixed_precision}"),
        ("dataset images", len({i.path for i in trainer.prep.items})),
        ("dataset digest", result.dataset_digest[:16]),
        ("spec hash", result.spec_hash[:16]),
        ("selected", f"step {result.best_step} (best CLIP-I)" if result.best_step is not None else "last step"),
        ("first/last 10-step mean loss",
         f"{sum(losses[:10]) / max(len(losses[:10]), 1):.4f} / {sum(losses[-10:]) / max(len(losses[-10:]), 1):.4f}"),
    ]
    steps = [{"step": s, "images": result.samples[s], "clip_i": result.clip_i.get(s), "best": s == result.best_step}
             for s in sorted(result.samples)]
    notes = list(result.notes)
    if spec.evaluation.references and not result.clip_i:
        notes.append("CLIP-I was not computed (no samples were rendered)")
    return {
        "name": spec.output.name, "summary": summary, "notes": notes, "steps": steps,
        "chart": {"w": w, "h": h, "n": len(losses), "ymin": ymin, "ymax": ymax,
                  "raw": _polyline(losses, w, h, ymin, ymax), "smooth": _polyline(smooth, w, h, ymin, ymax)},
    }


def write_report(trainer, result) -> Path:
    env = Environment(autoescape=True)
    html = env.from_string(TEMPLATE).render(d=report_data(trainer, result))
    trainer.paths.report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(trainer.paths.report, html)
    return trainer.paths.report
