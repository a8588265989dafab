"""The safetensors metadata other tools read on a LoRA castbook trained.

A1111/Forge, ComfyUI and model sites list and match LoRAs by kohya's `ss_*` keys and by the
Stability "ModelSpec" keys (`modelspec.*`). castbook writes both, on the kohya and on the
diffusers export, next to its own `castbook.*` keys:

- `ss_base_model_version` (`sdxl_base_v1-0`), `ss_network_module` (`networks.lora`),
  `ss_network_dim`, `ss_network_alpha`, `ss_output_name`, `ss_resolution`;
- `ss_tag_frequency`: JSON `{dataset folder: {tag: count}}`, counted as kohya's
  `set_tag_frequency` does (comma-separated tags of each image's caption, stripped and
  lower-cased, one count per image; repeats and class images are not counted);
- `sshs_model_hash`: kohya's hash, the sha256 of the tensor data after the header, computed on
  the file as saved without that key (`core.model_hashes.lora_hash` of the final file is the same
  value, since metadata lives in the header);
- `modelspec.sai_model_spec` (`1.0.0`), `modelspec.architecture`
  (`stable-diffusion-xl-v1-base/lora`), `modelspec.implementation` (kohya's values:
  `https://github.com/Stability-AI/generative-models` for the kohya layout, `diffusers` for the
  diffusers layout), `modelspec.title`, `modelspec.trigger_phrase`, `modelspec.resolution`.

Left out on purpose: `modelspec.date`, `ss_training_started_at` and other clock values, so two
trainings of one spec still write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SDXL_BASE_VERSION = "sdxl_base_v1-0"
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
IMPLEMENTATION = {"kohya": "https://github.com/Stability-AI/generative-models", "diffusers": "diffusers"}


def tag_frequency(items) -> dict[str, dict[str, int]]:
    """{dataset folder name: {tag: images with that tag}} from the training captions."""
    out: dict[str, dict[str, int]] = {}
    for item in {i.path: i for i in items if not getattr(i, "is_class", False)}.values():
        folder = out.setdefault(Path(item.path).parent.name, {})
        for tag in item.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                folder[tag] = folder.get(tag, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def ecosystem_metadata(spec, items, layout: str, alpha: float | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` keys for a LoRA trained by `spec` on `items` (DataItems).

    `layout`: "kohya" or "diffusers" (the file's key layout); `alpha` the network alpha stored
    (defaults to the spec's)."""
    res = spec.train.resolution
    trigger = spec.dataset.trigger or ""
    return {
        "ss_base_model_version": SDXL_BASE_VERSION,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.lora.rank),
        "ss_network_alpha": str(spec.lora.alpha if alpha is None else alpha),
        "ss_output_name": spec.output.name,
        "ss_resolution": f"({res}, {res})",
        "ss_tag_frequency": json.dumps(tag_frequency(items), sort_keys=True),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION[layout],
        "modelspec.title": spec.output.name,
        "modelspec.trigger_phrase": trigger,
        "modelspec.resolution": f"{res}x{res}",
    }


def save_with_model_hash(tensors: dict, metadata: dict[str, str]) -> bytes:
    """safetensors bytes with kohya's `sshs_model_hash`: the file is serialised without the key,
    the tensor data after its header hashed, then the key added (the data bytes do not change)."""
    from safetensors.torch import save

    meta = {k: v for k, v in metadata.items() if k != "sshs_model_hash"}
    data = save(tensors, metadata=meta)
    (n,) = struct.unpack("<Q", data[:8])
    meta["sshs_model_hash"] = hashlib.sha256(data[8 + n:]).hexdigest()
    return save(tensors, metadata=meta)
