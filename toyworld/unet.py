"""Stage 2 of the toy base model: the tiny SDXL UNet trained from random init on cached latents.

The tiny SDXL-architecture UNet (STACK.md, `sample_size=16`) with SDXL's added conditioning
(pooled text + time ids), offset noise from step 0 (without it colours drift to grey), Min-SNR
weighting, EMA weights and caption dropout for classifier-free guidance.

The text encoders and tokenizers are the frozen, random ones of `builtin:tiny-sdxl`
(`renderer.builtins.build_tiny_sdxl_components`, seed 0): the conditioning is learnt by the UNet's
cross-attention. Every caption's embedding is computed once with the real
`StableDiffusionXLPipeline.encode_prompt`, so training sees exactly what inference sees. With
`train_text_encoders` the encoders train too and every batch is encoded as it comes.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

from schemas.toy import UnetSpec
from toyworld.loop import Ema, min_snr_weighted, noise_scheduler, seeded, train_loop

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def build_unet(latent_size: int = 16, latent_channels: int = 4):
    """The tiny SDXL UNet of STACK.md, sized for 16x16 latents."""
    from diffusers import UNet2DConditionModel

    from renderer.builtins import tiny_unet_config

    return UNet2DConditionModel(**tiny_unet_config(sample_size=latent_size, latent_channels=latent_channels))


def frozen_text_parts() -> dict:
    """Text encoders, tokenizers and scheduler of `builtin:tiny-sdxl` (random, frozen)."""
    import torch

    from renderer.builtins import build_tiny_sdxl_components

    with torch.random.fork_rng(devices=[]):  # it seeds the global RNG for each component
        comps = build_tiny_sdxl_components()
    for k in TEXT_ENCODERS:
        comps[k].requires_grad_(False).eval()
    return {k: comps[k] for k in (*TEXT_ENCODERS, "tokenizer", "tokenizer_2", "scheduler")}


def make_pipeline(unet, vae, text_parts: dict):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, unet=unet, force_zeros_for_empty_prompt=True, **text_parts,
    )


def caption_embeddings(pipe, captions: list[str], batch: int = 256):
    """Unique captions -> (index per caption, prompt_embeds U x 77 x 64, pooled U x 32).

    Computed with the pipeline's own `encode_prompt`, so training sees what inference sees.
    """
    import torch

    unique = sorted(set(captions))
    pos = {c: i for i, c in enumerate(unique)}
    embeds, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(unique), batch):
            e, _, p, _ = pipe.encode_prompt(unique[i : i + batch], device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            embeds.append(e)
            pooled.append(p)
    index = torch.tensor([pos[c] for c in captions], dtype=torch.long)
    return index, torch.cat(embeds), torch.cat(pooled)


def time_ids(size: int, batch: int):
    """SDXL added time ids for an uncropped square image: (orig h, w, crop top, left, target h, w)."""
    import torch

    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)


def unet_loss(unet, latents, embeds, pooled, scheduler, spec, size: int, generator):
    """One denoising loss: epsilon prediction, offset noise, Min-SNR weights.

    `scheduler` is `loop.noise_scheduler(...)`; `spec` supplies `noise_offset` and `snr_gamma`.
    """
    import torch

    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if spec.noise_offset:
        noise = noise + spec.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(size, b)}).sample
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    if spec.snr_gamma:
        per = min_snr_weighted(per, scheduler, t, spec.snr_gamma)
    return per.mean()


def unet_lr(spec: UnetSpec, total: int) -> Callable[[int], float]:
    """Linear warm-up times cosine decay to `final_lr_fraction` over `total` steps."""

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
        progress = min(1.0, step / max(1, total))
        cos = spec.final_lr_fraction + (1 - spec.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return spec.learning_rate * warm * cos

    return lr_at


class UnetData:
    """Everything the UNet loop samples from: latents (scaled), caption index, embeddings.

    `texts` (the unique captions, in `index` order) is what a run that trains the text encoders
    encodes; `embeds`/`pooled` are the frozen encoders' cached outputs (None when they train).
    """

    def __init__(self, latents, index, embeds, pooled, empty_embeds, empty_pooled, texts: list[str] | None = None):
        self.latents, self.index = latents, index
        self.embeds, self.pooled = embeds, pooled
        self.empty_embeds, self.empty_pooled = empty_embeds, empty_pooled
        self.texts = texts

    def batch(self, n: int, dropout: float, generator):
        import torch

        idx = torch.randint(0, len(self.latents), (n,), generator=generator)
        e = self.embeds[self.index[idx]].clone()
        p = self.pooled[self.index[idx]].clone()
        drop_captions(e, p, self.empty_embeds, self.empty_pooled, dropout, generator)
        return self.latents[idx], e, p

    def caption_batch(self, n: int, dropout: float, generator):
        """(latents, prompts, zero mask) with the same random draws as `batch`: the dropped captions'
        prompts are "" and the zero mask marks those whose embeddings must become zeros."""
        import torch

        idx = torch.randint(0, len(self.latents), (n,), generator=generator)
        zero, empty = dropout_masks(n, dropout, generator)
        prompts = ["" if (z or m) else self.texts[int(self.index[i])] for i, z, m in zip(idx, zero, empty)]
        return self.latents[idx], prompts, zero


def drop_captions(embeds, pooled, empty_embeds, empty_pooled, dropout: float, generator) -> None:
    """Caption dropout for classifier-free guidance, in place: half of the dropped captions become
    zeros (what the pipeline uses for a missing negative prompt, force_zeros_for_empty_prompt),
    half the encoded "" (what it uses for negative_prompt="")."""
    zero, empty = dropout_masks(len(embeds), dropout, generator)
    embeds[zero] = 0
    pooled[zero] = 0
    embeds[empty] = empty_embeds
    pooled[empty] = empty_pooled


def dropout_masks(n: int, dropout: float, generator):
    """(zero, empty) boolean masks for caption dropout: one uniform draw per sample."""
    import torch

    r = torch.rand(n, generator=generator)
    return r < dropout / 2, (r >= dropout / 2) & (r < dropout)


def encode_captions(pipe, prompts: list[str], zero):
    """prompt_embeds and pooled embeddings through the pipeline's own encode_prompt (gradients flow
    into its text encoders), zeroed where `zero` is set (force_zeros_for_empty_prompt)."""
    e, _, p, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    keep = (~zero).to(e.dtype)
    return e * keep.view(-1, 1, 1), p * keep.view(-1, 1)


def train_unet(data: UnetData, spec: UnetSpec, seed: int, size: int, scheduler_config,
               log: Callable[[str], None] = print, steps: int | None = None,
               checkpoint: Callable[[int, object], None] | None = None, checkpoint_every: int = 500,
               text_parts: dict | None = None):
    """Train the UNet from scratch; returns (ema_unet, losses, steps_done, seconds).

    With `spec.train_text_encoders`, `text_parts` (from `frozen_text_parts`) are trained too: the
    loop trains copies, and on return `text_parts["text_encoder"]`/`["text_encoder_2"]` hold their
    EMA weights, like the returned UNet.
    """
    import torch

    # 1. the model, its EMA copy and, optionally, trainable copies of the text encoders
    with seeded(seed):
        unet = build_unet(data.latents.shape[-1], data.latents.shape[1])
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    groups = [{"params": params, "lr": 1.0}]  # lr: a share of the recipe's lr; train_loop sets it from unet_lr
    text_pipe = None
    if spec.train_text_encoders:
        if text_parts is None or data.texts is None:
            raise ValueError("train_text_encoders needs text_parts and UnetData.texts (the unique captions)")
        encoders = {k: copy.deepcopy(text_parts[k]).train().requires_grad_(True) for k in TEXT_ENCODERS}
        text_pipe = make_pipeline(unet, None, {**text_parts, **encoders})
        te_params = [q for k in TEXT_ENCODERS for q in encoders[k].parameters()]
        groups.append({"params": te_params,
                       "lr": (spec.text_encoder_learning_rate or spec.learning_rate) / spec.learning_rate})
        params = params + te_params
        for k in TEXT_ENCODERS:
            text_parts[k].eval().requires_grad_(False)
            ema_params += list(text_parts[k].parameters())
    # 2. optimizer, noise, batches
    opt = torch.optim.AdamW(groups, lr=1.0, weight_decay=spec.weight_decay)
    scheduler = noise_scheduler(scheduler_config)
    g = torch.Generator().manual_seed(seed + 2)
    total = spec.steps if steps is None else steps

    def step_loss(step: int):
        if text_pipe is None:
            lat, e, p = data.batch(spec.batch_size, spec.caption_dropout, g)
        else:
            lat, prompts, zero = data.caption_batch(spec.batch_size, spec.caption_dropout, g)
            e, p = encode_captions(text_pipe, prompts, zero)
        return unet_loss(unet, lat, e, p, scheduler, spec, size, g)

    # 3. train
    run = train_loop(step_loss, opt, unet_lr(spec, total), total, clip_params=params,
                     max_grad_norm=spec.max_grad_norm, name="unet", log=log, log_every=50,
                     batch_size=spec.batch_size, ema=Ema(ema_params, params, spec.ema_decay),
                     checkpoint=(lambda done: checkpoint(done, ema)) if checkpoint else None,
                     checkpoint_every=checkpoint_every, stop_after=spec.stop_after, max_minutes=spec.max_minutes)
    return ema, run.losses, run.done, run.seconds
