"""The `ip_adapter:` block of a character (identity from reference images; renderer/ip_adapter.py)."""

from __future__ import annotations

import json
from typing import Annotated, Union

from pydantic import BaseModel, Discriminator, Field, StringConstraints, Tag, model_validator

from schemas.base import Strict
from schemas.builtins import IP_ADAPTER_MODELS

Scale = Annotated[float, Field(ge=0, le=4)]
BlockName = Annotated[str, StringConstraints(pattern=r"^block_[0-9]+$")]


def _shape(value) -> str:  # which member of a union a value is meant for: one error, not one per member
    return "list" if isinstance(value, list) else "mapping" if isinstance(value, (dict, BaseModel)) else "number"


def _number_or(member, tag: str):
    return Annotated[Union[Annotated[Scale, Tag("number")], Annotated[member, Tag(tag)]], Discriminator(_shape)]


BlockScales = _number_or(dict[BlockName, _number_or(list[Scale], "list")], "mapping")


class IpBlockScales(Strict):
    """A scale per UNet block, in the form diffusers' `set_ip_adapter_scale` takes (InstantStyle):
    `{down: {block_2: [0.0, 1.0]}, mid: 0.0, up: {block_0: [0.0, 1.0, 0.0]}}`. A number stands for every
    attention layer of that part or block, a list gives one per transformer layer; **what is not named
    gets 0**. Used to take only part of what the references carry, e.g. the layout blocks and not the
    colour when a LoRA already brings the colour (docs/TOYWORLD.md "Toy IP-Adapter")."""

    down: BlockScales = 0.0
    mid: Scale = 0.0
    up: BlockScales = 0.0


IpScale = _number_or(IpBlockScales, "mapping")
IP_SCALE_DESCRIPTION = ("set_ip_adapter_scale: a number for every block (0 = no effect), or a scale per block "
                        "as diffusers takes it ({down: {block_2: [0.0, 1.0]}, mid: 0.0, up: {block_0: 1.0}}; "
                        "blocks not named get 0).")


def canonical_ip_scale(scale: float | dict | IpBlockScales) -> float | dict:
    """The scale as jobs carry it: a float, or the full per-block dict (down, mid, up; floats), so two
    spellings of the same scales give the same job key."""
    if isinstance(scale, dict):
        scale = IpBlockScales.model_validate(scale)
    if isinstance(scale, IpBlockScales):
        return json.loads(scale.model_dump_json())
    return float(scale)


def _nonzero_parts(scale: dict) -> list[tuple[str, object]]:
    parts = []
    for part in ("down", "mid", "up"):
        value = scale[part]
        for name, v in (value.items() if isinstance(value, dict) else [("", value)]):
            if any(x != 0 for x in (v if isinstance(v, list) else [v])):
                parts.append((f"{part}.{name}" if name else part, v))
    return parts


def ip_scale_is_zero(scale) -> bool:
    """True when the adapter can change nothing (every block at 0)."""
    return not _nonzero_parts(scale) if isinstance(scale, dict) else not scale


def ip_scale_label(scale) -> str:
    """Short, file-name-safe text of a scale: `0.6`; `mid@1`; `down.block_1@0_1-up.block_0@1_0_0` (zeros left out)."""
    if not isinstance(scale, dict):
        return f"{float(scale):g}"
    parts = _nonzero_parts(scale)
    if not parts:
        return "0"
    return "-".join(f"{where}@{'_'.join(f'{x:g}' for x in v) if isinstance(v, list) else f'{v:g}'}"
                    for where, v in parts)


def ip_scale_text(scale) -> str:
    """The scale in an infotext: the number, or the per-block dict as compact JSON (what diffusers takes)."""
    return f"{float(scale):g}" if not isinstance(scale, dict) else json.dumps(scale, separators=(",", ":"))


class IpAdapter(Strict):
    """Identity from reference images (renderer/ip_adapter.py): an SDXL IP-Adapter `.safetensors`
    (`image_proj.*` + `ip_adapter.*` keys) and its `CLIPVisionModelWithProjection` folder."""

    model: str = Field(description="builtin:toy-ip-adapter, builtin:tiny-ip-adapter or an IP-Adapter .safetensors file.")
    image_encoder: str | None = Field(
        default=None, description="The image-encoder folder (CLIPVisionModelWithProjection); optional for built-ins.")
    scale: IpScale = Field(default=0.6, description=IP_SCALE_DESCRIPTION)
    images: list[str] = Field(
        default=[], description="Glob patterns of the images to condition on (embeddings averaged); "
        "default: the character's references.")

    @model_validator(mode="after")
    def _model_and_encoder(self) -> "IpAdapter":
        if self.model.startswith("builtin:"):
            name = self.model.removeprefix("builtin:")
            if name not in IP_ADAPTER_MODELS:
                known = ", ".join(f"builtin:{n}" for n in IP_ADAPTER_MODELS)
                raise ValueError(f"unknown built-in IP-Adapter `{self.model}`; known: {known}")
            if self.image_encoder is not None:
                raise ValueError(f"`image_encoder` is set, but {self.model} brings its own; remove it")
            return self
        if not self.model.endswith(".safetensors"):
            raise ValueError(f"an IP-Adapter `model` must be a .safetensors file (castbook never unpickles), "
                             f"got {self.model!r}")
        if self.image_encoder is None:
            raise ValueError("`image_encoder` is required for an IP-Adapter file: the folder with the "
                             "CLIPVisionModelWithProjection (config.json + model.safetensors) it was trained with")
        return self


GLOB_PREFIX = "glob:"  # digests[GLOB_PREFIX + pattern] = the matched files, one per line (schemas/plan.py)


def ip_adapter_files(ip: IpAdapter, character) -> tuple[list[str], list[str]]:
    """(files, globs) of one IP-Adapter whose bytes change pixels: the adapter file and encoder folder
    unless built-in, and the image globs (its `images`, else the character's `references`)."""
    files = [] if ip.model.startswith("builtin:") else [ip.model, *([ip.image_encoder] if ip.image_encoder else [])]
    return files, list(ip.images or character.references)


def resolve_ip_adapter(ip: IpAdapter | None, character, scale, digests: dict[str, str]):
    """The job's `ResolvedIpAdapter`, or None. Pure: the glob matches and digests come in `digests`."""
    from schemas.builtins import builtin_digest
    from schemas.job import ResolvedIpAdapter

    if ip is None:
        return None
    _, globs = ip_adapter_files(ip, character)
    images = list(dict.fromkeys(p for g in globs for p in digests[GLOB_PREFIX + g].splitlines() if p))
    if ip.model.startswith("builtin:"):
        name = ip.model.removeprefix("builtin:")
        model, digest, encoder, encoder_digest = ip.model, builtin_digest(name), ip.model, builtin_digest(name)
    else:
        model, digest = ip.model, digests[ip.model]
        encoder, encoder_digest = str(ip.image_encoder), digests[str(ip.image_encoder)]
    return ResolvedIpAdapter(model=model, digest=digest, image_encoder=encoder, encoder_digest=encoder_digest,
                             images=tuple(images), image_digests=tuple(digests[p] for p in images),
                             scale=canonical_ip_scale(ip.scale if scale is None else scale))
