"""Page data builders and rendering.

Each builder turns the analysis into plain data (strings, numbers, lists); the
Jinja2 templates render it with autoescape on. `|safe` is used only for our own
CSS and JS files. Charts are SVG drawn by the template from numbers.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from core.files import atomic_write_bytes, atomic_write_text
from reports import benchmark
from reports.analysis import Analysis

THUMB_PX = 256
_STATIC = Path(__file__).parent / "static"


# --- thumbnails ------------------------------------------------------------------------
def make_thumb(src: Path, run_dir: Path, digest: str | None) -> str | None:
    """JPEG thumbnail under `run_dir/thumbs/`, named by content digest; returns its
    path relative to run_dir (None when the source is unreadable)."""
    from PIL import Image  # noqa: PLC0415

    src = Path(src)
    if not src.is_file():
        return None
    if digest is None:
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
    rel = f"thumbs/{digest[:32]}.jpg"
    dest = run_dir / rel
    if dest.is_file():
        return rel
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except OSError:
        return None
    atomic_write_bytes(dest, buf.getvalue())
    return rel


def _rel(target: Path, run_dir: Path) -> str:
    return Path(os.path.relpath(target, run_dir)).as_posix()


# --- shared bits -------------------------------------------------------------------------
def _nav(current: str) -> list[dict]:
    pages = [("report", "report.html", "Summary"), ("consistency", "consistency.html", "Consistency"),
             ("benchmark", "benchmark.html", "Benchmark"), ("diff", "diff.html", "Diff"),
             ("results", "results.json", "results.json")]
    return [{"href": h, "label": l, "current": k == current} for k, h, l in pages]


def _cell(r: dict, a: Analysis) -> dict:
    """One image tile: scores and a CSS state (pass, fail, loser, failed, missing, unscored)."""
    run_dir = a.run.path
    if r["status"] in ("failed", "missing") or r["image"] is None:
        state = "failed" if r["status"] != "missing" else "missing"
    elif not r["selected"]:
        state = "loser"
    elif r["pass"] is None:
        state = "unscored"
    else:
        state = "pass" if r["pass"] else "fail"
    thumb = make_thumb(run_dir / r["image"], run_dir, r["image_digest"]) if r["image"] else None
    label_bits = [r["preset"] or "", f"seed {r['seed']}"]
    label_bits += [f"{k}={v}" for k, v in sorted(r["sweep"].items())]
    if r["best_of_group"]:
        label_bits.append(f"candidate {r['candidate']}")
    return {"name": r["name"], "key": r["key"], "href": r["image"], "thumb": thumb, "state": state,
            "label": " · ".join(b for b in label_bits if b), "prompt": r["prompt"], "error": r["error"],
            "clip_i_mean": r["clip_i_mean"], "clip_i_best": r["clip_i_best"], "clip_i_ratio": r["clip_i_ratio"],
            "clip_t": r["clip_t"], "dino_mean": r["dino_mean"], "selected": r["selected"],
            "best_of_group": r["best_of_group"], "scene": r["scene"]}


def _sort_value(v) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def _sweep_grids(records: list[dict], cells: dict[str, dict]) -> list[dict]:
    """XYZ-plot-like grids: first axis across, second down, any others as separate tables."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if not r["sweep"]:
            continue
        axes = tuple(sorted(r["sweep"]))
        seed = None if "seed" in axes else r["seed"]
        groups.setdefault((r["job"], r["scene"], r["preset"], seed, axes), []).append(r)
    grids = []
    for (job, scene, preset, seed, axes), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        x_axis = axes[0]
        y_axis = axes[1] if len(axes) > 1 else None
        z_axes = axes[2:]
        z_values = sorted({tuple(r["sweep"][z] for z in z_axes) for r in rs}, key=lambda t: [_sort_value(v) for v in t])
        for zv in z_values:
            sub = [r for r in rs if tuple(r["sweep"][z] for z in z_axes) == zv]
            xs = sorted({r["sweep"][x_axis] for r in sub}, key=_sort_value)
            ys = sorted({r["sweep"][y_axis] for r in sub}, key=_sort_value) if y_axis else [None]
            rows = []
            for y in ys:
                row = []
                for x in xs:
                    hit = [r for r in sub if r["sweep"][x_axis] == x and (y_axis is None or r["sweep"][y_axis] == y)]
                    row.append(cells[hit[0]["key"]] if hit else None)
                rows.append({"y": y, "cells": row})
            title = f"{job} / {scene} / {preset}" + (f" / seed {seed}" if seed is not None else "")
            if z_axes:
                title += " / " + ", ".join(f"{z}={v}" for z, v in zip(z_axes, zv))
            grids.append({"title": title, "x_axis": x_axis, "y_axis": y_axis, "xs": xs, "rows": rows})
    return grids


