"""castbook validate: check spec files; every error located as file:line:col: field.path: message."""

from __future__ import annotations

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


def _training_schema():
    from schemas.training import TrainingSpec

    return TrainingSpec


def _toy_base_schema():
    from toyworld.base import ToyBaseSpec

    return ToyBaseSpec


def _toy_controlnet_schema():
    from toyworld.controlnet import ToyControlNetSpec

    return ToyControlNetSpec


def _toy_clip_schema():
    from toyworld.clip import ToyClipSpec

    return ToyClipSpec


# Which schema a YAML file is checked against, by the top-level keys that only it has.
# Render specs are the default; the others are recipes for `castbook train` / `castbook toymodel`.
SPEC_KINDS = (
    ("training spec", lambda keys: "dataset" in keys and "jobs" not in keys, _training_schema),
    ("toy base-model recipe", lambda keys: {"vae", "unet"} <= keys, _toy_base_schema),
    # `base` (the frozen base model) and top-level `steps` are the ControlNet recipe's own keys.
    ("toy ControlNet recipe", lambda keys: bool(keys & {"base", "steps"}) and not keys & {"jobs", "dataset", "train"},
     _toy_controlnet_schema),
    ("toy CLIP recipe", lambda keys: {"data", "train", "output"} <= keys and "dataset" not in keys, _toy_clip_schema),
)


def validate_file(path: Path, overrides: list[str] = (), root: Path | None = None) -> str:
    """Raise SpecErrors if `path` is invalid; return what kind of spec it is."""
    from schemas.loader import load_yaml_model, parse_yaml

    try:
        data, _ = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except Exception:  # unreadable or broken YAML: the render-spec loader reports it, located
        data = None
    keys = set(data) if isinstance(data, dict) else set()
    for kind, matches, schema in SPEC_KINDS:
        if matches(keys):
            load_yaml_model(path, schema(), root)
            return kind
    from schemas.spec_loader import load_spec

    load_spec([path], overrides, root)
    return "render spec"


def run(args) -> int:
    failed = 0
    for path in args.paths:
        try:
            kind = validate_file(path, args.overrides, args.root)
            print(f"ok  {path} ({kind})")
        except SpecErrors as exc:
            failed += 1
            print_spec_errors(exc)
    return 2 if failed else 0
