"""Checks of model files named in a spec that need the file, not only its name: run by `load_spec`
after the path checks, so `castbook validate` says what a wrong checkpoint is before Ray or torch
start. Only the safetensors header is read (core/safetensors_info.py)."""

from __future__ import annotations

from pathlib import Path

from core.errors import CastbookError
from core.safetensors_info import checkpoint_problem, classify, read_header
from schemas.spec import SingleFile, Spec


def check_model_files(spec: Spec, root: Path, sink) -> None:
    """`defaults.base_model` given as a single file must be an SDXL base checkpoint."""
    model = spec.defaults.base_model
    if not isinstance(model, SingleFile):
        return
    path = Path(root) / model.path
    if not path.is_file():
        return  # the path check has said so
    try:
        problem = checkpoint_problem(Path(model.path), classify(read_header(path)), "sdxl-base")
    except CastbookError as e:
        problem = str(e)
    if problem:
        sink.add(("defaults", "base_model"), problem)
