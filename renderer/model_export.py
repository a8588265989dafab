"""Writing built-in models out for other tools: a published-style diffusers folder (fp32 plus an
`fp16` variant) or one single-file checkpoint in the original Stability key layout
(`castbook models export`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.errors import JobError
from core.files import new_temp_folder, swap_in_folder
from renderer.builtins import builtin_dir, builtin_name
from schemas.builtins import BASE_MODELS, CONTROLNET_MODELS


def export_builtin(name: str, out_dir: Path) -> Path:
    """Write a built-in as a published-style diffusers folder: fp32 weights, which plain
    `StableDiffusionXLPipeline.from_pretrained(out_dir)` loads and renders with no arguments, plus an
    `fp16` variant (`from_pretrained(out_dir, variant="fp16", torch_dtype=torch.float16)`).
    (Copying the shipped folder as it is mixed fp16 text encoders with an fp32 UNet, and a default
    load then failed with `mat1 and mat2 must have the same dtype`.)"""
    import copy

    import torch

    name = builtin_name(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JobError(f"export folder {out_dir} exists and is not empty; choose a new folder or empty it")
    model = _load_builtin_fp32(name)
    tmp = new_temp_folder(out_dir)
    try:
        # fp16 first: transformers 5 records the dtype in config.json and loads it by default, so
        # the config written last (fp32) is the one a no-argument load reads.
        copy.deepcopy(model).to(torch.float16).save_pretrained(tmp, safe_serialization=True, variant="fp16")
        model.save_pretrained(tmp, safe_serialization=True)
        swap_in_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _load_builtin_fp32(name: str):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    cls = ControlNetModel if name in CONTROLNET_MODELS else StableDiffusionXLPipeline
    return cls.from_pretrained(builtin_dir(name), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)


def export_builtin_single_file(name: str, out: Path, dtype: str = "fp32") -> Path:
    """Write a built-in SDXL model as ONE safetensors file in the original Stability key layout
    (renderer/single_file.py), e.g. to test single-file loading with real layout, or for tools that
    want single files. `dtype`: fp32, fp16 or bf16."""
    import torch

    from renderer.single_file import export_single_file

    name = builtin_name(name)
    if name not in BASE_MODELS or name == "sdxl-random":
        raise JobError(f"builtin:{name} cannot be exported as a single-file checkpoint; export a base model "
                       f"({', '.join('builtin:' + n for n in BASE_MODELS if n != 'sdxl-random')})")
    out = Path(out)
    if out.exists():
        raise JobError(f"{out} exists; choose a new file name")
    if out.suffix != ".safetensors":
        raise JobError(f"{out} must end in .safetensors")
    td = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return export_single_file(_load_builtin_fp32(name), out, title=f"castbook builtin:{name}", dtype=td)
