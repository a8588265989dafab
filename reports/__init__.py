"""Reports: consistency scores, benchmark trends, run diffs, as self-contained HTML + results.json.

Entry point: `write_reports(run_dir)`; called at the end of `castbook render` and by
`castbook report RUN_DIR`. Never touches the GPU render pipeline.
"""

from __future__ import annotations

from pathlib import Path


def write_reports(run_dir: Path) -> dict[str, Path]:
    """Score a run and write report.html, consistency.html, benchmark.html, diff.html,
    results.json and selection.json into it, and refresh the output root's index.html of
    every run (atomic writes). Returns {name: path}."""
    from core.files import atomic_write_json  # noqa: PLC0415 - keep `import reports` light for the CLI
    from reports.analysis import analyze  # noqa: PLC0415
    from reports.pages import render_pages  # noqa: PLC0415
    from reports.runs_index import write_runs_index  # noqa: PLC0415

    a = analyze(Path(run_dir))
    out = {"results": a.run.path / "results.json", "selection": a.run.path / "selection.json"}
    atomic_write_json(out["results"], a.results, sort_keys=True)
    atomic_write_json(out["selection"], {"schema_version": a.results["schema_version"],
                                         "run_id": a.run.run_id, "groups": a.results["selection"]}, sort_keys=True)
    out.update(render_pages(a))
    # The output root's index of every run (a run folder's parent is its output root).
    out["index"] = write_runs_index(a.run.path.parent)
    return out


__all__ = ["write_reports"]
