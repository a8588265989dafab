"""Preset resolution: built-in values, overridden or extended by the spec (pure)."""

from __future__ import annotations

from schemas.passes import PASS_FIELDS
from schemas.spec import BUILTIN_PRESETS, Spec

PRESET_FIELDS = ("num_inference_steps", "width", "height", "guidance_scale", "scheduler")


class PresetError(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def resolve_presets(spec: Spec) -> dict[str, dict]:
    """Every preset the spec can use, fully resolved.

    A spec preset named like a built-in overrides only the fields it sets. A new preset
    inherits from `extends` (a built-in or another spec preset) and must end up complete.
    """
    resolved: dict[str, dict] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict:
        if name in resolved:
            return resolved[name]
        if name in chain:
            raise PresetError(chain[0], f"preset inheritance cycle: {' -> '.join(chain + (name,))}")
        own = spec.presets.get(name)
        if own is None:
            if name in BUILTIN_PRESETS:
                resolved[name] = dict(BUILTIN_PRESETS[name])
                return resolved[name]
            known = ", ".join(sorted(set(BUILTIN_PRESETS) | set(spec.presets)))
            raise PresetError(chain[-1] if chain else name, f"preset `{name}` is not defined; known: {known}")
        if own.extends is not None:
            base = dict(resolve(own.extends, chain + (name,)))
        elif name in BUILTIN_PRESETS:
            base = dict(BUILTIN_PRESETS[name])
        else:
            base = {}
        base.update({k: v for k, v in own.model_dump(include=set(PRESET_FIELDS)).items() if v is not None})
        # Pass fields (hires, refiner, detail): set -> replaces the inherited pass; null -> switches it off.
        base.update(own.model_dump(include=set(PASS_FIELDS) & own.model_fields_set))
        missing = [f for f in PRESET_FIELDS if f not in base]
        if missing:
            raise PresetError(name, f"preset `{name}` does not set {', '.join(missing)}; set them or add `extends: standard`")
        resolved[name] = base
        return base

    for name in (*BUILTIN_PRESETS, *spec.presets):
        resolve(name, ())
    return resolved
