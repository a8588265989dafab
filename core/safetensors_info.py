"""What a `.safetensors` model file is, from its header alone (no tensor data is read).

`safetensors.safe_open(..., framework="numpy")` gives every key, shape and dtype and the
`__metadata__` strings without reading tensor data, so a 7 GB checkpoint is classified in
milliseconds. `classify()` names the file's kind from its key layout (and a few shapes):
SDXL base / refiner single-file checkpoints in the original Stability layout, SD 1.x / 2.x
checkpoints, LoRAs (kohya, diffusers/peft, LyCORIS), ControlNets, VAEs, IP-Adapters and
textual inversions. `inspect_file()` adds sizes, parameter counts, LoRA rank and targets, the
hashes other tools show (`core/model_hashes.py`) and the kohya/modelspec metadata, with trigger
words suggested from `ss_tag_frequency`. Used by `castbook models inspect`, `castbook loras add`
and the single-file loader (renderer/single_file.py), which refuses anything but an SDXL
checkpoint before any weight is read.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import JobError
from core.model_hashes import a1111_lora_hash, a1111_model_hash, lora_hash, sha256

# Key prefixes of the original (Stability / CompVis) single-file layout.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."
REFINER_CLIP_G = "conditioner.embedders.0.model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_CLIP = "cond_stage_model.model."

LYCORIS_MARKERS = (".hada_w1_a", ".hada_w2_a", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a", ".oft_blocks",
                   ".oft_diag", ".diff", ".diff_b", ".w_norm", ".b_norm")
TRIGGER_WORDS_SUGGESTED = 5


@dataclass(frozen=True)
class Header:
    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


@dataclass(frozen=True)
class FileKind:
    kind: str  # sdxl-base, sdxl-refiner, sd1, sd2, lora, controlnet, vae, ip-adapter, textual-inversion, unet, unknown
    architecture: str  # SDXL, SD 1.x, SD 2.x, SD/SDXL (same VAE layout), unknown
    form: str = ""  # for LoRAs: kohya, diffusers-peft, LyCORIS; for ControlNets/VAEs: original, diffusers
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        names = {"sdxl-base": "an SDXL base checkpoint", "sdxl-refiner": "an SDXL refiner checkpoint",
                 "sd1": "a Stable Diffusion 1.x checkpoint", "sd2": "a Stable Diffusion 2.x checkpoint",
                 "lora": "a LoRA", "controlnet": "a ControlNet", "vae": "a VAE", "ip-adapter": "an IP-Adapter",
                 "textual-inversion": "a textual inversion embedding", "unet": "a bare UNet (one diffusers component)",
                 "unknown": "not a model layout castbook recognises"}
        text = names.get(self.kind, self.kind)
        detail = ", ".join(x for x in (self.form, self.architecture if self.architecture != "unknown" else "") if x)
        return f"{text} ({detail})" if detail and self.kind not in ("sdxl-base", "sdxl-refiner", "sd1", "sd2") else text


def read_header(path: Path) -> Header:
    """Keys, shapes, dtypes and metadata of a safetensors file; no tensor data is read."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise JobError(f"{path} is not a .safetensors file; castbook reads only safetensors "
                       f"(convert a pickle once with `castbook models convert {path} --to safetensors`)")
    if not path.is_file():
        raise JobError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes, dtypes = {}, {}
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key] = tuple(int(x) for x in s.get_shape())
                dtypes[key] = str(s.get_dtype())
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise JobError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); re-download or re-export it") from e
    return Header(path, shapes, dtypes, metadata)


