"""Samples during training, rendered by the renderer (`JobRenderer`) with the current LoRA.

The trainer does not sample by itself: it writes the current LoRA to a file, builds
ordinary `RenderJob`s that use it, and asks the renderer for pixels. So a sample shows
exactly what `castbook render` will show with that LoRA.
"""

from __future__ import annotations

import io
from pathlib import Path

from core.files import atomic_write_bytes
from schemas.job import RenderJob, ResolvedLora


def sample_jobs(trainer, lora_path: Path, lora_digest: str) -> list[RenderJob]:
    from schemas.expand import job_key

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
    the run folder) and the mean CLIP-I to the references (None without references)."""
    from core.digests import file_digest
    from trainer.export import save_diffusers_lora
    from trainer.train import CHECKPOINT_PREFIX

    folder = trainer.paths.samples / f"{CHECKPOINT_PREFIX}{trainer.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    lora_path = save_diffusers_lora(trainer, folder / "lora.safetensors", trainer.lora_layers(),
                                    trainer.header_metadata())
    renderer = renderer_for(trainer)
    was_training = trainer.models.unet.training
    images = []

    for i, job in enumerate(sample_jobs(trainer, lora_path, file_digest(lora_path))):
        out = renderer.render(job)
        buf = io.BytesIO()
        out.image.save(buf, format="PNG")
        path = folder / f"{job.scene}-seed-{job.seed}.png"
        atomic_write_bytes(path, buf.getvalue())
        images.append(path.relative_to(trainer.paths.run_dir).as_posix())
    trainer.models.unet.train(was_training)
    score = clip_i_score(trainer, [trainer.paths.run_dir / p for p in images])
    return images, score


def clip_i_score(trainer, images: list[Path]) -> float | None:
    ev = trainer.spec.evaluation
    if not ev.references:
        return None
    try:
        from reports.metrics import ClipScorer, clip_i
    except ImportError:
        trainer.notes.append("CLIP-I skipped: reports.metrics is not available")
        return None
    if not hasattr(trainer, "_scorer"):
        weights = trainer.root / ev.scoring_weights if ev.scoring_weights else None
        trainer._scorer = ClipScorer(ev.scoring_model, weights=weights, cache_dir=trainer.paths.cache / "clip")
    scorer = trainer._scorer
    refs = scorer.embed_images([trainer.root / r for r in ev.references])
    embs = scorer.embed_images(images)
    return float(sum(clip_i(e, refs)[0] for e in embs) / len(embs))
