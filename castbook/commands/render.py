"""castbook render: render a spec's jobs (Ray actors or in-process), then write the reports."""

from __future__ import annotations

import sys
from pathlib import Path

from castbook.common import add_spec_args, check_output_root, command_parser, load_plan_args


def register(subparsers) -> None:
    parser = command_parser(
        subparsers, "render", "Render a spec's jobs into a new run directory (cached images are reused).",
        "castbook render specs/examples/luca.yaml --out runs --actors 1",
    )
    add_spec_args(parser)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="output root (default: runs/)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: one Ray actor per GPU/slot (default); local: in this process, no Ray")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="connect to a running Ray cluster (e.g. 'auto' or 10.0.0.1:6379) instead of a local one")
    parser.add_argument("--actors", type=int, default=1, metavar="N", help="render actors (one per GPU; default 1)")
    parser.add_argument("--force", action="store_true", help="re-render jobs whose image is already cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary (for cron); errors still print")
    parser.add_argument("--only", metavar="GLOB", help="render only jobs whose name (or job matrix name) matches")
    parser.add_argument("--no-report", action="store_true", help="do not write the HTML reports after rendering")
    parser.set_defaults(func=run)


def _write_reports(run_dir: Path, quiet: bool) -> Path | None:
    """Write the run's reports; on failure say how to retry them alone (the images are safe)."""
    from reports import write_reports

    try:
        written = write_reports(run_dir)
    except Exception as e:  # the images and ledger are safe; say how to retry the report alone
        print(f"castbook: the report could not be written: {type(e).__name__}: {e}\n"
              f"  images are in {run_dir}; retry with: castbook report {run_dir}", file=sys.stderr)
        return None
    report = (written or {}).get("report") if isinstance(written, dict) else None
    return Path(report) if report else run_dir / "report.html"


def run(args) -> int:
    from renderer.builtins import check_cache_home
    from renderer.outputs import RunLocked
    from renderer.runner import run_render

    if args.actors < 1:
        print(f"castbook render: --actors must be at least 1, got {args.actors}", file=sys.stderr)
        return 2
    plan = load_plan_args(args, only=args.only)
    if not plan.jobs:
        what = f" matching --only {args.only!r}" if args.only else ""
        print(f"castbook render: the spec has no jobs{what}; nothing to render", file=sys.stderr)
        return 2
    # Before any work: --out must be a writable folder; built-ins not saved yet need a writable cache.
    check_output_root(args.out)
    check_cache_home(plan.model_refs(scorer=not args.no_report))
    try:
        result = run_render(
            plan, out_dir=args.out, executor=args.executor, ray_address=args.ray_address, actors=args.actors,
            force=args.force, quiet=args.quiet, progress=not args.quiet and sys.stderr.isatty(), only=args.only,
        )
    except RunLocked as e:
        print(f"castbook render: {e}", file=sys.stderr)
        return 2
    c = result.counts
    report = None if args.no_report else _write_reports(result.run_dir, args.quiet)
    if not args.quiet or result.exit_code:
        out = sys.stdout if not result.exit_code else sys.stderr
        print(f"{c['total']} jobs: {c['rendered']} rendered, {c['cached']} cached, {c['failed']} failed", file=out)
        print(f"images:   {result.run_dir / 'images'}", file=out)
        print(f"manifest: {result.run_dir / 'manifest.jsonl'}", file=out)
        if report:
            print(f"report:   {report}", file=out)
        if c["failed"]:
            from core.jsonl import read_jsonl
            from schemas.records import ManifestRecord

            for line in read_jsonl(result.run_dir / "manifest.jsonl"):
                rec = ManifestRecord.model_validate(line)
                if rec.status == "failed":
                    print(f"  failed {rec.name}: {rec.error}", file=sys.stderr)
    return result.exit_code
