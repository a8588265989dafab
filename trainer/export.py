"""Writing the trained LoRA: diffusers/peft format, kohya format, and the registry entry.

The diffusers file is produced by diffusers' own `save_lora_weights` (so
`pipe.load_lora_weights` reads it), then re-written atomically with castbook's
training metadata added to the safetensors header.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from core.files import atomic_write_bytes, atomic_write_text, new_temp_folder
from trainer.errors import TrainingError
from trainer.lora_metadata import ecosystem_metadata, save_with_model_hash

REGISTRY_SECTION = "loras"


def _with_metadata(src: Path, dst: Path, extra: dict[str, str]) -> None:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(extra)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, save_with_model_hash(tensors, meta))


def save_diffusers_lora(dst: Path, layers: dict[str, dict], configs: dict[str, dict], metadata: dict[str, str]) -> Path:
    """Write `layers` ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...}, peft naming) to `dst`
    with diffusers' writer, their peft configs (`configs`, same keys) and castbook's `metadata` in the header."""
    from diffusers import StableDiffusionXLPipeline

    scratch = new_temp_folder(dst)  # diffusers writes a folder; only its one file is kept
    try:
        StableDiffusionXLPipeline.save_lora_weights(
            scratch,
            unet_lora_layers=layers["unet"],
            text_encoder_lora_layers=layers.get("text_encoder"),
            text_encoder_2_lora_layers=layers.get("text_encoder_2"),
            unet_lora_adapter_metadata=configs.get("unet"),
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
            text_encoder_2_lora_adapter_metadata=configs.get("text_encoder_2"),
            weight_name="lora.safetensors",
        )
        _with_metadata(scratch / "lora.safetensors", dst, metadata)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


def to_kohya(src: Path, dst: Path, alpha: float, te_alpha: float, extra: dict[str, str]) -> Path:
    """Convert a diffusers-format LoRA file to kohya format (`lora_unet_...lora_down.weight` + `.alpha`)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    # `convert_state_dict_to_diffusers` writes `.lora.down/.lora.up`; kohya conversion wants peft's names.
    sd = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(sd)
    # diffusers writes alpha = rank; the trained scale is alpha / rank, so store the real alpha.
    for k in list(kohya):
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(float(te_alpha if k.startswith("lora_te") else alpha))
    meta = {"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha), **extra}
    if "castbook.rank" in extra:
        meta["ss_network_dim"] = extra["castbook.rank"]
    atomic_write_bytes(dst, save_with_model_hash({k: v.contiguous() for k, v in kohya.items()}, meta))
    return dst


def register_lora(registry: Path, name: str, entry: dict) -> None:
    """Add or replace `loras.<name>` in a registry YAML, keeping its comments and key order.

    ruamel round-trip mode edits the document in place; other entries, comments and
    ordering are untouched. The write is atomic.
    """
    from io import StringIO

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    doc = yaml.load(registry.read_text(encoding="utf-8")) if registry.exists() else None
    if doc is None:
        doc = CommentedMap()
    if not isinstance(doc, dict):
        raise TrainingError(f"output.registry {registry} is not a YAML mapping; expected a top-level `loras:` section")
    section = doc.get(REGISTRY_SECTION)
    if section is None:
        section = CommentedMap()
        doc[REGISTRY_SECTION] = section
    if not isinstance(section, dict):
        raise TrainingError(f"output.registry {registry}: `{REGISTRY_SECTION}:` is not a mapping of name -> entry")
    section[name] = CommentedMap(entry)  # an existing entry is replaced in place: it keeps its position
    buf = StringIO()
    yaml.dump(doc, buf)
    atomic_write_bytes(registry, buf.getvalue().encode("utf-8"))


def finish(trainer, result, src: Path, best: int | None) -> None:
    """Write the final LoRA from `src` (the file of step `best`, or of the last step when None),
    kohya on request, the registry entry and training.json."""
    spec, paths = trainer.spec, trainer.paths
    meta = trainer.header_metadata()
    meta["castbook.steps"] = str(best if best is not None else trainer.step)
    meta["castbook.selected"] = f"clip_i best (step {best})" if best is not None else "last"
    result.best_step = best
    # What A1111/Forge, ComfyUI and model sites read (ss_*, modelspec.*): trainer/lora_metadata.py.
    items = trainer.prep.items
    if spec.output.format in ("diffusers", "both"):
        _with_metadata(src, paths.lora_file, {**meta, **ecosystem_metadata(spec, items, "diffusers")})
        result.lora_file = paths.lora_file
    if spec.output.format in ("kohya", "both"):
        te_rank = spec.lora.text_encoder_rank or spec.lora.rank
        to_kohya(src, paths.kohya_file, spec.lora.alpha, spec.lora.alpha * te_rank / spec.lora.rank,
                 {**meta, **ecosystem_metadata(spec, items, "kohya")})
        result.kohya_file = paths.kohya_file
    if spec.output.registry:
        registry = trainer.root / spec.output.registry
        main = result.lora_file or result.kohya_file
        entry = {
            # Spec paths are relative to the file that names them: here, the registry's folder.
            "path": Path(os.path.relpath(main, registry.parent)).as_posix(),
            "kind": spec.kind,
            "trigger_words": [spec.dataset.trigger] if spec.dataset.trigger else [],
            "rank": spec.lora.rank,
            "notes": f"trained by castbook: {meta['castbook.steps']} steps, spec {trainer.prep.spec_hash[:12]}",
        }
        register_lora(registry, spec.output.name, entry)
    atomic_write_text(paths.run_dir / "training.json", json.dumps({
        "steps": trainer.step, "losses": trainer.losses, "clip_i": trainer.clip_i, "best_step": best,
        "metadata": meta, "notes": trainer.notes,
    }, indent=1))
