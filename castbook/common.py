"""Argument helpers shared by the commands that read specs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from schemas.loader import SpecErrors


def add_spec_args(parser: argparse.ArgumentParser, many: bool = True) -> None:
    parser.add_argument("spec", nargs="+" if many else None, type=Path,
                        help="spec file(s); later files are merged into the first like includes")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value after loading, e.g. -s defaults.preset=draft (repeatable)")
    parser.add_argument("--root", type=Path, default=None,
                        help="project root (default: nearest folder with .git or pyproject.toml)")


def command_parser(subparsers, name: str, help: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=f"{help}\n\nExample:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def print_spec_errors(exc: SpecErrors) -> None:
    for error in exc.errors:
        print(str(error), file=sys.stderr)
    n = len(exc.errors)
    print(f"{n} error{'s' if n != 1 else ''}", file=sys.stderr)


def plan_or_exit(args: argparse.Namespace, only: str | None = None):
    """Load and expand the spec; on errors print them located and exit 2."""
    from schemas.plan import load_plan

    specs = args.spec if isinstance(args.spec, list) else [args.spec]
    try:
        return load_plan(specs, args.overrides, args.root, only=only)
    except SpecErrors as exc:
        print_spec_errors(exc)
        raise SystemExit(2) from None
