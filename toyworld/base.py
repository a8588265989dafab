"""Train the toy-world base model (`builtin:toy-sdxl`) from scratch on a CPU.

Two stages, one spec (`specs/toy/toy-base.yaml`):

1. VAE: a small 3-level `AutoencoderKL` (4x downsampling, 64x64 images -> 16x16x4
   latents) trained as an autoencoder on whole generated images (MSE + L1 + a tiny KL).
   Why 3 levels: 16x16 latents made UNet training ~4.4x faster than 32x32 at equal quality.
2. UNet: the tiny SDXL-architecture UNet (STACK.md, `sample_size=16`), trained from random
   init on cached latents with SDXL's added conditioning (pooled text + time ids), offset
   noise from step 0 (without it colours drift to grey), Min-SNR weighting, EMA weights and
   caption dropout for classifier-free guidance.

The text encoders and tokenizers are the frozen, random ones of `builtin:tiny-sdxl`
(`renderer.models.build_tiny_sdxl_components`, seed 0): the conditioning is learnt by the
UNet's cross-attention. Every caption's embedding is computed once with the real
`StableDiffusionXLPipeline.encode_prompt`, so training sees exactly what inference sees.

The result is a normal diffusers folder (`StableDiffusionXLPipeline.from_pretrained(folder,
torch_dtype=torch.float32)`), all weights as fp16 safetensors.

Determinism: fixed thread count, `torch.use_deterministic_algorithms(True)`, seeded
generators; the same spec on the same machine gives the same files (when the run stops at
`steps`, not at the `max_minutes` safety cap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------- the spec


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToyDataSpec(_Frozen):
    seed: int = 0  # toy-world generator seed
    count: int = Field(20000, ge=1)  # images generated in memory (hold-outs excluded)
    size: int = Field(64, ge=32)
    holdout: Literal["default", "none"] = "default"


class VaeSpec(_Frozen):
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 3 levels: 4x downsampling, ~0.68 M params
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    latent_channels: int = Field(4, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    l1_weight: float = Field(0.5, ge=0)
    # Stage 3: sharpen the decoder with the encoder frozen. The latents do not change, so the
    # UNet (trained on them) stays valid; it can run beside the UNet stage on a second core.
    decoder_steps: int = Field(0, ge=0)
    decoder_learning_rate: float = Field(1e-3, gt=0)
    decoder_images: int | None = Field(None, ge=1)  # first N training images only (cheaper to encode)


class UnetSpec(_Frozen):
    steps: int = Field(6000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    final_lr_fraction: float = Field(0.1, ge=0, le=1)  # cosine decay to this share of the lr
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    noise_offset: float = Field(0.1, ge=0)  # offset noise, from the first step
    snr_gamma: float | None = Field(5.0, gt=0)  # Min-SNR weighting; null = plain MSE
    ema_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)  # share of uncond samples, for CFG
    max_minutes: float | None = Field(None, gt=0)  # safety cap: stop early, keep what was learnt
    # Stop at this step but keep the learning-rate schedule of `steps`: two recipes compared at
    # equal budget see the same learning rates (and, frozen vs trained text encoders, the same batches).
    stop_after: int | None = Field(None, ge=1)
    # Also train both text encoders (random init, the tiny-sdxl ones) with the UNet. Caption
    # embeddings can then not be cached: every batch is encoded with the pipeline's encode_prompt.
    train_text_encoders: bool = False
    text_encoder_learning_rate: float | None = Field(None, gt=0)  # default: learning_rate


class EvalSpec(_Frozen):
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    seed: int = 1000
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)  # first N prompts of the grid only (smoke runs)


class ToyBaseSpec(_Frozen):
    """A whole from-scratch base-model run (VAE then UNet)."""

    seed: int = 0  # torch seed for init, batches and noise
    # Fixed: the thread count changes float results. 1 thread is also ~5x faster than 2 on a
    # CPU shared with other processes (OpenMP threads spin waiting for each other).
    threads: int = Field(1, ge=1)
    data: ToyDataSpec = ToyDataSpec()
    vae: VaeSpec = VaeSpec()
    unet: UnetSpec = UnetSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint_every: int = Field(500, ge=1)  # UNet steps between checkpoints in work_dir
    work_dir: str = "/tmp/castbook-toy-base"  # checkpoints, so progress is never lost
    output: str = "renderer/weights/toy/sdxl"  # diffusers folder, relative to the project root


def load_base_spec(path: Path) -> ToyBaseSpec:
    from schemas.loader import load_yaml_model

    return load_yaml_model(Path(path), ToyBaseSpec)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- helpers


def set_determinism(seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, fsync, replace)."""
    from safetensors.torch import save

    from core.files import atomic_write_bytes  # the one atomic-write implementation

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def toy_images(count: int, seed: int, size: int = 64, holdout: str = "default"):
    """(uint8 tensor N x 3 x size x size, captions) generated in memory, no files."""
    import numpy as np
    import torch

    from toyworld import world as tw

    hold = tw.holdout_by_name(holdout)
    arr = np.empty((count, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        img, label = tw.generate_one(seed, i, size, hold)
        arr[i] = np.asarray(img)
        captions.append(label.caption)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images_u8):
    return images_u8.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- models


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


def build_unet(latent_size: int = 16, latent_channels: int = 4):
    """The tiny SDXL UNet of STACK.md, sized for 16x16 latents."""
    from diffusers import UNet2DConditionModel

    from renderer.models import tiny_unet_config

    return UNet2DConditionModel(**tiny_unet_config(sample_size=latent_size, latent_channels=latent_channels))


def frozen_text_parts() -> dict:
    """Text encoders, tokenizers and scheduler of `builtin:tiny-sdxl` (random, frozen)."""
    from renderer.models import build_tiny_sdxl_components

    comps = build_tiny_sdxl_components()
    for k in ("text_encoder", "text_encoder_2"):
        comps[k].requires_grad_(False).eval()
    return {k: comps[k] for k in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}


def make_pipeline(unet, vae, text_parts: dict):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=vae, unet=unet, force_zeros_for_empty_prompt=True, **text_parts,
    )


