"""Write the example LoRA files for builtin:tiny-sdxl (deterministic; committed to the repo).

Run:  .venv/bin/python scripts/make_example_loras.py   (writes specs/examples/loras/*.safetensors)

These are honest tiny LoRAs for the random tiny model: peft adapters with random
(non-zero) weights from a fixed seed, rank 4, alpha 4 (scale 1). They change images
visibly, which is what the tests and the demo need; they teach the model nothing.
A later issue trains real ones with castbook's trainer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RANK = 4
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]

# name -> (seed, {component: target modules}); text encoders only where the concept needs words.
EXAMPLES: dict[str, tuple[int, dict[str, list[str]]]] = {
    "luca_character": (101, {"unet": UNET_ATTN, "text_encoder": TE_ATTN, "text_encoder_2": TE_ATTN}),
    "portorosso_bg": (202, {"unet": ["to_k", "to_v", "proj_in", "proj_out"]}),
    "luca_happy": (303, {"unet": ["to_q", "to_out.0"], "text_encoder": ["q_proj", "v_proj"]}),
}


def lora_state_dict(pipe, seed: int, targets: dict[str, list[str]]) -> dict:
    """peft-format state dict with `unet.` / `text_encoder.` / `text_encoder_2.` prefixes."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    out = {}
    for i, (component, modules) in enumerate(sorted(targets.items())):
        model = getattr(pipe, component)
        torch.manual_seed(seed * 10 + i)
        # init_lora_weights=False: B is random too, so the adapter changes outputs (default B = 0).
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=modules)
        inject_adapter_in_model(cfg, model, adapter_name="make")
        sd = get_peft_model_state_dict(model, adapter_name="make")
        out.update({f"{component}.{k}": v.detach().to(torch.float32).contiguous() for k, v in sd.items()})
    return out


def save_atomic(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # committed files: world-readable
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(out_dir: Path = REPO / "specs" / "examples" / "loras") -> list[Path]:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    from renderer.builtins import builtin_dir

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (seed, targets) in EXAMPLES.items():
        # A fresh pipeline per LoRA: injected adapters must not leak into the next file.
        pipe = StableDiffusionXLPipeline.from_pretrained(builtin_dir("tiny-sdxl"), local_files_only=True, use_safetensors=True)
        sd = lora_state_dict(pipe, seed, targets)
        save_atomic(sd, out_dir / f"{name}.safetensors")
        written.append(out_dir / f"{name}.safetensors")
        if name == "luca_character":
            # Kohya twin: same weights, kohya key names and `.alpha` (= rank) entries.
            kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(sd).items()}
            save_atomic(kohya, out_dir / f"{name}_kohya.safetensors")
            written.append(out_dir / f"{name}_kohya.safetensors")
    return written


if __name__ == "__main__":
    for p in main():
        print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")