# --------------------------------------------------------------------------- classification


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _cross_attention_dim(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The text width the UNet attends to (2048 SDXL base, 1280 refiner, 768 SD1, 1024 SD2)."""
    for k, s in shapes.items():
        if re.search(r"attn2[._]to_k(\.weight|\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight)$", k) and len(s) == 2:
            return s[-1]
    return None


def _architecture_from_width(width: int | None, default: str = "unknown") -> str:
    return {2048: "SDXL", 1280: "SDXL refiner", 768: "SD 1.x", 1024: "SD 2.x"}.get(width, default)


def _metadata_architecture(md: dict[str, str]) -> str | None:
    text = (md.get("modelspec.architecture", "") + " " + md.get("ss_base_model_version", "")).lower()
    if "xl" in text:
        return "SDXL"
    if "v2" in text or "sd_2" in text or "v-2" in text:
        return "SD 2.x"
    if "v1" in text or "sd_1" in text or "v-1" in text:
        return "SD 1.x"
    return None


def classify(header: Header) -> FileKind:
    """Name what a file is from its keys (and a few shapes)."""
    keys = list(header.shapes)
    shapes, md = header.shapes, header.metadata
    if not keys:
        return FileKind("unknown", "unknown", notes=["the file holds no tensors"])
    # 1. single-file checkpoints (original layout)
    if _has(keys, UNET) and not any(".lora_" in k or "lora_unet" in k for k in keys):
        if _has(keys, SDXL_CLIP_G) or (_has(keys, SDXL_CLIP_L) and not _has(keys, REFINER_CLIP_G)):
            return FileKind("sdxl-base", "SDXL")
        if _has(keys, REFINER_CLIP_G):
            return FileKind("sdxl-refiner", "SDXL")
        if _has(keys, SD2_CLIP):
            return FileKind("sd2", "SD 2.x")
        if _has(keys, SD1_CLIP):
            return FileKind("sd1", "SD 1.x")
        width = _cross_attention_dim({k: v for k, v in shapes.items() if k.startswith(UNET)})
        adm = shapes.get(UNET + "label_emb.0.0.weight")
        arch = "SDXL" if adm is not None else _architecture_from_width(width)
        return FileKind("unet", arch, "original", notes=["UNet weights only: no text encoders and no VAE"])
    # 2. LoRAs: kohya (lora_unet_/lora_te*), LyCORIS (kohya names, other factorisations), diffusers/peft
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        form = "LyCORIS" if any(k.endswith(LYCORIS_MARKERS) or m + "." in k for k in keys for m in LYCORIS_MARKERS) else "kohya"
        return FileKind("lora", _lora_architecture(header, kohya=True), form)
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k
           or k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return FileKind("lora", _lora_architecture(header, kohya=False), "diffusers-peft")
    # 3. ControlNet (diffusers or original layout)
    if _has(keys, "controlnet_cond_embedding.") or _has(keys, "controlnet_down_blocks."):
        arch = "SDXL" if "add_embedding.linear_1.weight" in shapes else _architecture_from_width(_cross_attention_dim(shapes))
        return FileKind("controlnet", arch, "diffusers")
    if _has(keys, "control_model.") or (_has(keys, "input_hint_block.") and _has(keys, "zero_convs.")):
        arch = "SDXL" if any(k.endswith("label_emb.0.0.weight") for k in keys) else _architecture_from_width(_cross_attention_dim(shapes))
        return FileKind("controlnet", arch, "original")
    # 4. IP-Adapter
    if _has(keys, "image_proj.") and _has(keys, "ip_adapter."):
        width = next((s[-1] for k, s in shapes.items() if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight")), None)
        return FileKind("ip-adapter", _architecture_from_width(width))
    # 5. textual inversion
    if "clip_l" in shapes and "clip_g" in shapes:
        return FileKind("textual-inversion", "SDXL")
    if "emb_params" in shapes or _has(keys, "string_to_param."):
        width = next(iter(shapes.values()))[-1]
        return FileKind("textual-inversion", _architecture_from_width(width, "SD 1.x/2.x"))
    # 6. VAE (diffusers or original)
    if (_has(keys, "encoder.down_blocks.") and _has(keys, "decoder.up_blocks.")) or \
            (_has(keys, "encoder.down.") and _has(keys, "decoder.up.")) or (_has(keys, VAE) and len(set(k.split(".")[0] for k in keys)) == 1):
        form = "diffusers" if _has(keys, "encoder.down_blocks.") else "original"
        return FileKind("vae", "SD/SDXL (same VAE layout)", form)
    # 7. a bare diffusers UNet
    if "conv_in.weight" in shapes and _has(keys, "down_blocks.") and _has(keys, "time_embedding."):
        arch = "SDXL" if "add_embedding.linear_1.weight" in shapes else _architecture_from_width(_cross_attention_dim(shapes))
        return FileKind("unet", arch, "diffusers", notes=["one component of a diffusers folder"])
    return FileKind("unknown", _metadata_architecture(md) or "unknown",
                    notes=[f"first keys: {', '.join(sorted(keys)[:3])}"])


def _lora_architecture(header: Header, kohya: bool) -> str:
    by_meta = _metadata_architecture(header.metadata)
    if by_meta:
        return by_meta
    keys = list(header.shapes)
    if any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for k in keys):
        return "SDXL"
    width = _cross_attention_dim(header.shapes)
    if width in (2048, 1280, 768, 1024):
        return _architecture_from_width(width)
    # SD 1.x/2.x UNets have four down blocks with attention in the first; SDXL has three.
    if any(re.search(r"(input_blocks_1_1|down_blocks[._]0[._]attentions)", k) for k in keys):
        return "SD 1.x/2.x"
    if any(re.search(r"(input_blocks_[4-8]_1|down_blocks[._][12][._]attentions)", k) for k in keys):
        return "SDXL"
    return "unknown"


def checkpoint_problem(path: Path, kind: FileKind, want: str | None = "sdxl-base") -> str | None:
    """Why `path` cannot be used as an SDXL checkpoint (`want`: sdxl-base, sdxl-refiner or None for
    either), or None. One message for `castbook validate` and the loader alike."""
    if kind.kind in ("sd1", "sd2"):
        return (f"{path} is {kind.label}; castbook renders SDXL only. Use an SDXL checkpoint "
                f"(e.g. sd_xl_base_1.0.safetensors or an SDXL fine-tune)")
    if kind.kind not in ("sdxl-base", "sdxl-refiner"):
        return (f"{path} is {kind.label}, not an SDXL checkpoint; base_model needs a single-file SDXL "
                f"checkpoint (UNet, VAE and text encoders in one file)")
    if want and kind.kind != want:
        return f"{path} is {kind.label}, but {want.replace('sdxl-', 'an SDXL ')} checkpoint is needed here"
    return None


# --------------------------------------------------------------------------- LoRA details


def lora_rank_and_targets(header: Header) -> tuple[int | None, dict[str, list[str]]]:
    """The LoRA rank (largest down-projection rank) and which models/module families it changes."""
    ranks: Counter[int] = Counter()
    targets: dict[str, set[str]] = {}
    for k, s in header.shapes.items():
        if k.endswith((".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".hada_w1_a", ".lokr_w1_a")) and s:
            ranks[s[0]] += 1
        elif k.endswith(".hada_w1_b") and s:
            ranks[s[0]] += 1
        model = _lora_model(k)
        if model is None:
            continue
        family = _module_family(k)
        targets.setdefault(model, set()).add(family)
    rank = max(ranks) if ranks else None
    return rank, {m: sorted(f) for m, f in sorted(targets.items())}


def _lora_model(key: str) -> str | None:
    for prefixes, model in (
        (("lora_unet_", "unet."), "unet"),
        (("lora_te1_", "lora_te_", "text_encoder."), "text_encoder"),
        (("lora_te2_", "text_encoder_2."), "text_encoder_2"),
    ):
        if key.startswith(prefixes):
            return model
    return None


def _module_family(key: str) -> str:
    k = key.replace("_", ".")
    for needle, family in (("attn1", "self-attention"), ("attn2", "cross-attention"), ("self.attn", "self-attention"),
                           ("ff.net", "feed-forward"), ("mlp", "mlp"), ("proj.in", "proj_in/out"), ("proj.out", "proj_in/out"),
                           ("resnets", "resnet convs"), ("conv", "convs"), ("time.emb", "time embedding")):
        if needle in k:
            return family
    return "other"


# --------------------------------------------------------------------------- metadata


def suggested_trigger_words(metadata: dict[str, str], n: int = TRIGGER_WORDS_SUGGESTED) -> list[str]:
    """`modelspec.trigger_phrase` first, then the most frequent tags of kohya's `ss_tag_frequency`
    (a JSON string `{folder: {tag: count}}`), most frequent first, ties by name."""
    words: list[str] = []
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        words.extend(w.strip() for w in phrase.split(",") if w.strip())
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            folders = json.loads(raw)
        except json.JSONDecodeError:
            folders = {}
        counts: Counter[str] = Counter()
        if isinstance(folders, dict):
            for tags in folders.values():
                if isinstance(tags, dict):
                    for tag, count in tags.items():
                        if isinstance(count, (int, float)) and str(tag).strip():
                            counts[str(tag).strip()] += int(count)
        for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if tag not in words:
                words.append(tag)
    return words[:n]


def inspect_file(path: Path, hashes: bool = True) -> dict:
    """Everything `castbook models inspect` prints, as plain data (JSON-serialisable)."""
    header = read_header(path)
    kind = classify(header)
    dtypes: Counter[str] = Counter()
    for k, s in header.shapes.items():  # by parameter count, so kohya's scalar alphas do not decide
        dtypes[header.dtypes[k]] += math.prod(s)
    params = sum(dtypes.values())
    info: dict = {
        "file": str(path),
        "kind": kind.kind,
        "description": kind.label,
        "architecture": kind.architecture,
        "form": kind.form or None,
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "dtypes": dict(dtypes),  # parameters per dtype
        "size_bytes": Path(path).stat().st_size,
        "tensors": len(header.shapes),
        "parameters": params,
        "notes": kind.notes,
    }
    if kind.kind == "lora":
        rank, targets = lora_rank_and_targets(header)
        info.update(rank=rank, targets=targets, alpha_tensors=sum(k.endswith(".alpha") for k in header.shapes))
    if hashes:
        info["hashes"] = {"sha256": sha256(path), "a1111_model_hash": a1111_model_hash(path),
                          "lora_hash": lora_hash(path), "a1111_lora_hash": a1111_lora_hash(path)}
    info["metadata"] = dict(sorted(header.metadata.items()))
    info["trigger_words"] = suggested_trigger_words(header.metadata)
    return info
