"""Single-file SDXL checkpoints in the original Stability layout: load offline, export, key maps.

Loading: `load_single_file(path, config, torch_dtype)` classifies the file from its safetensors
header (core/safetensors_info.py) before any weight is read, refuses anything that is not an
SDXL base or refiner checkpoint, chooses the model configs by matching the header's shapes
against the configs castbook ships (renderer/configs/sdxl-base, renderer/configs/sdxl-refiner)
and the built-in toy/tiny models, and hands them to diffusers' `from_single_file` with
`local_files_only=True`, so no hub is ever asked. The shipped config folders hold no weights and
no tokenizer files: the real CLIP BPE tokenizers come from the toy model's folder
(renderer/weights/toy/sdxl/tokenizer*, the same 49,408-token vocabulary; the second pads with "!").

Export: `to_original_state_dict(components)` maps a diffusers SDXL pipeline's state dicts to the
original key layout (`model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`). The maps are ported
from diffusers' script `convert_diffusers_to_original_sdxl` (huggingface/diffusers, scripts folder), generalised
from SDXL's fixed three UNet blocks / four VAE blocks to any block count and layers per block read
from the config, so the same code exports the toy and tiny models. diffusers' own
`diffusers.loaders.single_file_utils` is the reverse direction, and the tests check both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.errors import JobError
from core.safetensors_info import (
    REFINER_CLIP_G,
    SDXL_CLIP_G,
    SDXL_CLIP_L,
    UNET,
    VAE,
    checkpoint_problem,
    classify,
    read_header,
)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS = {"sdxl-base": CONFIGS_DIR / "sdxl-base", "sdxl-refiner": CONFIGS_DIR / "sdxl-refiner"}

# --------------------------------------------------------------------------- UNet map


def _unet_prefix_map(cfg: dict) -> dict[str, str]:
    """diffusers prefix -> original prefix, for any block count / layers per block."""
    n = len(cfg["block_out_channels"])
    per = cfg["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    down_attn = ["CrossAttn" in t for t in cfg["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in cfg["up_block_types"]]
    m = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for i in range(n):
        for j in range(per):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (per + 1) + j + 1}.0."
            if down_attn[i]:
                m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (per + 1) + j + 1}.1."
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        for j in range(per + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            if up_attn[i]:
                m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (per + 1) + per}.{2 if up_attn[i] else 1}."
    return m


# (original, diffusers) inside a resnet, as in the script's unet_conversion_map_resnet
_UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def _map_prefix(key: str, prefixes: dict[str, str]) -> tuple[str, str] | None:
    for hf in sorted(prefixes, key=len, reverse=True):
        if key.startswith(hf):
            return prefixes[hf], key[len(hf):]
    return None


def unet_to_original(sd: dict, cfg: dict) -> dict:
    prefixes = _unet_prefix_map(cfg)
    out = {}
    for k, v in sd.items():
        hit = _map_prefix(k, prefixes)
        if hit is None:
            raise JobError(f"UNet key {k!r} has no place in the original layout (unsupported UNet config)")
        new_prefix, rest = hit
        if ".resnets." in k or k.startswith("mid_block.resnets"):
            for orig, hf in _UNET_RESNET:
                if rest.startswith(hf + "."):
                    rest = orig + rest[len(hf):]
        out[UNET + new_prefix + rest] = v
    return out


# --------------------------------------------------------------------------- VAE map


def _vae_prefix_map(cfg: dict) -> dict[str, str]:
    n = len(cfg["block_out_channels"])
    per = cfg["layers_per_block"]
    m = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
         "encoder.mid_block.attentions.0.": "encoder.mid.attn_1.", "decoder.mid_block.attentions.0.": "decoder.mid.attn_1."}
    for part in ("encoder", "decoder"):
        for j in range(2):
            m[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(n):
        for j in range(per):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    return m


_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def vae_to_original(sd: dict, cfg: dict) -> dict:
    prefixes = _vae_prefix_map(cfg)
    out = {}
    for k, v in sd.items():
        hit = _map_prefix(k, prefixes)
        new = k if hit is None else hit[0] + hit[1]
        if hit is not None and ".attn_1." in hit[0]:
            rest = hit[1]
            for orig, hf in _VAE_ATTN:
                if rest.startswith(hf):
                    rest = orig + rest[len(hf):]
                    break
            new = hit[0] + rest
            if v.ndim == 2:  # the original attention uses 1x1 convs
                v = v.reshape(*v.shape, 1, 1)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[VAE + new] = v
    return out


# --------------------------------------------------------------------------- text encoders map


def clip_l_to_original(sd: dict) -> dict:
    """CLIP ViT-L keys keep their transformers names under `conditioner.embedders.0.transformer.text_model.`
    (transformers ≥ 5.6 saves CLIPTextModel without the `text_model.` level)."""
    return {SDXL_CLIP_L + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


_OPENCLIP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
             (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
             ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
_OPENCLIP_PROTECTED = {re.escape(hf): orig for orig, hf in _OPENCLIP}
_OPENCLIP_PATTERN = re.compile("|".join(_OPENCLIP_PROTECTED))


def open_clip_to_original(sd: dict, prefix: str = SDXL_CLIP_G) -> dict:
    """OpenCLIP ViT-bigG (CLIPTextModelWithProjection) -> original names, q/k/v fused into in_proj."""
    import torch

    def rename(k: str) -> str:
        return _OPENCLIP_PATTERN.sub(lambda m: _OPENCLIP_PROTECTED[re.escape(m.group(0))], k)

    out, qkv = {}, {}
    for k, v in sd.items():
        k = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
        m = re.match(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
            continue
        out[prefix + rename(k)] = v
    for (pre, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise JobError(f"text encoder 2 is missing a q/k/v projection at {pre}")
        out[prefix + rename(pre) + f".in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original_state_dict(pipe) -> dict:
    """A diffusers SDXL pipeline (base) -> one state dict in the original single-file layout."""
    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config)))
    sd.update(vae_to_original(pipe.vae.state_dict(), dict(pipe.vae.config)))
    if getattr(pipe, "text_encoder", None) is not None:
        sd.update(clip_l_to_original(pipe.text_encoder.state_dict()))
        sd.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), SDXL_CLIP_G))
    else:  # the refiner has only the OpenCLIP encoder, as embedder 0
        sd.update(open_clip_to_original(pipe.text_encoder_2.state_dict(), REFINER_CLIP_G))
    return sd


def export_single_file(pipe, out: Path, title: str, dtype=None) -> Path:
    """Write `pipe` as one original-layout safetensors file (atomically), with modelspec metadata."""
    sd = to_original_state_dict(pipe)
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in sd.items()}
    arch = "stable-diffusion-xl-v1-refiner" if getattr(pipe, "text_encoder", None) is None else "stable-diffusion-xl-v1-base"
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.title": title, "format": "pt"}
    return save_file_atomically(sd, Path(out), metadata)


def save_file_atomically(tensors: dict, out: Path, metadata: dict) -> Path:
    """`safetensors.torch.save_file` to a temp file beside `out`, fsync, mode 0644, rename (core/files.py's rule
    for outputs; the tensors are written straight to disk rather than built as bytes in memory)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    from core.files import fsync_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(out.parent)
    return out