def _grid(records: list[dict], cells: dict[str, dict]) -> dict:
    """Scenes down (one row per job matrix and scene when there are several matrices: a baseline
    and its LoRA job share scene, preset and seed), preset/seed/candidate across; worst row first."""
    plain = [r for r in records if not r["sweep"]]

    def col_of(r: dict) -> tuple:  # natural order: preset, then seed, then candidate
        return (r["preset"] or "", r["seed"] if r["seed"] is not None else -1,
                r["candidate"] if r["best_of_group"] else -1)

    col_keys = sorted({col_of(r) for r in plain})
    labels = {col_of(r): cells[r["key"]]["label"] for r in plain}
    columns = [labels[k] for k in col_keys]
    several_jobs = len({r["job"] for r in plain}) > 1
    scenes: dict[tuple[str, str], list[dict]] = {}
    for r in plain:
        scenes.setdefault((r["job"] or "", r["scene"] or "-"), []).append(r)

    def worst(rs: list[dict]) -> float:
        vals = [r["clip_i_mean"] for r in rs if r["selected"] and r["clip_i_mean"] is not None]
        return min(vals) if vals else float("inf")

    rows = []
    for (job, scene), rs in sorted(scenes.items(), key=lambda kv: (worst(kv[1]), kv[0])):
        by_col = {col_of(r): cells[r["key"]] for r in rs}
        rows.append({"scene": scene, "job": job, "label": f"{job} · {scene}" if several_jobs else scene,
                     "cells": [by_col.get(c) for c in col_keys]})
    return {"columns": columns, "rows": rows}


# --- page builders -----------------------------------------------------------------------
def consistency_data(a: Analysis) -> dict:
    res, run_dir = a.results, a.run.path
    cells = {r["key"]: _cell(r, a) for r in res["images"]}
    sections = []
    names = list(res["characters"])
    # Worst characters first: lowest pass rate, then lowest mean CLIP-I.
    names.sort(key=lambda n: (res["characters"][n]["pass_rate"] if res["characters"][n]["pass_rate"] is not None
                              else 2.0, res["characters"][n]["clip_i_mean"]["mean"] or 0.0, n))
    for name in names:
        c = res["characters"][name]
        mine = [r for r in res["images"] if r["character"] == name]
        refs = []
        for ref in a.refs.get(name, {}).get("references", []):
            p = Path(ref["abs_path"])
            refs.append({"path": ref["path"], "href": _rel(p, run_dir) if p.is_file() else None,
                         "thumb": make_thumb(p, run_dir, ref["digest"]) if p.is_file() else None})
        ungated = set(c.get("ungated_jobs", []))  # baselines are expected to score low: not offenders
        worst = sorted((r for r in mine if r["selected"] and r["clip_i_mean"] is not None and r["job"] not in ungated),
                       key=lambda r: r["clip_i_mean"])[:6]
        sections.append({"name": name, "summary": c, "refs": refs, "worst": [cells[r["key"]] for r in worst],
                         "grid": _grid(mine, cells), "sweeps": _sweep_grids(mine, cells),
                         "losers": sum(1 for r in mine if not r["selected"])})
    loose = [r for r in res["images"] if not r["character"]]
    if loose:
        sections.append({"name": None, "summary": None, "refs": [], "worst": [], "grid": _grid(loose, cells),
                         "sweeps": _sweep_grids(loose, cells), "losers": sum(1 for r in loose if not r["selected"])})
    # Plain data for the page's filter script (embedded with |tojson).
    cell_data = [{"key": c["key"], "name": c["name"], "state": c["state"], "clip_i_mean": c["clip_i_mean"]}
                 for c in cells.values()]
    return {"sections": sections, "cell_data": cell_data, "summary": res["summary"]}


