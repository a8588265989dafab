"""`castbook check RUN_DIR`: the CI gate on a run's consistency scores.

Exit 0 when every job finished and every character's pass rate (the fraction of its
selected images with CLIP-I mean >= its threshold) reaches its `min_pass_rate`
(default 0.8); exit 1 otherwise, printing each reason; exit 2 when the run cannot be read.
`--junit FILE` also writes the verdict as JUnit XML for Jenkins, GitLab and GitHub.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="fail (exit 1) when a run has failed jobs or a character below its gate",
        description="Gate a run for CI. A character passes when at least min_pass_rate (default 0.8) of its "
                    "selected images score CLIP-I mean >= its threshold (default 0.65); best-of losers do not "
                    "count. Any failed or unfinished job also fails the gate.\n\n"
                    "example: castbook check runs/20261130T031500Z-luca",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory (the folder holding run.json)")
    p.add_argument("--junit", type=Path, metavar="FILE",
                   help="also write JUnit XML (one test case per character gate and per failed job) for CI")
    p.set_defaults(func=run)


def run(args) -> int:
    from reports.analysis import analyze  # noqa: PLC0415

    # An unreadable run (RunDirError) or unusable scoring settings (ScoringError) reach `main`: exit 2.
    a = analyze(args.run_dir, history=False)
    res = a.results
    if args.junit:
        from reports.junit import write_junit  # noqa: PLC0415

        write_junit(res, args.junit)
    for name, c in res["characters"].items():
        rate = "n/a" if c["pass_rate"] is None else f"{c['pass_rate']:.2f}"
        verdict = "ok" if c["gate_passed"] and not c["error"] else "FAIL"
        print(f"{verdict:4} {name}: pass rate {rate} ({c['passed']}/{c['selected']} at CLIP-I >= "
              f"{c['threshold']:.2f}; gate {c['min_pass_rate']:.2f})")
    s = res["summary"]
    print(f"jobs: {s['jobs']} ({s['rendered']} rendered, {s['cached']} cached, {s['failed']} failed, "
          f"{s['missing']} unfinished)")
    if res["gate"]["passed"]:
        print(f"check passed: {a.run.path}")
        return 0
    print(f"check FAILED: {a.run.path}", file=sys.stderr)
    for f in res["gate"]["failures"]:
        print(f"  - {f}", file=sys.stderr)
    return 1
