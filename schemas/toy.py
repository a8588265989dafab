"""The toy-world recipes (`specs/toy/*.yaml`): the base model, its ControlNet and the toy CLIP.

`castbook toymodel` trains them (toyworld/); `castbook validate` checks a recipe without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from schemas.base import Strict
from schemas.loader import load_yaml_model

# ----------------------------------------------------------------------------- the base model (toy-sdxl)


class ToyDataSpec(Strict):
    seed: int = 0  # toy-world generator seed
    count: int = Field(20000, ge=1)  # images generated in memory (hold-outs excluded)
    size: int = Field(64, ge=32)
    holdout: Literal["default", "none"] = "default"


class VaeSpec(Strict):
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


class UnetSpec(Strict):
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


class EvalSpec(Strict):
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    seed: int = 1000
    batch_size: int = Field(16, ge=1)
    limit: int | None = Field(None, ge=1)  # first N prompts of the grid only (smoke runs)


class ToyBaseSpec(Strict):
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


# ----------------------------------------------------------------------------- the ControlNet (toy-controlnet)


class ControlDataSpec(Strict):
    seed: int = 0  # toy-world generator seed (hold-outs excluded, like the base model's data)
    count: int = Field(5000, ge=1)  # images generated in memory
    size: int = Field(64, ge=32)


class ControlEvalSpec(Strict):
    count: int = Field(48, ge=1)  # held-out poses and prompts (generator seed `seed`)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    seed: int = 2000  # generator seed of the held-out labels and of the render noise
    conditioning_scale: float = Field(1.0, ge=0)  # controlnet_conditioning_scale (a spec's `scale:`)
    batch_size: int = Field(16, ge=1)


class ToyControlNetSpec(Strict):
    """A ControlNet training run on the toy base model."""

    seed: int = 0  # torch seed for init, batches and noise
    threads: int = Field(1, ge=1)  # fixed: the thread count changes float results
    data: ControlDataSpec = ControlDataSpec()
    steps: int = Field(1300, ge=1)
    batch_size: int = Field(16, ge=1)  # small batches, more steps: the zero-initialised path opens with steps
    learning_rate: float = Field(2e-3, gt=0)  # constant after warmup
    warmup_steps: int = Field(50, ge=0)
    noise_offset: float = Field(0.1, ge=0)  # as the base model was trained
    snr_gamma: float | None = Field(5.0, gt=0)  # Min-SNR weighting; null = plain MSE
    caption_dropout: float = Field(0.1, ge=0, le=1)  # uncond samples: CFG runs the ControlNet on them too
    control_dropout: float = Field(0.0, ge=0, le=1)  # share of samples with a black (empty) control image
    eval: ControlEvalSpec = ControlEvalSpec()
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints in work_dir
    work_dir: str = "/tmp/castbook-toy-controlnet"
    output: str = "renderer/weights/toy/controlnet"  # ControlNet diffusers folder, relative to the project root
    base: str = "renderer/weights/toy/sdxl"  # the frozen base model (diffusers folder)

    @model_validator(mode="after")
    def _held_out_eval(self):
        if self.eval.seed == self.data.seed:
            raise ValueError(f"eval.seed ({self.eval.seed}) equals data.seed: the eval poses would be training "
                             f"poses; choose another eval.seed")
        return self


# ----------------------------------------------------------------------------- the toy CLIP (toy-clip)


class ClipDataSpec(Strict):
    seed: int = 0
    count: int = Field(20000, ge=1)
    holdout: str = "default"
    eval_seed: int = 777  # held-out images: another generator seed, never trained on
    eval_count: int = Field(500, ge=2)


class ClipTrainSpec(Strict):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_minutes: float | None = Field(None, gt=0)


class ToyClipSpec(Strict):
    seed: int = 0
    threads: int = Field(1, ge=1)
    data: ClipDataSpec = ClipDataSpec()
    train: ClipTrainSpec = ClipTrainSpec()
    output: str = "renderer/weights/toy/clip"


# ----------------------------------------------------------------------------- the IP-Adapter (toy-ip-adapter)


class IpEncoderSpec(Strict):
    """The image encoder: a small `CLIPVisionModelWithProjection` whose `image_embeds` are colour /
    shape / eye-colour logits (8 + 6 + 4 = 18; an identity encoder, like the face-recognition
    embedding of IP-Adapter FaceID). Frozen while the adapter trains."""

    # toy-clip: the vision tower of builtin:toy-clip (renderer/weights/toy/clip) converted, with a
    # linear attribute probe, then optionally fine-tuned (finetune_*); trained: a new one from random init
    source: Literal["toy-clip", "trained"] = "toy-clip"
    clip: str = "renderer/weights/toy/clip"  # source toy-clip: the open_clip folder
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(8, ge=1)
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    projection_dim: Literal[18] = 18  # image_embeds size = the adapter's clip_embeddings_dim
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # keeps the logits bounded
    # toy-clip: steps of the linear probe on cached features; trained: steps of encoder-only training
    pretrain_steps: int = Field(0, ge=0)
    pretrain_batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    # toy-clip: the whole tower + probe, colour / eye colour on the pictures and shape on the same
    # pictures with a random body colour (toyworld.ip_encoder.recoloured)
    finetune_steps: int = Field(0, ge=0)
    finetune_batch_size: int = Field(64, ge=2)
    finetune_learning_rate: float = Field(5e-4, gt=0)
    recoloured_copies: int = Field(3, ge=1)


class IpDistillSpec(Strict):
    """Shares of the distillation samples. Teacher: the frozen base, adapter off, prompted with the
    target's full caption ("a brown heart character with green eyes on the beach")."""

    no_identity: float = Field(0.6, ge=0, le=1)  # student: the caption without colour and shape + references
    full: float = Field(0.15, ge=0, le=1)  # student: the full caption + references (must not overdo it)
    empty_prompt: float = Field(0.1, ge=0, le=1)  # student: "" + references
    negative: float = Field(0.15, ge=0, le=1)  # both "" with a zero embedding: the guidance negative stays
    # share of samples whose colour / shape / eye-colour slices come from three different pictures
    # that share only that attribute: teaches the tokens to combine
    attribute_mix: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _sum(self):
        total = self.no_identity + self.full + self.empty_prompt + self.negative
        if abs(total - 1) > 1e-6:
            raise ValueError(f"distill: no_identity + full + empty_prompt + negative must be 1, not {total:g}")
        return self


