"""Benchmark numbers of a run (from its ledger only) and trends across earlier runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reports.rundir import Run, load_run

# A metric more than this much worse than in the previous run is flagged as a regression.
REGRESSION_RATIO = 1.10
# (key, title, unit, higher_is_worse)
TREND_METRICS = (
    ("mean_s_per_image", "Seconds per image", "s", True),
    ("mean_s_per_step", "Seconds per step", "s", True),
    ("peak_memory_max_bytes", "Peak memory", "MiB", True),
    ("clip_i_mean", "Mean CLIP-I", "", False),
)


def job_rows(run: Run) -> list[dict]:
    rows = []
    for e in run.entries:
        led = e.ledger or {}
        seconds = led.get("seconds")
        steps = led.get("steps") or e.job.get("num_inference_steps")
        rendered = e.status == "rendered"
        rows.append({
            "key": e.key, "name": e.name, "preset": e.job.get("preset"), "status": e.status,
            "seconds": seconds, "steps": steps,
            "s_per_step": _r(seconds / steps) if rendered and seconds is not None and steps else None,
            "peak_memory_bytes": led.get("peak_memory_bytes"),
            "timings": {k: v for k, v in (led.get("timings") or {}).items() if isinstance(v, (int, float))},
            "lora_switched": bool(led.get("lora_switched")), "fallback": led.get("fallback"),
            "actor": led.get("actor"),
        })
    return rows


def _aggregate(rows: list[dict]) -> dict:
    rendered = [r for r in rows if r["status"] == "rendered" and r["seconds"] is not None]
    mems = [r["peak_memory_bytes"] for r in rows if r["peak_memory_bytes"]]
    return {
        "jobs": len(rows),
        "rendered": sum(r["status"] == "rendered" for r in rows),
        "cached": sum(r["status"] == "cached" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "missing": sum(r["status"] == "missing" for r in rows),
        "mean_s_per_image": _mean([r["seconds"] for r in rendered]),
        "mean_s_per_step": _mean([r["s_per_step"] for r in rendered if r["s_per_step"] is not None]),
        "render_seconds_total": _r(sum(r["seconds"] for r in rendered)) if rendered else 0.0,
        "peak_memory_max_bytes": max(mems) if mems else None,
        "lora_switches": sum(r["lora_switched"] for r in rows),
        "lora_load_s_total": _r(sum(r["timings"].get("lora_load_s", 0.0) for r in rows)),
        "model_load_s_total": _r(sum(r["timings"].get("model_load_s", 0.0) for r in rows)),
        "fallbacks": sum(1 for r in rows if r["fallback"]),
    }


def summarize(run: Run) -> dict:
    """Per job, per preset and whole-run numbers. Cached jobs count as cache hits, not timings."""
    rows = job_rows(run)
    presets: dict[str, list[dict]] = {}
    for r in rows:
        presets.setdefault(r["preset"] or "-", []).append(r)
    totals = _aggregate(rows)
    done = totals["rendered"] + totals["cached"]
    totals["cache_hit_rate"] = _r(totals["cached"] / done) if done else None
    startup = {k: v for k, v in (run.info.get("startup") or {}).items() if isinstance(v, (int, float))}
    return {"totals": totals, "startup": startup,
            "presets": {name: _aggregate(rs) for name, rs in sorted(presets.items())}, "jobs": rows}


def history(run: Run, previous: list[Path], clip_i_mean: float | None) -> list[dict]:
    """One point per earlier run (oldest first) plus the current run, last."""
    points = []
    for d in previous:
        try:
            prev = load_run(d)
        except Exception:  # an unreadable old run is left out of the trend, not fatal
            continue
        s = summarize(prev)
        points.append(_point(prev, s, _prev_clip_i(d)))
    points.append(_point(run, summarize(run), clip_i_mean))
    return points


def _prev_clip_i(run_dir: Path) -> float | None:
    try:
        data = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        return data["summary"]["clip_i_mean"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _point(run: Run, s: dict, clip_i_mean: float | None) -> dict:
    t = s["totals"]
    return {"run_id": run.run_id, "started": run.info.get("started"),
            "mean_s_per_image": t["mean_s_per_image"], "mean_s_per_step": t["mean_s_per_step"],
            "peak_memory_max_bytes": t["peak_memory_max_bytes"], "clip_i_mean": clip_i_mean,
            "presets": {k: v["mean_s_per_image"] for k, v in s["presets"].items()}}


def regressions(current: dict, previous: dict | None) -> list[dict]:
    """Compare this run's summary with the previous run's: whole run, each preset, each job (by name)."""
    if previous is None:
        return []
    out = []

    def cmp(scope: str, metric: str, now, before, higher_is_worse: bool = True):
        if now is None or before is None or before == 0:
            return
        ratio = now / before
        worse = ratio > REGRESSION_RATIO if higher_is_worse else ratio < 1 / REGRESSION_RATIO
        out.append({"scope": scope, "metric": metric, "previous": before, "current": now,
                    "change": _r(ratio - 1.0), "regression": bool(worse)})

    for m in ("mean_s_per_image", "mean_s_per_step", "peak_memory_max_bytes"):
        cmp("run", m, current["totals"][m], previous["totals"][m])
    for name, p in current["presets"].items():
        before = previous["presets"].get(name)
        if before:
            cmp(f"preset {name}", "mean_s_per_image", p["mean_s_per_image"], before["mean_s_per_image"])
    prev_jobs = {r["name"]: r for r in previous["jobs"] if r["status"] == "rendered"}
    for r in current["jobs"]:
        b = prev_jobs.get(r["name"])
        if b and r["status"] == "rendered":
            cmp(f"job {r['name']}", "seconds", r["seconds"], b["seconds"])
    return out


def line_chart(title: str, unit: str, labels: list[str], values: list[float | None],
               width: int = 560, height: int = 180, flagged: bool = False) -> dict:
    """Geometry for an inline SVG line chart: numbers only, drawn by the template."""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 16, 28
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    top = max((v for _, v in pts), default=1.0) or 1.0
    top *= 1.15
    n = max(len(values) - 1, 1)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def xy(i: int, v: float) -> tuple[float, float]:
        return (round(pad_l + plot_w * (i / n if len(values) > 1 else 0.5), 1),
                round(pad_t + plot_h * (1 - v / top), 1))

    points = []
    for i, v in pts:
        x, y = xy(i, v)
        points.append({"x": x, "y": y, "value": v, "label": labels[i], "current": i == len(values) - 1})
    ticks = [{"y": round(pad_t + plot_h * (1 - f), 1), "label": _fmt(top * f)} for f in (0.0, 0.5, 1.0)]
    return {"title": title, "unit": unit, "width": width, "height": height, "points": points,
            "polyline": " ".join(f"{p['x']},{p['y']}" for p in points), "yticks": ticks,
            "x0": pad_l, "x1": width - pad_r, "y0": pad_t, "y1": height - pad_b, "flagged": flagged}


def trend_charts(points: list[dict], regs: list[dict]) -> list[dict]:
    flagged = {r["metric"] for r in regs if r["scope"] == "run" and r["regression"]}
    labels = [p["run_id"] for p in points]
    charts = []
    for key, title, unit, _ in TREND_METRICS:
        vals = [p[key] for p in points]
        if key == "peak_memory_max_bytes":
            vals = [None if v is None else round(v / 2**20, 2) for v in vals]
        charts.append(dict(line_chart(title, unit, labels, vals, flagged=key in flagged), metric=key))
    return charts


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def _mean(vals: list[float]) -> float | None:
    return _r(float(np.mean(vals))) if vals else None
