"""Stage 1 and 3 of the toy base model: the VAE, trained as an autoencoder, then its decoder sharpened.

A small 3-level `AutoencoderKL` (4x downsampling, 64x64 images -> 16x16x4 latents) trained on
whole generated images (MSE + L1 + a tiny KL). Why 3 levels: 16x16 latents made UNet training
~4.4x faster than 32x32 at equal quality. Stage 3 trains only the decoder on the frozen encoder's
posterior means (what the UNet produces), so the UNet trained on those latents stays valid.
"""

from __future__ import annotations

import math
from typing import Callable

from schemas.toy import VaeSpec
from toyworld.data import to_unit
from toyworld.loop import seeded, train_loop


def build_vae(spec: VaeSpec):
    from diffusers import AutoencoderKL

    n = len(spec.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups,
        latent_channels=spec.latent_channels,
        sample_size=64,
    )


def vae_lr(learning_rate: float, warmup_steps: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10 % (the VAE's and the decoder's schedule)."""

    def lr_at(step: int) -> float:
        return learning_rate * min(1.0, (step + 1) / max(1, warmup_steps)) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))

    return lr_at


def vae_loss(vae, x, spec: VaeSpec, generator=None):
    """Reconstruction (MSE + L1) + tiny KL, on a batch in [-1, 1]."""
    import torch.nn.functional as F

    post = vae.encode(x).latent_dist
    z = post.sample(generator=generator)
    rec = vae.decode(z).sample
    kl = post.kl().mean() / x[0].numel()
    return F.mse_loss(rec, x) + spec.l1_weight * F.l1_loss(rec, x) + spec.kl_weight * kl


def train_vae(images_u8, spec: VaeSpec, seed: int, log: Callable[[str], None] = print, steps: int | None = None):
    """Train the VAE as an autoencoder; returns (vae, losses). Sets `scaling_factor` from the data."""
    import torch

    with seeded(seed):
        vae = build_vae(spec)
    vae.train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)  # lr: train_loop sets it from vae_lr
    g = torch.Generator().manual_seed(seed + 1)
    steps = spec.steps if steps is None else steps

    def step_loss(step: int):
        idx = torch.randint(0, len(images_u8), (spec.batch_size,), generator=g)
        return vae_loss(vae, to_unit(images_u8[idx]), spec, generator=g)

    run = train_loop(step_loss, opt, vae_lr(spec.learning_rate, spec.warmup_steps, steps), steps,
                     clip_params=params, name="vae", log=log, log_every=100, batch_size=spec.batch_size)
    vae.eval()
    lat = encode_latents(vae, images_u8[: min(512, len(images_u8))])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae, run.losses


def finetune_decoder(vae, images_u8, spec: VaeSpec, seed: int, log: Callable[[str], None] = print,
                     steps: int | None = None, latents=None):
    """Train only the decoder on the frozen encoder's posterior means (what the UNet produces).

    Returns (vae, losses); the encoder, quant_conv and scaling_factor are untouched.
    """
    import torch
    import torch.nn.functional as F

    latents = encode_latents(vae, images_u8) if latents is None else latents
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)  # lr: train_loop sets it from vae_lr
    g = torch.Generator().manual_seed(seed + 4)
    steps = spec.decoder_steps if steps is None else steps

    def step_loss(step: int):
        idx = torch.randint(0, len(images_u8), (spec.batch_size,), generator=g)
        x = to_unit(images_u8[idx])
        rec = vae.decode(latents[idx]).sample
        return F.mse_loss(rec, x) + spec.l1_weight * F.l1_loss(rec, x)

    run = train_loop(step_loss, opt, vae_lr(spec.decoder_learning_rate, 50, steps), steps, clip_params=params,
                     name="decoder", log=log, log_every=100, batch_size=spec.batch_size)
    vae.eval().requires_grad_(False)
    return vae, run.losses


def encode_latents(vae, images_u8, batch: int = 256):
    """Posterior means (unscaled), deterministic."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            out.append(vae.encode(to_unit(images_u8[i : i + batch])).latent_dist.mean)
    return torch.cat(out)
