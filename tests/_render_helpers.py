"""Hand-built RenderJobs for the renderer-core tests (no plan/spec needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from schemas.job import RenderJob, ResolvedControl, ResolvedLora, ResolvedModel

TINY = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest="builtin:tiny-sdxl@1")
TINY_CN = ResolvedModel(ref="builtin:tiny-controlnet", kind="builtin", digest="builtin:tiny-controlnet@1")
LORA_DIR = "specs/examples/loras"


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lora(root: Path, name: str, weight: float = 0.8, file: str | None = None) -> ResolvedLora:
    rel = f"{LORA_DIR}/{file or name}.safetensors"
    return ResolvedLora(name=name, path=rel, digest=digest(root / rel), weight=weight, kind="character")


def control(root: Path, image: str, type_: str = "canny", preprocess: bool = False, scale: float = 1.0,
            detector: str | None = None, annotator_dir: str | None = None, params: dict | None = None) -> ResolvedControl:
    return ResolvedControl(
        type=type_, image=image, image_digest=digest(root / image), scale=scale, preprocess=preprocess,
        model=TINY_CN, detector=detector or ("none" if not preprocess else type_),
        detector_params=params or {}, annotator_dir=annotator_dir,
    )


def job(**kw) -> RenderJob:
    base = dict(
        key="test", name="t/luca/beach/draft/seed-1", job="t", character="luca", scene="beach", preset="draft",
        prompt="a photo of luca on the beach", negative_prompt="blurry", seed=1, width=64, height=64,
        num_inference_steps=2, guidance_scale=5.0, scheduler="euler", dtype="auto", base_model=TINY,
    )
    base.update(kw)
    return RenderJob(**base)
