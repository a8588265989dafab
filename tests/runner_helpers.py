"""Helpers for the runner/outputs tests: hand-built RenderJobs and a Plan holding them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from schemas.builtins import builtin_digest
from schemas.job import RenderJob, ResolvedLora, ResolvedModel
from schemas.plan import Plan
from schemas.spec import Spec

TINY = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest=builtin_digest("tiny-sdxl"))


def job_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_job(
    scene: str = "beach",
    seed: int = 1,
    prompt: str | None = None,
    loras: tuple[ResolvedLora, ...] = (),
    steps: int = 2,
    size: int = 64,
    scheduler: str = "euler_a",
    character: str = "luca",
) -> RenderJob:
    draft = RenderJob(
        key="",
        name=f"main/{character}/{scene}/draft/seed-{seed}",
        job="main",
        character=character,
        scene=scene,
        preset="draft",
        prompt=prompt if prompt is not None else f"photo of {character} at the {scene}",
        negative_prompt="blurry, lowres",
        seed=seed,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=5.0,
        scheduler=scheduler,
        dtype="fp32",
        base_model=TINY,
        loras=loras,
    )
    return draft.model_copy(update={"key": job_key(draft.pixel_fields())})


def make_plan(jobs: list[RenderJob], root: Path) -> Plan:
    """A `schemas.plan.Plan` of hand-built jobs (an empty spec: no LoRA registry, no characters)."""
    return Plan(spec=Spec(), jobs=list(jobs), root=Path(root), spec_files=[],
                scoring={"model": "builtin:tiny-clip", "weights": None})