def report_data(a: Analysis) -> dict:
    res = a.results
    info = a.run.info
    return {"run": res["run"], "summary": res["summary"], "gate": res["gate"], "failed_jobs": res["failed_jobs"],
            "characters": res["characters"], "scoring": res["scoring"],
            "environment": sorted((info.get("environment") or {}).items()),
            "startup": sorted((info.get("startup") or {}).items()),
            "root": info.get("root"), "ledger_counts": info.get("counts") or {}}


def benchmark_data(a: Analysis) -> dict:
    b = a.results["benchmark"]
    return {"totals": b["totals"], "startup": sorted(b["startup"].items()), "presets": b["presets"],
            "jobs": b["jobs"], "regressions": b["regressions"], "history": b["history"],
            "charts": benchmark.trend_charts(b["history"], b["regressions"]) if b["history"] else [],
            "regressed": [r for r in b["regressions"] if r["regression"]]}


def diff_data(a: Analysis) -> dict:
    d = a.results["diff"]
    run_dir = a.run.path
    if d is None or d["previous_run"] is None:
        return {"diff": d, "changed": [], "nondeterministic": []}

    def thumb(rel: str | None) -> str | None:
        return make_thumb(run_dir / rel, run_dir, None) if rel else None

    changed = [dict(c, previous_thumb=thumb(c["previous_image"]), current_thumb=thumb(c["current_image"]))
               for c in sorted(d["changed"], key=lambda c: (c["clip_i_drift"] is None, c["clip_i_drift"] or 0.0))]
    nondet = [dict(c, previous_thumb=thumb(c["previous_image"]), current_thumb=thumb(c["current_image"]))
              for c in d["nondeterministic"]]
    return {"diff": d, "changed": changed, "nondeterministic": nondet}


# --- rendering ---------------------------------------------------------------------------
def render_standalone(template: str, data: dict, title_id: str) -> str:
    """A page that belongs to no single run (the runs index): same CSS, no run navigation."""
    import datetime as _dt  # noqa: PLC0415

    return _env().get_template(template).render(
        nav=[], page=template.split(".")[0], run_id=title_id, js="",
        css=(_STATIC / "report.css").read_text(encoding="utf-8"),
        generated_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **data)


def _env() -> Environment:
    env = Environment(loader=PackageLoader("reports", "templates"),
                      autoescape=select_autoescape(["html", "j2", "html.j2", "svg"], default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["mib"] = lambda v: "–" if v is None else f"{v / 2**20:,.1f} MiB"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.0f}%"
    env.filters["signed_pct"] = lambda v: "–" if v is None else f"{100 * v:+.1f}%"
    return env


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def render_pages(a: Analysis) -> dict[str, Path]:
    """Render the four HTML pages (atomic writes) and return {name: path}."""
    env = _env()
    common = {"css": (_STATIC / "report.css").read_text(encoding="utf-8"),
              "js": (_STATIC / "report.js").read_text(encoding="utf-8"),
              "run_id": a.run.run_id, "generated_at": a.results["generated_at"]}
    pages = {"report": report_data, "consistency": consistency_data, "benchmark": benchmark_data,
             "diff": diff_data}
    out: dict[str, Path] = {}
    for name, builder in pages.items():
        html = env.get_template(f"{name}.html.j2").render(nav=_nav(name), page=name, **common, **builder(a))
        out[name] = a.run.path / f"{name}.html"
        atomic_write_text(out[name], html)
    return out
