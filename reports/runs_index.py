"""`runs/index.html`: every run under an output root, newest first, and per-character pass-rate
trends across nights (inline SVG). Written by every `castbook render` and `castbook report`.

Data first: `runs_index_data` reads each run's `run.json` and, when the run was reported, its
`results.json`; the template renders the plain data with autoescape on. A run folder that cannot
be read is listed with what is wrong instead of breaking the page.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from core.files import atomic_write_text
from reports.benchmark import line_chart

INDEX_NAME = "index.html"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _seconds(started: str | None, finished: str | None) -> float | None:
    try:
        a = _dt.datetime.fromisoformat(str(started).replace("Z", "+00:00"))
        b = _dt.datetime.fromisoformat(str(finished).replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((b - a).total_seconds(), 1)


def _run_row(run_dir: Path, info: dict) -> dict:
    results = _read_json(run_dir / "results.json")
    counts = info.get("counts") or {}
    row = {
        "run_id": info.get("run_id") or run_dir.name,
        "folder": run_dir.name,
        "spec": (info.get("spec_files") or ["?"])[0],
        "commit": (info.get("git_commit") or "")[:10] or None,
        "status": info.get("status"),
        "started": info.get("started"),
        "seconds": _seconds(info.get("started"), info.get("finished")),
        "images": counts.get("total"),
        "failed": counts.get("failed", 0),
        "report": f"{run_dir.name}/report.html" if (run_dir / "report.html").is_file() else None,
        "gate": None,  # None: not scored yet (no results.json)
        "failures": [],
        "characters": {},
    }
    if results:
        gate = results.get("gate") or {}
        row["gate"] = bool(gate.get("passed"))
        row["failures"] = list(gate.get("failures") or [])
        row["characters"] = {name: c.get("pass_rate") for name, c in sorted((results.get("characters") or {}).items())}
    return row


def runs_index_data(out_root: Path) -> dict:
    """Plain data for the index page of `out_root` (newest run first)."""
    out_root = Path(out_root)
    rows = []
    for run_dir in sorted(p for p in out_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info = _read_json(run_dir / "run.json")
        if info is not None:
            rows.append(_run_row(run_dir, info))
    rows.sort(key=lambda r: (str(r["started"] or ""), r["folder"]), reverse=True)
    oldest_first = list(reversed(rows))
    names = sorted({name for r in rows for name in r["characters"]})
    trends = []
    for name in names:
        scored = [r for r in oldest_first if r["characters"].get(name) is not None]
        chart = line_chart(f"{name}: pass rate", "", [r["run_id"] for r in scored],
                           [r["characters"][name] for r in scored], width=420, height=150)
        trends.append(dict(chart, metric=f"pass-rate-{name}", character=name))
    return {"runs": rows, "characters": names, "trends": trends, "root": str(out_root)}


def write_runs_index(out_root: Path) -> Path:
    """Render `out_root/index.html` atomically and return its path."""
    from reports.pages import render_standalone  # noqa: PLC0415 - jinja environment and CSS

    data = runs_index_data(out_root)
    path = Path(out_root) / INDEX_NAME
    atomic_write_text(path, render_standalone("runs_index.html.j2", data, title_id="runs"))
    return path
