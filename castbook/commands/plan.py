"""castbook plan: expand a spec into render jobs and show them (or print them as JSON)."""

from __future__ import annotations

import json
import sys

from castbook.common import add_spec_args, command_parser, load_plan_args


def register(subparsers) -> None:
    parser = command_parser(subparsers, "plan", "Expand a spec into its render jobs (nothing is rendered).",
                            "castbook plan specs/examples/luca.yaml -s defaults.preset=draft --only 'main/*'")
    add_spec_args(parser)
    parser.add_argument("--json", action="store_true", help="print the resolved jobs as a JSON array")
    parser.add_argument("--only", metavar="GLOB", help="keep jobs whose name (or job matrix name) matches")
    parser.set_defaults(func=run)


def run(args) -> int:
    plan = load_plan_args(args, only=args.only)
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
            job.job, job.character or "-", job.scene, job.preset, str(job.seed), f"{job.width}x{job.height}",
            str(job.num_inference_steps), f"{job.guidance_scale:g}",
            ", ".join(f"{l.name}:{l.weight:g}" for l in job.loras) or "-",
            ", ".join(f"{c.type}:{c.scale:g}" for c in job.controls) or "-",
            job.key[:12],
        )
    Console(width=max(160, Console().width)).print(table)
    print(f"{len(plan.jobs)} jobs from {', '.join(str(p) for p in plan.spec_files)}")
    return 0
