"""Checks of model files named in a spec that need the file, not only its name: run by `load_spec`
after the path checks, so `castbook validate` says what a wrong checkpoint is before Ray or torch
start. Only the safetensors header is read (core/safetensors_info.py)."""

from __future__ import annotations

from pathlib import Path

from core.errors import CastbookError
from core.safetensors_info import checkpoint_problem, classify, read_header
from schemas.spec import SingleFile, Spec


def check_model_files(spec: Spec, root: Path, sink) -> None:
    """`defaults.base_model` given as a single file must be an SDXL base checkpoint; a refiner given
    as a single file must be an SDXL checkpoint (A1111 lets any SDXL model refine, so a base fine-tune
    is accepted too)."""
    model = spec.defaults.base_model
    if isinstance(model, SingleFile):
        _check_file(root, model.path, "sdxl-base", ("defaults", "base_model"), sink)
    owners = [("presets", spec.presets), ("scenes", spec.scenes), ("jobs", spec.jobs)]
    for section, items in owners:
        for name, item in items.items():
            refiner = getattr(item, "refiner", None)
            if refiner is not None and refiner.model.lower().endswith(".safetensors"):
                _check_file(root, refiner.model, None, (section, name, "refiner", "model"), sink)


def _check_file(root: Path, relative: str, want: str | None, location: tuple, sink) -> None:
    path = Path(root) / relative
    if not path.is_file():
        return  # the path check has said so
    try:
        problem = checkpoint_problem(Path(relative), classify(read_header(path)), want)
    except CastbookError as e:
        problem = str(e)
    if problem:
        sink.add(location, problem)
