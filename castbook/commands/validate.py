"""castbook validate: check spec files; every error located as file:line:col: field.path: message."""

from __future__ import annotations

from pathlib import Path

from castbook.common import add_root_arg, command_parser, print_spec_errors, resolve_root
from schemas.kinds import validate_file
from schemas.loader import SpecErrors

__all__ = ["register", "run", "validate_file"]  # validate_file: schemas.kinds, re-exported for old callers


def register(subparsers) -> None:
    parser = command_parser(subparsers, "validate", "Validate spec files (render specs, training specs, toy recipes).",
                            "castbook validate specs/examples/luca.yaml specs/training/*.yaml")
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files to check, each on its own")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a render-spec value after loading, e.g. -s defaults.preset=draft")
    add_root_arg(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    failed = 0
    for path in args.paths:
        try:
            kind = validate_file(path, args.overrides, resolve_root(args, path))
        except SpecErrors as exc:  # each file on its own: report it and go on to the next
            failed += 1
            print_spec_errors(exc)
            continue
        print(f"ok  {path} ({kind})")
    return 2 if failed else 0
