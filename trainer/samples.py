"""Samples during training, rendered by the renderer (`JobRenderer`) with the current LoRA.

The trainer does not sample by itself: it writes the current LoRA to a file, builds
ordinary `RenderJob`s that use it, and asks the renderer for pixels. So a sample shows
exactly what `castbook render` will show with that LoRA.

Scoring is passed in, not imported: the trainer gets a `ScoreImages` callable (sample
images, reference images -> mean CLIP-I) from its caller; `castbook train` builds one from
`reports.metrics`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from core.digests import file_digest
from core.files import atomic_write_bytes
from schemas.job import RenderJob, ResolvedLora, job_key
from schemas.training import TrainingSpec
from trainer.export import save_diffusers_lora

# (sample images, reference images) -> mean CLIP-I of the samples to the references.
ScoreImages = Callable[[list[Path], list[Path]], float]
# (spec, project root) -> the scorer for that spec's `evaluation` settings, or None without references.
# A module-level function crosses to a Ray worker by reference, where it builds the scorer.
MakeScorer = Callable[[TrainingSpec, Path], "ScoreImages | None"]

SAMPLE_PREFIX = "step-"


def sample_folder(samples: Path, step: int) -> Path:
    """Where the samples of `step` and the LoRA file they were rendered with are written."""
    return samples / f"{SAMPLE_PREFIX}{step:06d}"


def sample_jobs(trainer, lora_path: Path, lora_digest: str) -> list[RenderJob]:
    spec, sm = trainer.spec, trainer.spec.samples
    lora = ResolvedLora(
        name=spec.output.name,  # same name each step: the renderer reloads it when the digest changes
        path=lora_path.relative_to(trainer.root).as_posix(),
        digest=lora_digest,
        weight=1.0,
        kind=spec.kind,
    )
    jobs = []
    for p_i, prompt in enumerate(sm.prompts):
        for seed in sm.seeds:
            job = RenderJob(
                key="", name=f"train/{spec.output.name}/step-{trainer.step:06d}/p{p_i}/seed-{seed}",
                job="train", character=None, scene=f"p{p_i}", preset="sample", prompt=prompt,
                negative_prompt=sm.preset.negative_prompt, seed=seed, width=sm.preset.width,
                height=sm.preset.height, num_inference_steps=sm.preset.num_inference_steps,
                guidance_scale=sm.preset.guidance_scale, scheduler=sm.preset.scheduler, dtype="auto",
                base_model=trainer.resolved, loras=(lora,),
            )
            jobs.append(job.model_copy(update={"key": job_key(job)}))
    return jobs


def renderer_for(trainer):
    if trainer._renderer is None:
        from renderer.pipeline import JobRenderer

        trainer._renderer = JobRenderer(trainer.root, device=trainer.models.device)
    return trainer._renderer


def render_step(trainer) -> tuple[list[str], float | None]:
    """Render the sample prompts with the current weights; returns image paths (relative to
    the run folder) and the mean CLIP-I to the references (None without references or scorer)."""
    folder = sample_folder(trainer.paths.samples, trainer.step)
    folder.mkdir(parents=True, exist_ok=True)
    lora_path = save_diffusers_lora(folder / "lora.safetensors", trainer.lora_layers(), trainer.adapter_configs(),
                                    trainer.header_metadata())
    renderer = renderer_for(trainer)
    was_training = trainer.models.unet.training
    images = []
    for job in sample_jobs(trainer, lora_path, file_digest(lora_path)):
        out = renderer.render(job)
        buf = io.BytesIO()
        out.image.save(buf, format="PNG")
        path = folder / f"{job.scene}-seed-{job.seed}.png"
        atomic_write_bytes(path, buf.getvalue())
        images.append(path.relative_to(trainer.paths.run_dir).as_posix())
    trainer.models.unet.train(was_training)
    references = trainer.spec.evaluation.references
    if not references or trainer.score_images is None:
        return images, None
    score = trainer.score_images([trainer.paths.run_dir / p for p in images], [trainer.root / r for r in references])
    return images, float(score)
