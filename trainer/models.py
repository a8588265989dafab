"""Model set-up for training: the base model through the renderer's loader, LoRA adapters on it,
and the views of the adapted weights that checkpoints and exports write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.digests import file_digest, folder_digest
from core.errors import JobError
from renderer.builtins import builtin_digest, builtin_name
from schemas.job import ResolvedModel
from schemas.training import TrainingSpec
from trainer.errors import TrainingError


@dataclass
class Models:
    pipe: Any
    unet: Any
    vae: Any
    noise_scheduler: Any
    text_encoders: list  # [te1, te2]
    device: str
    weight_dtype: Any
    autocast_dtype: Any  # None = no autocast
    mixed_precision: str


def resolve_base_model(spec: TrainingSpec, root: Path) -> ResolvedModel:
    """`base_model` string -> the `ResolvedModel` the renderer loads (same sources as rendering)."""
    ref = spec.base_model
    if ref.startswith("builtin:"):
        try:
            builtin_name(ref)
        except JobError as e:  # an unknown name: the message lists the known ones
            raise TrainingError(f"base_model: {e}") from e
        return ResolvedModel(ref=ref, kind="builtin", digest=builtin_digest(ref))
    path = root / ref
    if path.is_dir():
        return ResolvedModel(ref=ref, kind="diffusers", digest=folder_digest(path))
    if path.suffix.lower() == ".safetensors" and path.is_file():
        return ResolvedModel(ref=ref, kind="single_file", digest=file_digest(path), config=spec.base_model_config)
    raise TrainingError(
        f"base_model {ref!r} is neither builtin:NAME, a diffusers folder nor a .safetensors file "
        f"under the project root {root}; fix the path (it is relative to the root)"
    )


def load_models(spec: TrainingSpec, root: Path, device: str | None, notes: list[str]) -> tuple[Models, ResolvedModel]:
    import torch
    from diffusers import DDPMScheduler

    from renderer.models import load_base_pipeline, resolve_device

    device = resolve_device(device)
    resolved = resolve_base_model(spec, root)
    try:
        pipe = load_base_pipeline(resolved, root, device, "fp32")
    except JobError as e:
        raise TrainingError(str(e)) from e
    mp = spec.train.mixed_precision
    if mp != "no" and not device.startswith("cuda"):
        notes.append(f"mixed_precision {mp} needs CUDA; training in fp32 on {device}")
        mp = "no"
    if mp == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingError("train.mixed_precision: bf16 is not supported by this GPU; use fp16 or no")
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    # Frozen weights in the low-precision dtype save memory; the VAE stays fp32 (SDXL's VAE
    # overflows in fp16) and LoRA parameters are cast back to fp32 after they are added.
    pipe.unet.to(device, dtype=weight_dtype)
    pipe.text_encoder.to(device, dtype=weight_dtype)
    pipe.text_encoder_2.to(device, dtype=weight_dtype)
    pipe.vae.to(device, dtype=torch.float32)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    models = Models(
        pipe=pipe, unet=pipe.unet, vae=pipe.vae, noise_scheduler=noise_scheduler,
        text_encoders=[pipe.text_encoder, pipe.text_encoder_2], device=device, weight_dtype=weight_dtype,
        autocast_dtype=None if mp == "no" else weight_dtype, mixed_precision=mp,
    )
    return models, resolved


def check_lora_targets(model, targets: tuple[str, ...], rank: int, what: str) -> list[str]:
    """Problems with the LoRA config on `model`: targets matching nothing, rank above a layer's size."""
    import torch

    problems = []
    matched: dict[str, int] = {t: 0 for t in targets}
    for name, module in model.named_modules():
        for t in targets:
            if name == t or name.endswith("." + t):
                matched[t] += 1
                if isinstance(module, torch.nn.Linear):
                    dims = (module.in_features, module.out_features)
                elif isinstance(module, torch.nn.Conv2d):
                    dims = (module.in_channels, module.out_channels)
                else:
                    problems.append(f"{what} target {t!r} matches {name} ({type(module).__name__}), "
                                    "which LoRA cannot adapt; target Linear or Conv2d layers")
                    continue
                if rank > min(dims):
                    problems.append(
                        f"lora rank {rank} is larger than {what} layer {name} ({dims[0]} in, {dims[1]} out); "
                        f"a rank above min(in, out) = {min(dims)} adds nothing. Lower lora.rank to at most "
                        f"{min(dims)} or drop this target"
                    )
                    break
    for t, n in matched.items():
        if n == 0:
            examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            problems.append(f"{what} target module {t!r} matches no layer; Linear layer names include: {', '.join(examples[:12])}")
    # Report each distinct message once (many layers share a size).
    seen, unique = set(), []
    for p in problems:
        key = p.split(" layer ")[0] + p.split(")")[-1] if "larger than" in p else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def add_adapters(spec: TrainingSpec, models: Models) -> list:
    """Add peft LoRA adapters; returns the trainable parameter groups."""
    import torch
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    lo = spec.lora
    problems = check_lora_targets(models.unet, lo.target_modules, lo.rank, "UNet")
    te_rank = lo.text_encoder_rank or lo.rank
    if lo.train_text_encoder:
        for i, te in enumerate(models.text_encoders, 1):
            problems += check_lora_targets(te, lo.text_encoder_target_modules, te_rank, f"text encoder {i}")
    if problems:
        raise TrainingError(problems)
    unet_cfg = LoraConfig(r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                          target_modules=list(lo.target_modules), use_dora=lo.use_dora)
    models.unet.add_adapter(unet_cfg)
    trainable = [models.unet]
    if lo.train_text_encoder:
        te_alpha = lo.alpha * te_rank / lo.rank  # same scale (alpha / rank) as the UNet
        te_cfg = LoraConfig(r=te_rank, lora_alpha=te_alpha, lora_dropout=lo.dropout, init_lora_weights="gaussian",
                            target_modules=list(lo.text_encoder_target_modules), use_dora=lo.use_dora)
        for te in models.text_encoders:
            # transformers 5's `add_adapter` demands peft >= 0.22 (the stack pins 0.21.2): inject
            # directly; `peft_config` is what `get_peft_model_state_dict` and the file header read.
            inject_adapter_in_model(te_cfg, te, adapter_name="default")
            te.peft_config = {"default": te_cfg}
            trainable.append(te)
    if models.mixed_precision != "no":
        cast_training_params(trainable, dtype=torch.float32)
    if spec.train.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if lo.train_text_encoder:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()
    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": spec.train.learning_rate}]
    if lo.train_text_encoder:
        te_lr = spec.train.text_encoder_learning_rate or spec.train.learning_rate
        groups.append({"params": [p for te in models.text_encoders for p in te.parameters() if p.requires_grad],
                       "lr": te_lr})
    return groups


