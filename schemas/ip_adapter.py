"""The `ip_adapter:` block of a character (identity from reference images; renderer/ip_adapter.py)."""

from __future__ import annotations

from pydantic import Field, model_validator

from schemas.base import Strict
from schemas.builtins import IP_ADAPTER_MODELS


class IpAdapter(Strict):
    """Identity from reference images (renderer/ip_adapter.py): an SDXL IP-Adapter `.safetensors`
    (`image_proj.*` + `ip_adapter.*` keys) and its `CLIPVisionModelWithProjection` folder."""

    model: str = Field(description="builtin:toy-ip-adapter, builtin:tiny-ip-adapter or an IP-Adapter .safetensors file.")
    image_encoder: str | None = Field(
        default=None, description="The image-encoder folder (CLIPVisionModelWithProjection); optional for built-ins.")
    scale: float = Field(default=0.6, ge=0, le=4, description="set_ip_adapter_scale; 0 = no effect.")
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
                             scale=float(ip.scale if scale is None else scale))
