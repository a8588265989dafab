"""`castbook toyworld generate|eval`: the procedural toy-world dataset and its pixel checker."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "toyworld",
        help="generate the procedural toy-world dataset or check images against their prompts",
        description="Toy world: shape characters (colour, shape, eyes, expression, pose) on beach/town/night scenes.",
    )
    sub = p.add_subparsers(dest="toyworld_command", metavar="{generate,eval}")
    sub.required = True

    g = sub.add_parser("generate", help="write name.png + name.txt captions + labels.jsonl")
    g.add_argument("--out", type=Path, required=True, help="output folder (created)")
    g.add_argument("--count", type=int, required=True, help="number of images")
    g.add_argument("--seed", type=int, default=0, help="dataset seed; the same seed gives identical bytes")
    g.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    g.add_argument("--holdout", default="default", help="'default' (documented HOLDOUT list) or 'none'")
    g.add_argument("--only", default=None, help='generate only matching images, e.g. "brown heart green eyes"')
    g.add_argument("--character", default=None, help="generate one example character (e.g. luca); captions start with its name")
    g.add_argument("--prefix", default=None, help="file name prefix (default: toy, or the character name)")

    e = sub.add_parser("eval", help="classify images from pixels and print per-attribute accuracy")
    e.add_argument("path", type=Path, help="run directory, generated dataset or captioned image folder")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON")
    e.add_argument("--errors", type=int, default=10, help="list up to N misread images (table mode)")
    e.add_argument("--by-job", action="store_true", help="run directory: also one table per job matrix")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.toyworld_command == "generate":
        return _generate(args)
    return _eval(args)


def _generate(args: argparse.Namespace) -> int:
    from toyworld import world as tw

    try:
        if args.only and args.character:
            raise ValueError("--only and --character both given; use one (a character is a fixed --only).")
        only = tw.character_filter(args.character) if args.character else (
            tw.parse_filter(args.only) if args.only else None)
        prefix = args.prefix or (args.character or "toy")
        labels = tw.generate_dataset(args.out, args.count, args.seed, args.size,
                                     tw.holdout_by_name(args.holdout), only, prefix, trigger=args.character)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(labels)} image(s) + captions + labels.jsonl to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from toyworld import checker as ev

    try:
        result = ev.evaluate_path(args.path, by_job=args.by_job)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(ev.format_table(result))
    for job, sub_result in (result.get("by_job") or {}).items():
        print(f"\njob {job}:")
        print(ev.format_table(sub_result))
    for err in result["errors"][: args.errors]:
        wrong = ", ".join(f"{k}: expected {v['expected']}, read {v['predicted']}" for k, v in err["wrong"].items())
        print(f"  {err['name']}: {wrong}")
    return 0