# --------------------------------------------------------------------------- choosing configs


def _max_index(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def header_signature(shapes: dict) -> dict:
    """The architecture facts of an original-layout checkpoint, from its header shapes."""
    keys = list(shapes)
    te2 = SDXL_CLIP_G if any(k.startswith(SDXL_CLIP_G) for k in keys) else REFINER_CLIP_G
    cross = next((s[-1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    return {
        "unet_conv_in": tuple(shapes.get(UNET + "input_blocks.0.0.weight", ())[:2]),
        "unet_input_blocks": _max_index(keys, re.escape(UNET) + r"input_blocks\.(\d+)\."),
        "unet_adm": (shapes.get(UNET + "label_emb.0.0.weight") or (0, 0))[1],
        "unet_cross_attention": cross,
        "vae_conv_in": (shapes.get(VAE + "encoder.conv_in.weight") or (0,))[0],
        "vae_blocks": _max_index(keys, re.escape(VAE) + r"encoder\.down\.(\d+)\."),
        "te1": ((shapes.get(SDXL_CLIP_L + "text_model.embeddings.token_embedding.weight") or (0, 0))[1],
                _max_index(keys, re.escape(SDXL_CLIP_L) + r"text_model\.encoder\.layers\.(\d+)\.")),
        "te2": ((shapes.get(te2 + "token_embedding.weight") or (0, 0))[1],
                _max_index(keys, re.escape(te2) + r"transformer\.resblocks\.(\d+)\.")),
    }


def config_signature(folder: Path) -> dict:
    """The same facts, read from a diffusers config folder (JSON only)."""
    def load(sub: str, name: str = "config.json") -> dict | None:
        p = Path(folder) / sub / name
        return json.loads(p.read_text()) if p.is_file() else None

    unet, vae, te1, te2 = load("unet"), load("vae"), load("text_encoder"), load("text_encoder_2")
    if unet is None or vae is None or te2 is None:
        raise JobError(f"config folder {folder} needs unet/, vae/ and text_encoder_2/ configs")
    n, per = len(unet["block_out_channels"]), unet["layers_per_block"]
    return {
        "unet_conv_in": (unet["block_out_channels"][0], unet.get("in_channels", 4)),
        "unet_input_blocks": n * (per + 1),
        "unet_adm": unet.get("projection_class_embeddings_input_dim") or 0,
        "unet_cross_attention": unet["cross_attention_dim"],
        "vae_conv_in": vae["block_out_channels"][0],
        "vae_blocks": len(vae["block_out_channels"]),
        "te1": (te1["hidden_size"], te1["num_hidden_layers"]) if te1 else (0, 0),
        "te2": (te2["hidden_size"], te2["num_hidden_layers"]),
    }


def _candidates():
    from renderer.builtins import TOY_SDXL_DIR, builtin_dir

    yield "sdxl-base (shipped config)", lambda: SHIPPED_CONFIGS["sdxl-base"]
    yield "sdxl-refiner (shipped config)", lambda: SHIPPED_CONFIGS["sdxl-refiner"]
    yield "builtin:toy-sdxl", lambda: TOY_SDXL_DIR
    yield "builtin:tiny-sdxl", lambda: builtin_dir("tiny-sdxl")  # saved once on first use


def choose_config(shapes: dict, path: Path) -> Path:
    """The config folder whose architecture matches the checkpoint's shapes."""
    want = header_signature(shapes)
    for _name, folder_fn in _candidates():
        folder = folder_fn()
        if config_signature(folder) == want:
            return folder
    facts = ", ".join(f"{k}={v}" for k, v in want.items())
    raise JobError(
        f"no shipped config matches the architecture of {path} ({facts}); castbook ships configs for SDXL base 1.0, "
        f"the SDXL refiner and its built-in models. Give `base_model: {{type: single_file, path: {path.name}, config: "
        f"<diffusers folder with the model's configs>}}`"
    )


def _tokenizers(config: Path, refiner: bool) -> dict:
    """Tokenizers the config folder lacks, from the toy model's real CLIP BPE files."""
    from transformers import CLIPTokenizer

    from renderer.builtins import TOY_SDXL_DIR

    out = {}
    for sub in (("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2")):
        if not (Path(config) / sub).is_dir():
            out[sub] = CLIPTokenizer.from_pretrained(TOY_SDXL_DIR / sub, local_files_only=True)
    return out


def check_single_file(path: Path, want: str | None = None):
    """Classify `path` from its header and refuse what castbook cannot render with. Returns the header."""
    header = read_header(path)
    kind = classify(header)
    problem = checkpoint_problem(path, kind, want)
    if problem:
        raise JobError(problem)
    missing = [what for what, prefix in (("the UNet", UNET), ("the VAE", VAE)) if not any(k.startswith(prefix) for k in header.shapes)]
    if missing:
        raise JobError(f"{path} lacks {' and '.join(missing)}; it is not a complete single-file checkpoint")
    return header, kind


def load_single_file(path: Path, config: Path | None, torch_dtype, want: str | None = None):
    """Load an SDXL base (StableDiffusionXLPipeline) or refiner (StableDiffusionXLImg2ImgPipeline) offline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    path = Path(path)
    header, kind = check_single_file(path, want)
    if config is not None and not Path(config).is_dir():
        raise JobError(f"config folder {config} for checkpoint {path} does not exist")
    cfg = Path(config) if config is not None else choose_config(header.shapes, path)
    refiner = kind.kind == "sdxl-refiner"
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    extra = _tokenizers(cfg, refiner)
    if refiner:
        extra.update(text_encoder=None, tokenizer=None)
    else:
        sig = header_signature(header.shapes)
        if sig["te1"][0] == sig["te2"][0]:
            extra["text_encoder_2"] = _open_clip_encoder(path, cfg, torch_dtype)
    return cls.from_single_file(str(path), config=str(cfg), local_files_only=True, torch_dtype=torch_dtype, **extra)


def _open_clip_encoder(path: Path, cfg: Path, torch_dtype):
    """Text encoder 2 for checkpoints whose two encoders have the same width (castbook's toy and tiny
    models). diffusers tells the encoders apart by width: with equal widths its loader fills
    `text_encoder_2` with the CLIP-L weights and leaves `text_projection` on the meta device
    (diffusers 0.42.1, single_file_utils.create_diffusers_clip_model_from_ldm). Real SDXL files
    (768 vs 1280) never take this path. The conversion itself is diffusers' own."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(SDXL_CLIP_G)}
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(Path(cfg) / "text_encoder_2", local_files_only=True))
    result = model.load_state_dict(convert_open_clip_checkpoint(model, sd, prefix=SDXL_CLIP_G), strict=False)
    problems = [k for k in (*result.missing_keys, *result.unexpected_keys) if not k.endswith("position_ids")]
    if problems:
        raise JobError(f"text encoder 2 of {path} does not match its config {cfg}: {', '.join(problems[:5])}")
    return model.to(torch_dtype).eval()
