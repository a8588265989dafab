"""What `castbook bench` renders with, made on the spot: the model reference, seeded LoRA files that
fit the UNet, and a control image. So the bench needs no assets and works for any base model,
including `builtin:sdxl-random`.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import JobError
from renderer.builtins import builtin_digest
from schemas.job import ResolvedModel

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def resolve_model(ref: str) -> ResolvedModel:
    """`builtin:NAME`, a diffusers folder or a `.safetensors` checkpoint (absolute or relative path)."""
    if ref.startswith("builtin:"):
        return ResolvedModel(ref=ref, kind="builtin", digest=builtin_digest(ref))  # refuses unknown names
    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise JobError(f"bench model {ref!r} does not exist; give builtin:tiny-sdxl, builtin:sdxl-random, "
                       f"a local diffusers folder or a .safetensors checkpoint")
    kind = "diffusers" if path.is_dir() else "single_file"
    return ResolvedModel(ref=str(path), kind=kind, digest=f"bench-path:{path}")


def make_lora_files(unet, out_dir: Path, ranks: list[int], seed: int = 0) -> list[Path]:
    """Seeded random LoRA files (diffusers format, attention projections) that fit `unet`.

    The layout comes from peft on a meta-device copy of the UNet (nothing is allocated and
    the live pipeline is untouched); the values are seeded normals, B small enough that the
    image changes visibly but stays in range.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, rank in enumerate(ranks):
        with torch.device("meta"):
            meta = type(unet).from_config(unet.config)
        meta.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False))
        layout = get_peft_model_state_dict(meta)
        gen = torch.Generator("cpu").manual_seed(seed * 1000 + i)
        state = {}
        for name in sorted(layout):
            shape = layout[name].shape
            scale = (1.0 / shape[1] ** 0.5) if ".lora_A." in name else 0.3
            state[name] = (torch.randn(shape, generator=gen) * scale).contiguous()
        weight_name = f"bench_lora_{i}_r{rank}.safetensors"
        StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=state, weight_name=weight_name,
                                                    safe_serialization=True)
        paths.append(out_dir / weight_name)
    return paths


def make_control_image(path: Path, size: int) -> None:
    """A white-on-black line drawing (like a canny map): circles and boxes, deterministic."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "black")
    d = ImageDraw.Draw(img)
    w = max(1, size // 128)
    d.ellipse([size * 0.3, size * 0.1, size * 0.7, size * 0.45], outline="white", width=w)
    d.rectangle([size * 0.25, size * 0.45, size * 0.75, size * 0.95], outline="white", width=w)
    d.line([0, size * 0.97, size, size * 0.97], fill="white", width=w)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
