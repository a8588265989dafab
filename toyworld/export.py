"""Writing the toy models: safetensors files, diffusers folders and training records, all atomic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from core.files import atomic_write_bytes, atomic_write_text, new_temp_folder, swap_in_folder


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (`core.files.atomic_write_bytes`)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def save_pipeline(pipe, out: Path, dtype: str = "fp16") -> None:
    """`save_pretrained` (any diffusers pipeline or model) into a temp folder next to `out`, then swap
    it in: a reader sees the old folder or the new one, never a half-written one."""
    import shutil

    import torch

    out = Path(out)
    tmp = new_temp_folder(out)
    try:
        if dtype == "fp16":
            pipe = copy.deepcopy(pipe).to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        swap_in_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_pipeline(folder: Path):
    """The committed base model as an fp32 pipeline (weights are stored as fp16)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(
        Path(folder), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)


def load_frozen_base(root: Path, base: str):
    """The base model an add-on (ControlNet, IP-Adapter) trains against: loaded fp32, every part
    in eval mode without gradients."""
    base_dir = resolve(root, base)
    if not (base_dir / "model_index.json").exists():
        raise FileNotFoundError(f"base model {base_dir} is not a diffusers folder; train it first with "
                                f"`castbook toymodel train-base specs/toy/toy-base.yaml` or fix `base:`")
    pipe = load_pipeline(base_dir)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    return pipe


def write_record(out: Path, record: dict) -> None:
    """`<out>.training.json` next to the exported folder `out`."""
    out = Path(out)
    atomic_write_text(out.parent / f"{out.name}.training.json", json.dumps(record, indent=2, sort_keys=True) + "\n")


def resolve(root: Path, path: str) -> Path:
    """A recipe path: absolute as given, else relative to the project root."""
    return Path(path) if Path(path).is_absolute() else Path(root) / path
