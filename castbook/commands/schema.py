"""castbook schema: print the JSON Schema of specs (for editor autocompletion)."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    from castbook.common import command_parser

    parser = command_parser(subparsers, "schema", "Print the JSON Schema of render specs (or training specs).",
                            "castbook schema > castbook.schema.json")
    parser.add_argument("--training", action="store_true", help="the training-spec schema instead")
    parser.set_defaults(func=run)


def spec_json_schema(training: bool = False) -> dict:
    if training:
        from schemas.training import TrainingSpec as model
    else:
        from schemas.spec import Spec as model
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "castbook training spec" if training else "castbook render spec"
    return schema


def run(args) -> int:
    print(json.dumps(spec_json_schema(args.training), indent=2))
    return 0