# ----------------------------------------------------------------------------- VAE stage


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

    torch.manual_seed(seed)
    vae = build_vae(spec)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    steps = spec.steps if steps is None else steps
    losses = []
    t0 = time.time()
    for step in range(steps):
        lr = spec.learning_rate * min(1.0, (step + 1) / max(1, spec.warmup_steps)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images_u8), (spec.batch_size,), generator=g)
        loss = vae_loss(vae, to_unit(images_u8[idx]), spec, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f} lr {lr:.2e} {time.time() - t0:.0f}s")
    vae.eval()
    lat = encode_latents(vae, images_u8[: min(512, len(images_u8))])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae, losses


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
    opt = torch.optim.AdamW(params, lr=spec.decoder_learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 4)
    steps = spec.decoder_steps if steps is None else steps
    losses, t0 = [], time.time()
    for step in range(steps):
        lr = spec.decoder_learning_rate * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images_u8), (spec.batch_size,), generator=g)
        x = to_unit(images_u8[idx])
        rec = vae.decode(latents[idx]).sample
        loss = F.mse_loss(rec, x) + spec.l1_weight * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step + 1}/{steps} loss {loss.item():.5f} lr {lr:.2e} {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    return vae, losses


def encode_latents(vae, images_u8, batch: int = 256):
    """Posterior means (unscaled), deterministic."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            out.append(vae.encode(to_unit(images_u8[i : i + batch])).latent_dist.mean)
    return torch.cat(out)


# ----------------------------------------------------------------------------- UNet stage


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


def alphas_cumprod(scheduler_config) -> "torch.Tensor":
    """SDXL's training noise schedule (scaled_linear betas), as the inference scheduler has it."""
    import torch

    n = scheduler_config["num_train_timesteps"]
    b0, b1 = scheduler_config["beta_start"], scheduler_config["beta_end"]
    betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def time_ids(size: int, batch: int):
    """SDXL added time ids for an uncropped square image: (orig h, w, crop top, left, target h, w)."""
    import torch

    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch, 1)


