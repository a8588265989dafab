"""No-op re-run cost: `castbook render` of the example spec, first run vs an all-cached re-run.

Both runs are `castbook render` subprocesses on a fresh output root, so each pays the
CLI's start-up like a user does. Prints the ratio (target ≤ 0.05); no assertions.

    python benchmarks/rerun.py [--spec specs/examples/tiny.yaml] [--executor ray|local] [--with-report]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASTBOOK = Path(sys.executable).parent / "castbook"


def render(spec: str, out: Path, executor: str, report: bool) -> tuple[float, dict]:
    cmd = [str(CASTBOOK), "render", spec, "--out", str(out), "--executor", executor, "--quiet"]
    if not report:
        cmd.append("--no-report")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    run_dir = max((p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    return seconds, json.loads((run_dir / "run.json").read_text())["counts"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="specs/examples/tiny.yaml")
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    ap.add_argument("--with-report", action="store_true", help="also write the HTML reports after each run")
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="cb-rerun-"))
    first, c1 = render(a.spec, out, a.executor, a.with_report)
    second, c2 = render(a.spec, out, a.executor, a.with_report)
    print(f"spec {a.spec}, executor {a.executor}, reports {'on' if a.with_report else 'off'}")
    print(f"first run : {first:7.2f} s  {c1}")
    print(f"re-run    : {second:7.2f} s  {c2}")
    print(f"ratio     : {second / first:7.3f}   (target <= 0.05)")


if __name__ == "__main__":
    main()
