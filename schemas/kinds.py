"""Which schema a YAML file is written against, told by the top-level keys only it has.

Render specs are the default; the others are training specs (`castbook train`) and the toy
recipes (`castbook toymodel`). Models are imported when needed, so `castbook validate` on a
render spec never loads the others.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

# (kind shown to the user, test on the set of top-level keys, "module:Model")
SPEC_KINDS: tuple[tuple[str, Callable[[set[str]], bool], str], ...] = (
    ("training spec", lambda keys: "dataset" in keys and "jobs" not in keys, "schemas.training:TrainingSpec"),
    ("toy base-model recipe", lambda keys: {"vae", "unet"} <= keys, "schemas.toy:ToyBaseSpec"),
    # `encoder` (the image encoder trained alongside) is the IP-Adapter recipe's own key.
    ("toy IP-Adapter recipe", lambda keys: "encoder" in keys and not keys & {"jobs", "dataset", "train"},
     "schemas.toy:ToyIpAdapterSpec"),
    # `base` (the frozen base model) and top-level `steps` are the ControlNet recipe's own keys.
    ("toy ControlNet recipe", lambda keys: bool(keys & {"base", "steps"}) and not keys & {"jobs", "dataset", "train"},
     "schemas.toy:ToyControlNetSpec"),
    ("toy CLIP recipe", lambda keys: {"data", "train", "output"} <= keys and "dataset" not in keys,
     "schemas.toy:ToyClipSpec"),
)
RENDER_SPEC = "render spec"


def _model(target: str) -> type[BaseModel]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def detect_spec_kind(data: Any) -> tuple[str, type[BaseModel]]:
    """(kind, model class) for parsed YAML data; anything unrecognised is a render spec."""
    keys = {k for k in data if isinstance(k, str)} if isinstance(data, dict) else set()
    for kind, matches, target in SPEC_KINDS:
        if matches(keys):
            return kind, _model(target)
    from schemas.spec import Spec

    return RENDER_SPEC, Spec


def validate_file(path: Path, overrides: list[str] = (), root: Path | None = None) -> str:
    """Check one YAML file against the schema it is written for; return that kind.

    Raises SpecErrors (every error, located). Render specs are loaded whole (includes,
    `-s` overrides, paths, cross references); the other kinds are schema-checked.
    """
    from schemas.expand import expand
    from schemas.loader import SpecError, SpecErrors, load_yaml_model, read_yaml_file
    from schemas.paths import find_project_root
    from schemas.prompt_length import check_prompt_lengths
    from schemas.spec_loader import load_spec

    path = Path(path).absolute()
    root = (root or find_project_root(path)).resolve()
    data, _ = read_yaml_file(path, root)  # a broken file raises here, located
    kind, model = detect_spec_kind(data)
    if kind == RENDER_SPEC:
        loaded = load_spec([path], overrides, root)
        # Prompt lengths need the final prompts: expand without hashing files (pure; digests unused).
        check_prompt_lengths(loaded, expand(loaded.spec, defaultdict(lambda: "not-hashed-by-validate")))
        return kind
    if overrides:  # silently ignoring them would let a typo pass as checked
        raise SpecErrors([SpecError(f"<command line> -s {o}", 1, 1, "", f"-s overrides apply to render specs; "
                                    f"{path.name} is a {kind}") for o in overrides])
    load_yaml_model(path, model, root)
    return kind
