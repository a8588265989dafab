"""castbook plan: expand a spec into render jobs and show them (or print them as JSON)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from castbook.common import add_spec_args, command_parser, load_plan_args


def register(subparsers) -> None:
    parser = command_parser(subparsers, "plan", "Expand a spec into its render jobs (nothing is rendered).",
                            "castbook plan specs/examples/luca.yaml -s defaults.preset=draft --only 'main/*'")
    add_spec_args(parser)
    parser.add_argument("--json", action="store_true", help="print the resolved jobs as a JSON array")
    parser.add_argument("--only", metavar="GLOB", help="keep jobs whose name (or job matrix name) matches")
    parser.add_argument("--changes", nargs="?", const="", default=None, metavar="RUN_DIR", type=str,
                        help="compare with the last run of this spec under --out (or with RUN_DIR): per job new, "
                             "unchanged (cached) or re-render with the fields that changed; and jobs that disappear")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="output root that --changes looks in, as given to render (default: runs/)")
    parser.set_defaults(func=run)


def _print_changes(changes) -> None:
    order = {"rerender": 0, "new": 1, "unchanged": 2}
    for c in sorted(changes.jobs, key=lambda c: (order[c.status], c.name)):
        if c.status == "rerender":
            print(f"re-render  {c.name}: {'; '.join(c.reasons)}")
        elif c.status == "new":
            print(f"new        {c.name}")
        else:
            print(f"unchanged  {c.name} ({'cached' if c.cached else 'same key, but not in the cache: renders again'})")
    for name in changes.removed:
        print(f"removed    {name}")
    against = f"the last run {changes.previous_run}" if changes.previous_run else "no previous run (every job is new)"
    print(f"{changes.count('rerender')} to re-render, {changes.count('new')} new, {changes.count('unchanged')} "
          f"unchanged, {len(changes.removed)} removed; compared with {against}")


def run_changes(args, plan) -> int:
    """`plan --changes`: the plan against the last run of the same spec. Imports no torch."""
    from renderer.outputs import ImageCache
    from schemas.changes import find_previous_run, load_run_jobs, plan_changes

    if args.changes:  # a run folder given: its output root holds the cache
        previous_dir = Path(args.changes)
        out_root = previous_dir.parent
    else:
        previous_dir = find_previous_run(args.out, [str(p) for p in plan.spec_files])
        out_root = args.out
    previous = load_run_jobs(previous_dir) if previous_dir is not None else None
    cache = ImageCache(out_root)
    cached = {j.key for j in plan.jobs if cache.has(j.key)}
    changes = plan_changes(plan.jobs, previous, cached, str(previous_dir) if previous_dir else None)
    if args.json:
        json.dump(changes.to_json(), sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        _print_changes(changes)
    return 0


def run(args) -> int:
    plan = load_plan_args(args, only=args.only)
    if args.changes is not None:
        return run_changes(args, plan)
    if args.json:
        json.dump([job.model_dump(mode="json") for job in plan.jobs], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(plan.jobs)} jobs", show_lines=False, header_style="bold")
    for column in ("job", "character", "scene", "preset", "seed", "size", "steps", "cfg", "LoRA stack", "controls", "key"):
        table.add_column(column, overflow="fold")
    for job in plan.jobs:
        table.add_row(
            job.job, job.character or "-", job.scene, job.preset, str(job.seed), _size(job),
            str(job.num_inference_steps), f"{job.guidance_scale:g}",
            ", ".join(f"{l.name}:{l.weight:g}" for l in job.loras) or "-",
            ", ".join(f"{c.type}:{c.scale:g}" for c in job.controls) or "-",
            job.key[:12],
        )
    Console(width=max(160, Console().width)).print(table)
    print(f"{len(plan.jobs)} jobs from {', '.join(str(p) for p in plan.spec_files)}")
    return 0


def _size(job) -> str:
    """The first pass's size, and the final one when a hires pass changes it (`64x64→128x128`)."""
    size = f"{job.width}x{job.height}"
    hires = job.passes.hires if job.passes is not None else None
    return f"{size}→{hires.width}x{hires.height}" if hires is not None else size
