"""Prompt variables (`vars:` on characters, scenes and jobs): their values, how they name images,
and how the owners' variables merge. Pure functions; the models are in schemas/spec.py."""

from __future__ import annotations

import re


def var_values(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def var_label(value: str) -> str:
    """How a variable's value appears in image names: only what is safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(value)).strip("_.")[:40] or "_"


def var_label_clash(values: list[str]) -> tuple[str, str] | None:
    """Two values of one variable that would name the same images, or None."""
    seen: dict[str, str] = {}
    for value in values:
        label = var_label(value)
        if label in seen:
            return seen[label], value
        seen[label] = value
    return None


def merged_vars(character, scene, job) -> dict[str, list[str]]:
    """The prompt variables of one (character, scene, job matrix), name -> values. Pure.

    The job's `vars` override the scene's, which override the character's; a `vars.NAME` sweep
    axis of the job overrides all three. A variable with several values is an axis.
    """
    merged: dict[str, list[str]] = {}
    for owner in (character, scene, job):
        for name, value in (owner.vars if owner is not None else {}).items():
            merged[name] = var_values(value)
    for axis, values in job.sweep.items():
        if axis.startswith("vars."):
            merged[axis.removeprefix("vars.")] = [str(v) for v in values]
    return dict(sorted(merged.items()))