def unet_loss(unet, latents, embeds, pooled, ac, spec: UnetSpec, size: int, generator):
    """One denoising loss: epsilon prediction, offset noise, Min-SNR weights."""
    import torch

    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if spec.noise_offset:
        noise = noise + spec.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    t = torch.randint(0, len(ac), (b,), generator=generator)
    a = ac[t].view(b, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(size, b)}).sample
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    if spec.snr_gamma:
        snr = ac[t] / (1 - ac[t])
        per = per * torch.clamp(snr, max=spec.snr_gamma) / snr
    return per.mean()


def _lr_at(spec: UnetSpec, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
    progress = min(1.0, step / max(1, total))
    cos = spec.final_lr_fraction + (1 - spec.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    return spec.learning_rate * warm * cos


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

    torch.manual_seed(seed)
    unet = build_unet(data.latents.shape[-1], data.latents.shape[1])
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    groups = [{"params": params, "lr_scale": 1.0}]
    text_pipe = None
    if spec.train_text_encoders:
        if text_parts is None or data.texts is None:
            raise ValueError("train_text_encoders needs text_parts and UnetData.texts (the unique captions)")
        encoders = {k: copy.deepcopy(text_parts[k]).train().requires_grad_(True) for k in ("text_encoder", "text_encoder_2")}
        text_pipe = make_pipeline(unet, None, {**text_parts, **encoders})
        te_params = [q for k in ("text_encoder", "text_encoder_2") for q in encoders[k].parameters()]
        groups.append({"params": te_params,
                       "lr_scale": (spec.text_encoder_learning_rate or spec.learning_rate) / spec.learning_rate})
        params = params + te_params
        for k in ("text_encoder", "text_encoder_2"):
            text_parts[k].eval().requires_grad_(False)
            ema_params += list(text_parts[k].parameters())
    opt = torch.optim.AdamW(groups, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    ac = alphas_cumprod(scheduler_config)
    g = torch.Generator().manual_seed(seed + 2)
    total = spec.steps if steps is None else steps
    losses, t0, done = [], time.time(), 0
    for step in range(total):
        if spec.max_minutes and time.time() - t0 > spec.max_minutes * 60:
            log(f"unet: stopping at step {step}/{total}: max_minutes={spec.max_minutes} reached")
            break
        if spec.stop_after and step >= spec.stop_after:
            log(f"unet: stopping at step {step}/{total}: stop_after={spec.stop_after}")
            break
        lr = _lr_at(spec, step, total)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        if text_pipe is None:
            lat, e, p = data.batch(spec.batch_size, spec.caption_dropout, g)
        else:
            lat, prompts, zero = data.caption_batch(spec.batch_size, spec.caption_dropout, g)
            e, p = encode_captions(text_pipe, prompts, zero)
        loss = unet_loss(unet, lat, e, p, ac, spec, size, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        opt.step()
        decay = min(spec.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [q.detach() for q in params], 1 - decay)
        losses.append(loss.item())
        done = step + 1
        if step % 50 == 0 or done == total:
            el = time.time() - t0
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"unet step {done}/{total} loss(avg50) {recent:.4f} lr {lr:.2e} {el:.0f}s "
                f"{done * spec.batch_size / max(el, 1e-9):.1f} img/s")
        if checkpoint and done % checkpoint_every == 0:
            checkpoint(done, ema)
    return ema, losses, done, time.time() - t0


# ----------------------------------------------------------------------------- export and eval


def save_pipeline(pipe, out: Path, dtype: str = "fp16") -> None:
    """save_pretrained into a temp folder next to `out`, then swap it in (never a half folder)."""
    import shutil

    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if dtype == "fp16":
            pipe = copy.deepcopy(pipe).to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # mkdtemp/mkstemp make 0700/0600; these folders are committed and shared.
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pipeline(folder: Path):
    """The committed base model as an fp32 pipeline (weights are stored as fp16)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        Path(folder), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)


def eval_prompts() -> list[tuple[str, dict]]:
    """The fixed prompt grid: every colour x shape x background outside the hold-outs
    (135 prompts); eye colour and expression cycle so every value appears."""
    from toyworld import world as tw

    out = []
    eyes, exprs = list(tw.EYE_COLOURS), list(tw.EXPRESSIONS)
    for colour in tw.COLOURS:
        for shape in tw.SHAPES:
            if tw._is_held_out(colour, shape, "green", tw.HOLDOUT):
                continue
            for background in tw.BACKGROUNDS:
                i = len(out)
                e, x = eyes[i % len(eyes)], exprs[(i // len(eyes)) % len(exprs)]
                prompt = tw.caption_for(colour, shape, e, x, background)
                out.append((prompt, {"colour": colour, "shape": shape, "background": background,
                                     "eyes": e, "expression": x}))
    return out


def render_grid(pipe, prompts: list[str], spec: EvalSpec, size: int = 64, negative_prompt: str = ""):
    import torch

    images = []
    for i in range(0, len(prompts), spec.batch_size):
        chunk = prompts[i : i + spec.batch_size]
        gens = [torch.Generator("cpu").manual_seed(spec.seed + i + j) for j in range(len(chunk))]
        with torch.no_grad():
            out = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk), num_inference_steps=spec.steps,
                       guidance_scale=spec.guidance_scale, width=size, height=size, generator=gens)
        images.extend(out.images)
    return images


def evaluate_pipeline(pipe, spec: EvalSpec, size: int = 64, limit: int | None = None, save_dir: Path | None = None):
    """Render the prompt grid and read it back with `toyworld.checker`; returns the result dict."""
    from toyworld import checker as ev

    grid = eval_prompts()[:limit] if limit else eval_prompts()
    images = render_grid(pipe, [p for p, _ in grid], spec, size)
    if save_dir:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for k, (img, (prompt, _)) in enumerate(zip(images, grid)):
            img.save(save_dir / f"grid-{k:03d}.png")
            (save_dir / f"grid-{k:03d}.txt").write_text(prompt + "\n")
    return ev.evaluate([(img, {"name": f"grid-{k:03d}", **exp}) for k, (img, (_, exp)) in enumerate(zip(images, grid))])


def accuracy_row(result: dict) -> dict:
    return {k: v["accuracy"] for k, v in result["attributes"].items()}


# ----------------------------------------------------------------------------- the whole run


def run_base(spec: ToyBaseSpec, root: Path, log: Callable[[str], None] = print,
             skip_vae_if_cached: bool = True, do_eval: bool = True) -> dict:
    """VAE, latents, UNet, export to `root/spec.output`, eval. Returns the training record."""
    import torch
    from diffusers import AutoencoderKL

    set_determinism(spec.seed, spec.threads)
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"generating {spec.data.count} toy images (seed {spec.data.seed}, {spec.data.size}px)")
    images, captions = toy_images(spec.data.count, spec.data.seed, spec.data.size, spec.data.holdout)
    t_data = time.time() - t_start

    vae_dir = work / "vae"
    t0 = time.time()
    if skip_vae_if_cached and (vae_dir / "diffusion_pytorch_model.safetensors").exists() \
            and (work / "vae.spec.json").exists() and json.loads((work / "vae.spec.json").read_text()) == _vae_key(spec):
        log(f"reusing the trained VAE in {vae_dir} (same spec)")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, use_safetensors=True)
    else:
        vae, vae_losses = train_vae(images, spec.vae, spec.seed, log)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        (work / "vae.spec.json").write_text(json.dumps(_vae_key(spec)))
        # Reload from files so the UNet trains on exactly the latents the saved VAE gives.
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, use_safetensors=True)
    vae.eval().requires_grad_(False)
    t_vae = time.time() - t0

    with torch.no_grad():
        x = to_unit(images[:256])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        vae_mse = float(((rec.clamp(-1, 1) - x) ** 2).mean())
    log(f"vae: reconstruction MSE {vae_mse:.5f} on 256 training images; scaling_factor {vae.config.scaling_factor:.4f}")

    t0 = time.time()
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    text = frozen_text_parts()
    unet0 = build_unet(latents.shape[-1], latents.shape[1])
    pipe = make_pipeline(unet0, vae, text)
    texts = sorted(set(captions))
    if spec.unet.train_text_encoders:  # nothing to cache: every batch is encoded as it comes
        position = {c: i for i, c in enumerate(texts)}
        index = torch.tensor([position[c] for c in captions], dtype=torch.long)
        data = UnetData(latents, index, None, None, None, None, texts=texts)
        what = "caption index (the text encoders train: no embedding cache)"
    else:
        index, embeds, pooled = caption_embeddings(pipe, captions)
        empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        data = UnetData(latents, index, embeds, pooled, empty_e[0], empty_p[0], texts=texts)
        what = f"{len(embeds)} caption embeddings"
    t_cache = time.time() - t0
    log(f"cached {len(latents)} latents {tuple(latents.shape[1:])} and {what} in {t_cache:.0f}s")

    def checkpoint(step: int, ema) -> None:
        if spec.unet.train_text_encoders:  # first, so an export never pairs a UNet with older encoders
            atomic_save_safetensors(_text_encoder_state(text), work / "text-encoders-ema.safetensors", {"step": str(step)})
        atomic_save_safetensors(dict(ema.state_dict()), work / "unet-ema.safetensors", {"step": str(step)})
        log(f"checkpoint: EMA UNet{' and text encoders' if spec.unet.train_text_encoders else ''} at step {step} -> {work}")

    ema, losses, done, t_unet = train_unet(data, spec.unet, spec.seed, spec.data.size, text["scheduler"].config,
                                           log, checkpoint=checkpoint, checkpoint_every=spec.checkpoint_every,
                                           text_parts=text)
    checkpoint(done, ema)
    t0 = time.time()
    if spec.vae.decoder_steps:
        vae = run_decoder_stage(spec, log, images=images, vae=vae)
    t_decoder = time.time() - t0
    pipe = make_pipeline(ema, vae, text)
    out = (root / spec.output) if not Path(spec.output).is_absolute() else Path(spec.output)
    save_pipeline(pipe, out)
    record = {
        "spec": spec.model_dump(mode="json"),
        "unet_steps_done": done,
        "seconds": {"data": round(t_data, 1), "vae": round(t_vae, 1), "cache": round(t_cache, 1),
                    "unet": round(t_unet, 1),
                    "decoder": round(t_decoder, 1), "total": round(time.time() - t_start, 1)},
        "unet_images_per_second": round(done * spec.unet.batch_size / max(t_unet, 1e-9), 1),
        "vae_reconstruction_mse": vae_mse,
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "threads": spec.threads,
        "torch": torch.__version__,
    }
    if do_eval:
        t0 = time.time()
        result = evaluate_pipeline(load_pipeline(out), spec.eval, spec.data.size, limit=spec.eval.limit,
                                   save_dir=work / "grid")
        record["eval"] = {"accuracy": accuracy_row(result), "count": result["count"],
                          "steps": spec.eval.steps, "guidance_scale": spec.eval.guidance_scale,
                          "seconds": round(time.time() - t0, 1)}
        log("eval: " + json.dumps(record["eval"]["accuracy"]))
    (out.parent / f"{out.name}.training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def run_decoder_stage(spec: ToyBaseSpec, log: Callable[[str], None] = print, images=None, vae=None):
    """Stage 3 on its own (cached in work_dir/vae-decoder by spec): needs the stage-1 VAE in work_dir.

    Independent of the UNet, so `castbook toymodel train-decoder` can run it on a second core
    while the UNet trains; `run_base` then finds the result and reuses it.
    """
    from diffusers import AutoencoderKL

    set_determinism(spec.seed, spec.threads)
    work = Path(spec.work_dir)
    out = work / "vae-decoder"
    key = _vae_key(spec) | {"decoder_steps": spec.vae.decoder_steps, "decoder_images": spec.vae.decoder_images,
                            "decoder_learning_rate": spec.vae.decoder_learning_rate}
    if (out / "diffusion_pytorch_model.safetensors").exists() and (work / "vae-decoder.spec.json").exists() \
            and json.loads((work / "vae-decoder.spec.json").read_text()) == key:
        log(f"reusing the fine-tuned decoder in {out} (same spec)")
        return AutoencoderKL.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    n = min(spec.vae.decoder_images or spec.data.count, spec.data.count)
    if images is None:  # the first n images: toy_images(n) is a prefix of toy_images(count)
        images, _ = toy_images(n, spec.data.seed, spec.data.size, spec.data.holdout)
    images = images[:n]
    if vae is None:
        if not (work / "vae.spec.json").exists() or json.loads((work / "vae.spec.json").read_text()) != _vae_key(spec):
            raise FileNotFoundError(f"no stage-1 VAE for this spec in {work / 'vae'}; run train-base first")
        vae = AutoencoderKL.from_pretrained(work / "vae", local_files_only=True, use_safetensors=True)
    vae, _ = finetune_decoder(vae, images, spec.vae, spec.seed, log)
    vae.save_pretrained(out, safe_serialization=True)
    (work / "vae-decoder.spec.json").write_text(json.dumps(key))
    return AutoencoderKL.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()


def _text_encoder_state(text_parts: dict) -> dict:
    return {f"{k}.{name}": t for k in ("text_encoder", "text_encoder_2") for name, t in text_parts[k].state_dict().items()}


def _load_text_encoder_state(text_parts: dict, tensors: dict) -> None:
    for k in ("text_encoder", "text_encoder_2"):
        part = {name[len(k) + 1:]: t for name, t in tensors.items() if name.startswith(k + ".")}
        text_parts[k].load_state_dict(part)


def _vae_key(spec: ToyBaseSpec) -> dict:
    vae = spec.vae.model_dump(mode="json", exclude={"decoder_steps", "decoder_learning_rate", "decoder_images"})
    return {"vae": vae, "data": spec.data.model_dump(mode="json"),
            "seed": spec.seed, "threads": spec.threads}


def export_from_checkpoint(spec: ToyBaseSpec, root: Path, log: Callable[[str], None] = print,
                           do_eval: bool = True, note: str = "") -> dict:
    """Assemble the latest EMA UNet checkpoint in work_dir with the VAE (fine-tuned decoder when its
    stage finished) into `spec.output`, evaluate, and write the record. For a run that was stopped."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from safetensors.torch import load_file

    work = Path(spec.work_dir)
    ckpt = work / "unet-ema.safetensors"
    if not ckpt.exists():
        raise FileNotFoundError(f"no UNet checkpoint {ckpt}; run `castbook toymodel train-base` first")
    with safe_open(str(ckpt), "pt") as f:
        step = int(f.metadata().get("step", "0"))
    dec_key = work / "vae-decoder.spec.json"
    use_decoder = bool(spec.vae.decoder_steps) and dec_key.exists() and (work / "vae-decoder").exists()
    vae = AutoencoderKL.from_pretrained(work / ("vae-decoder" if use_decoder else "vae"), local_files_only=True,
                                        use_safetensors=True).eval()
    vae_mse = None
    images, _ = toy_images(256, spec.data.seed, spec.data.size, spec.data.holdout)
    import torch

    set_determinism(spec.seed, spec.threads)
    with torch.no_grad():
        x = to_unit(images)
        vae_mse = float(((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x) ** 2).mean())
    unet = build_unet(spec.data.size // 4, vae.config.latent_channels)
    unet.load_state_dict(load_file(ckpt))
    unet.eval()
    text = frozen_text_parts()
    if spec.unet.train_text_encoders:
        te_ckpt = work / "text-encoders-ema.safetensors"
        with safe_open(str(te_ckpt), "pt") as f:
            te_step = int(f.metadata().get("step", "0"))
        if te_step != step:
            raise ValueError(f"{te_ckpt} is from step {te_step} but {ckpt} from step {step}; they must match")
        _load_text_encoder_state(text, load_file(te_ckpt))
    out = (root / spec.output) if not Path(spec.output).is_absolute() else Path(spec.output)
    save_pipeline(make_pipeline(unet, vae, text), out)
    log(f"exported EMA UNet step {step} + {'fine-tuned decoder' if use_decoder else 'stage-1 VAE'} -> {out}")
    record = {"spec": spec.model_dump(mode="json"), "unet_steps_done": step, "decoder_finetuned": use_decoder,
              "vae_reconstruction_mse": vae_mse, "threads": spec.threads, "torch": torch.__version__, "note": note}
    if do_eval:
        t0 = time.time()
        result = evaluate_pipeline(load_pipeline(out), spec.eval, spec.data.size, limit=spec.eval.limit,
                                   save_dir=work / "grid")
        record["eval"] = {"accuracy": accuracy_row(result), "count": result["count"], "steps": spec.eval.steps,
                          "guidance_scale": spec.eval.guidance_scale, "seconds": round(time.time() - t0, 1)}
        log("eval: " + json.dumps(record["eval"]["accuracy"]))
    (out.parent / f"{out.name}.training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
