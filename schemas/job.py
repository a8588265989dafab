"""The resolved render job: the contract between the plan and the renderer.

A `RenderJob` is what `schemas.expand.expand` produces and what the actor renders.
Everything in it is resolved (no references, no defaults left to apply), so a job
can be rendered, hashed, stored in a PNG and reproduced on its own.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from core.digests import canonical_json
from schemas.base import Strict
from schemas.passes import ResolvedPasses, pass_pixel_fields
from schemas.schedulers import SchedulerName, scheduler_key

# Bump when castbook changes how a job is turned into pixels (scheduler mapping,
# prompt assembly, seeding). It is part of every key, so caches invalidate cleanly.
# 2: keys hash each scheduler's class and config overrides, not only its name.
RENDER_RECIPE_VERSION = 2

ControlType = Literal["pose", "depth", "canny", "seg", "normal"]
Dtype = Literal["auto", "fp32", "fp16", "bf16"]


class ResolvedModel(Strict):
    """A base model or ControlNet as the renderer loads it.

    `ref` is `builtin:NAME` or a path relative to the project root. `digest` is the
    sha256 of the file (or of a folder's weight/config files); for built-ins it is
    `builtin:NAME@RECIPE` so a change to the built-in recipe changes every key.
    """

    ref: str
    kind: Literal["builtin", "diffusers", "single_file"]
    digest: str
    config: str | None = None  # single-file checkpoints: local diffusers config folder


class ResolvedLora(Strict):
    name: str  # registry name, used as the peft adapter name
    path: str  # relative to the project root
    digest: str
    weight: float
    kind: Literal["character", "background", "pose", "expression", "style", "other"]


class ResolvedControl(Strict):
    type: ControlType
    image: str  # relative to the project root
    image_digest: str
    scale: float  # controlnet_conditioning_scale
    preprocess: bool
    model: ResolvedModel
    detector: str  # controlnet-aux detector name ("canny", "openpose", "midas", ...); "none" when not preprocessed
    detector_params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    annotator_dir: str | None = None  # trusted local folder with annotator checkpoints
    # schemas.annotators.weights_digest of the files the detector loads; only when it has weights
    annotator_digest: str | None = None


class ResolvedIpAdapter(Strict):
    """A character's IP-Adapter as the renderer loads it (renderer/ip_adapter.py)."""

    model: str  # builtin:NAME or the .safetensors path, relative to the project root
    digest: str  # file sha256, or builtin:NAME@RECIPE
    image_encoder: str  # the encoder folder (for built-ins: the built-in's ref)
    encoder_digest: str
    images: tuple[str, ...]  # reference images (embeddings averaged), relative to the project root
    image_digests: tuple[str, ...]
    scale: float | dict  # a float, or the per-block dict (schemas.ip_adapter.canonical_ip_scale)


class RenderJob(Strict):
    key: str  # sha256 hex of the canonical JSON of everything that changes pixels
    name: str  # readable output name: job/character/scene/preset/seed-N[-sweep]
    job: str
    character: str | None
    scene: str
    preset: str
    prompt: str
    negative_prompt: str
    seed: int  # the generator seed actually used
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: SchedulerName
    dtype: Dtype
    base_model: ResolvedModel
    vae: ResolvedModel | None = None  # performance.vae: replaces the base model's VAE
    loras: tuple[ResolvedLora, ...] = ()
    controls: tuple[ResolvedControl, ...] = ()
    sweep: dict[str, float | int | str] = Field(default_factory=dict)  # axis -> value, for grids
    best_of_group: str | None = None  # jobs sharing a group are candidates; scoring keeps one
    candidate: int = 0
    passes: ResolvedPasses | None = None  # finishing passes (schemas/passes.py); None: text-to-image only
    ip_adapter: ResolvedIpAdapter | None = None  # identity from reference images

    def pixel_fields(self) -> dict:
        """Everything that changes pixels: the input of the job key."""
        return {
            "recipe": RENDER_RECIPE_VERSION,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "scheduler_config": scheduler_key(self.scheduler),
            "dtype": self.dtype,
            "base_model": self.base_model.digest,
            # Only when set, so that keys of specs without a VAE override never change.
            **({"vae": self.vae.digest} if self.vae is not None else {}),
            # LoRA merging is a sum, so stack order does not change pixels: sort for the key.
            "loras": sorted(
                [{"name": l.name, "digest": l.digest, "weight": l.weight} for l in self.loras],
                key=lambda d: d["name"],
            ),
            "controls": [
                {
                    "type": c.type,
                    "image": c.image_digest,
                    "scale": c.scale,
                    "preprocess": c.preprocess,
                    "model": c.model.digest,
                    "detector": c.detector,
                    "detector_params": c.detector_params,
                    # Only when an annotator folder is used, so keys of other controls never change.
                    **({"annotator": c.annotator_digest} if c.annotator_digest is not None else {}),
                }
                for c in self.controls
            ],
            # Finishing passes, only when set, so that keys of jobs without them never change.
            **pass_pixel_fields(self.passes),
            # Only when set, so that keys of specs without an IP-Adapter never change.
            **({"ip_adapter": {"model": self.ip_adapter.digest, "encoder": self.ip_adapter.encoder_digest,
                               "images": list(self.ip_adapter.image_digests), "scale": self.ip_adapter.scale}}
               if self.ip_adapter is not None else {}),
        }


def job_key(job: RenderJob) -> str:
    """The job's cache key: sha256 of the canonical JSON of its pixel fields."""
    return hashlib.sha256(canonical_json(job.pixel_fields()).encode()).hexdigest()