def adapted_components(models: Models, spec: TrainingSpec) -> dict[str, Any]:
    """The components that carry a LoRA, by their diffusers name."""
    comps = {"unet": models.unet}
    if spec.lora.train_text_encoder:
        comps.update(text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1])
    return comps


def adapter_config(model) -> dict:
    """A model's peft LoraConfig as diffusers stores it in the file header, sets as sorted lists.

    peft keeps `target_modules` as a set; its order, and so the header's bytes, would follow
    PYTHONHASHSEED, and two trainings of one spec would write different files.
    """
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def trainable_state(models: Models, spec: TrainingSpec) -> dict:
    """Every trainable tensor by a stable name: the exact weights a checkpoint resumes from."""
    return {f"{prefix}.{n}": p for prefix, m in adapted_components(models, spec).items()
            for n, p in m.named_parameters() if p.requires_grad}


def lora_state_dicts(models: Models, spec: TrainingSpec) -> dict[str, dict]:
    """LoRA layers per component in peft naming (`lora_A`/`lora_B`), which `load_lora_weights` reads.

    Not `convert_state_dict_to_diffusers`: it renames only attention layers (`lora.down`), and a
    file mixing both namings loads with the attention LoRA silently dropped.
    """
    from peft.utils import get_peft_model_state_dict

    return {name: get_peft_model_state_dict(m) for name, m in adapted_components(models, spec).items()}
