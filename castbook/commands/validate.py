"""castbook validate: check spec files; every error located as file:line:col: field.path: message."""

from __future__ import annotations

import sys
from pathlib import Path

from castbook.common import command_parser, print_spec_errors
from schemas.loader import SpecErrors


def register(subparsers) -> None:
    parser = command_parser(subparsers, "validate", "Validate spec files (render specs and training specs).",
                            "castbook validate specs/examples/luca.yaml specs/training/*.yaml")
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files to check, each on its own")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", type=Path, default=None)
    parser.set_defaults(func=run)


def validate_file(path: Path, overrides: list[str] = (), root: Path | None = None) -> None:
    """Raise SpecErrors if `path` is invalid. Training specs (a top-level `dataset`) use their own schema."""
    from schemas.loader import read_yaml_file

    if _is_training_spec(path):
        from schemas.loader import load_yaml_model
        from schemas.training import TrainingSpec

        load_yaml_model(path, TrainingSpec, root)
        return
    from schemas.spec_loader import load_spec

    load_spec([path], overrides, root)
    del read_yaml_file


def _is_training_spec(path: Path) -> bool:
    try:
        from schemas.loader import parse_yaml

        data, _ = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except Exception:
        return False
    return isinstance(data, dict) and "dataset" in data and "jobs" not in data


def run(args) -> int:
    failed = 0
    for path in args.paths:
        try:
            validate_file(path, args.overrides, args.root)
            print(f"ok  {path}")
        except SpecErrors as exc:
            failed += 1
            print_spec_errors(exc)
    return 2 if failed else 0
