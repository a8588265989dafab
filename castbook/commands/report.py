"""`castbook report RUN_DIR`: (re)write a run's HTML reports and results.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="regenerate a run's reports (HTML + results.json)",
        description="Score a finished (or interrupted) run and write report.html, consistency.html, "
                    "benchmark.html, diff.html, results.json and selection.json into it. Embeddings are "
                    "cached under the output folder's .cache/embeddings, so re-running is cheap.\n\n"
                    "example: castbook report runs/20261130T031500Z-luca",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory (the folder holding run.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from reports import write_reports  # noqa: PLC0415 - heavy imports only when the command runs

    # RunDirError, ScoringError and OSErrors inside run_dir reach `main`: exit 2.
    paths = write_reports(args.run_dir)
    print(f"reports written to {Path(args.run_dir)}:")
    for name in ("report", "consistency", "benchmark", "diff", "results"):
        print(f"  {paths[name]}")
    return 0
