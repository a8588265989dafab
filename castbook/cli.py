"""`castbook` entry point: parse arguments, dispatch to a command module. No logic here."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import castbook.commands

# Offline, always: a hub lookup would otherwise retry for ~23 s before failing.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="castbook",
        description="Render consistent SDXL characters from YAML specs kept in git.",
        epilog="Example: castbook validate specs/examples/luca.yaml && castbook render specs/examples/luca.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from castbook import __version__

    parser.add_argument("--version", action="version", version=f"castbook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(castbook.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"castbook.commands.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `castbook plan ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