class IpEvalSpec(Strict):
    characters: list[str] = ["luca", "alberto", "giulia"]  # held-out characters (toyworld.world.CHARACTERS)
    per_character: int = Field(12, ge=1)  # renders per character (backgrounds cycle)
    references: int = Field(4, ge=1)  # reference images per character (generator seed `seed`)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    scale: float = Field(1.0, ge=0)  # set_ip_adapter_scale
    seed: int = 3000
    # full: "luca, a brown heart character with green eyes on the beach" (what a spec with the character's
    # description renders); no_identity: "luca, a character with green eyes on the beach"
    prompt: Literal["full", "no_identity"] = "full"


class ToyIpAdapterSpec(Strict):
    """An IP-Adapter training run on the frozen toy base model."""

    seed: int = 0
    threads: int = Field(1, ge=1)  # fixed: the thread count changes float results
    data: ControlDataSpec = ControlDataSpec()  # toy images generated in memory (hold-outs excluded)
    encoder: IpEncoderSpec = IpEncoderSpec()
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)  # constant after warmup
    warmup_steps: int = Field(50, ge=0)
    references_per_sample: int = Field(2, ge=1)  # other images of the same character, embeddings averaged
    ema_decay: float | None = Field(None, gt=0, lt=1)  # the exported adapter is the moving average
    distill: IpDistillSpec = IpDistillSpec()
    # the plain adapter's 4 tokens: which slice of the embedding each reads (its other weights stay 0);
    # None: every token reads the whole embedding
    token_slices: list[tuple[int, int]] | None = [(0, 8), (8, 14), (8, 14), (14, 18)]
    eval: IpEvalSpec = IpEvalSpec()
    checkpoint_every: int = Field(250, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    work_dir: str = "/tmp/castbook-toy-ip-adapter"
    output: str = "renderer/weights/toy/ip-adapter"  # adapter .safetensors + image_encoder/, relative to the root
    base: str = "renderer/weights/toy/sdxl"

    @model_validator(mode="after")
    def _slices(self):
        d = self.encoder.projection_dim
        if self.token_slices is not None and (len(self.token_slices) != 4 or any(
                not 0 <= a < b <= d for a, b in self.token_slices)):
            raise ValueError(f"token_slices: 4 [start, end) slices of the {d} embedding dimensions (a plain IP-Adapter "
                             f"has 4 tokens), got {self.token_slices}")
        return self


# ----------------------------------------------------------------------------- loaders


def load_base_spec(path: Path) -> ToyBaseSpec:
    return load_yaml_model(Path(path), ToyBaseSpec)  # type: ignore[return-value]


def load_controlnet_spec(path: Path) -> ToyControlNetSpec:
    return load_yaml_model(Path(path), ToyControlNetSpec)  # type: ignore[return-value]


def load_clip_spec(path: Path) -> ToyClipSpec:
    return load_yaml_model(Path(path), ToyClipSpec)  # type: ignore[return-value]


def load_ip_adapter_spec(path: Path) -> ToyIpAdapterSpec:
    return load_yaml_model(Path(path), ToyIpAdapterSpec)  # type: ignore[return-value]
