"""Base models and ControlNets: built-ins, local diffusers folders, single-file safetensors.

Built-in models are built from config with a fixed seed, saved ONCE to a cache folder
(`$CASTBOOK_HOME/builtins/<name>-r<recipe>`, default `~/.cache/castbook/builtins/...`),
and from then on always loaded from those files. Loading from files is what makes the
same seed give the same bytes across processes (in-memory weights and reloaded weights
differ by up to 1/255 on some CPUs) and it exercises the real loading code.

Weights are only ever read from safetensors: pickle formats (`.ckpt`, `.bin`, `.pt`,
`.pth`, `.pkl`) can run code when opened, so they are refused before the file is opened.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import JobError

if TYPE_CHECKING:  # torch/diffusers are imported lazily: the CLI must start fast
    pass

from core.home import builtins_dir
from schemas.builtins import BASE_MODELS, BUILTIN_RECIPES, CONTROLNET_MODELS
from schemas.builtins import builtin_digest as _recipe_digest
from schemas.spec import PICKLE_SUFFIXES

BUILTIN_SEED = 0
TOY_SDXL_DIR = Path(__file__).resolve().parent / "weights" / "toy" / "sdxl"
# Trained by `castbook toymodel train-controlnet specs/toy/toy-controlnet.yaml` (toyworld/controlnet.py).
TOY_CONTROLNET_DIR = Path(__file__).resolve().parent / "weights" / "toy" / "controlnet"

WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",)

# castbook scheduler name -> (diffusers class name, extra from_config kwargs)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


DTYPE_LABELS = ("fp32", "fp16", "bf16")


# --------------------------------------------------------------------------- paths


def builtin_name(ref: str) -> str:
    """`builtin:tiny-sdxl` -> `tiny-sdxl`, refusing unknown names."""
    name = ref.split(":", 1)[1] if ref.startswith("builtin:") else ref
    if name not in BASE_MODELS + CONTROLNET_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BASE_MODELS + CONTROLNET_MODELS)
        raise JobError(f"unknown built-in model {ref!r}; known built-ins: {known}")
    return name


def builtin_digest(name: str) -> str:
    """The digest a job records for a built-in: `builtin:NAME@rRECIPE` (one definition, in schemas)."""
    return _recipe_digest(builtin_name(name))


# --------------------------------------------------------------------------- configs


def sdxl_base_unet_config() -> dict:
    """The UNet config of stabilityai/stable-diffusion-xl-base-1.0 (≈2.57 B parameters)."""
    return {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }


def _sdxl_scheduler_config() -> dict:
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def clip_tokenizer(allow_byte_fallback: bool = False):
    """The real 49,408-token CLIP BPE tokenizer, built offline from open_clip's vocabulary file.

    Token ids match `open_clip.tokenize`. Padding follows SDXL's first tokenizer
    (`<|endoftext|>`); the second tokenizer pads with `!` (id 0) like SDXL's.
    `allow_byte_fallback`: without open_clip installed (e.g. a bare GPU benchmark box),
    build a byte-level tokenizer instead (no merges; fine for random-weight models).
    """
    from transformers import CLIPTokenizer

    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError:
        if not allow_byte_fallback:
            raise
        byte_tokens = list(_bytes_to_unicode().values())
        tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["<|startoftext|>", "<|endoftext|>"]
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77,
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>")

    # Same construction as open_clip.tokenizer.SimpleTokenizer, with HF's special-token spelling.
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (same as open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _text_encoder_config(**kw):
    from transformers import CLIPTextConfig

    # eos/bos ids of the real vocabulary, so the pooled output is taken at <|endoftext|>.
    base = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    base.update(kw)
    return CLIPTextConfig(**base)


def tiny_unet_config(sample_size: int = 32, latent_channels: int = 4) -> dict:
    """The tiny SDXL UNet of STACK.md (~2 M params): tiny-sdxl's, and toy-sdxl's at 16x16 latents."""
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text
        cross_attention_dim=64,
    )


def build_tiny_sdxl_components(seed: int = BUILTIN_SEED) -> dict:
    """SDXL-architecture components, tiny, from config with a fixed seed (STACK.md)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Seed before each component so each one's init does not depend on the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    te_kw = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_encoder_config(**te_kw))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(**te_kw))
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(**_sdxl_scheduler_config())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_controlnet(unet, seed: int = BUILTIN_SEED, conditioning_channels: tuple[int, ...] = (16, 32)):
    """A ControlNet copied from the tiny UNet, its zero-initialised layers perturbed.

    A fresh ControlNet's output convs and conditioning-embedding output start at zero,
    so it would change nothing; the perturbation makes control images visibly matter.
    """
    import torch
    from diffusers import ControlNetModel

    # The conditioning embedding must downsample like the VAE: 2x for tiny-sdxl (two stages),
    # 4x for toy-sdxl (three stages).
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels)
    gen = torch.Generator("cpu").manual_seed(seed)
    zero_init = [cn.controlnet_cond_embedding.conv_out, cn.controlnet_mid_block, *cn.controlnet_down_blocks]
    with torch.no_grad():
        for module in zero_init:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return cn


def build_sdxl_random_pipeline(device: str = "cpu", torch_dtype=None, seed: int = BUILTIN_SEED):
    """The full SDXL-base architecture with random weights, built directly on `device`.

    For GPU benchmarks without weights; never saved (≈ 7 GB in fp16).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch_dtype = torch_dtype or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**sdxl_base_unet_config())
            vae = AutoencoderKL(
                block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=1024,
                scaling_factor=0.13025,
                force_upcast=True,
            )
            te1 = CLIPTextModel(_text_encoder_config(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                     num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
            te2 = CLIPTextModelWithProjection(_text_encoder_config(hidden_size=1280, intermediate_size=5120,
                                                                   num_attention_heads=20, num_hidden_layers=32,
                                                                   projection_dim=1280, hidden_act="gelu"))
    finally:
        torch.set_default_dtype(previous)
    tok2 = clip_tokenizer(allow_byte_fallback=True)
    tok2.pad_token = "!"
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(allow_byte_fallback=True), tokenizer_2=tok2,
        unet=unet, scheduler=EulerDiscreteScheduler(**_sdxl_scheduler_config()),
    )


def build_sdxl_random_unet(device: str = "meta"):
    """Just the SDXL-base UNet, random init, on `device` (`meta` allocates nothing)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**sdxl_base_unet_config())


# --------------------------------------------------------------------------- built-in cache


def builtin_dir(name: str) -> Path:
    """The saved built-in's folder, building and saving it first if needed (safe across processes)."""
    name = builtin_name(name)
    if name == "sdxl-random":
        raise JobError("builtin:sdxl-random is built in memory, not saved; it has no folder")
    if name == "toy-sdxl":  # trained by castbook, shipped in the repo rather than built
        return TOY_SDXL_DIR
    if name == "toy-controlnet":  # trained on drawn pose maps, shipped like toy-sdxl (fp16; loaded as asked)
        if not (TOY_CONTROLNET_DIR / "config.json").is_file():
            raise JobError(
                f"builtin:toy-controlnet has no trained weights: {TOY_CONTROLNET_DIR} is missing or has no "
                f"config.json. Train it once with `castbook toymodel train-controlnet specs/toy/toy-controlnet.yaml` "
                f"(about 15 minutes on one CPU thread), or name another ControlNet in the spec's `model:`"
            )
        return TOY_CONTROLNET_DIR
    final = builtins_dir() / f"{name}-r{BUILTIN_RECIPES[name]}"
    if (final / "model_index.json").exists() or (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _save_builtin(name, tmp)
        try:
            os.replace(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _save_builtin(name: str, out: Path) -> None:
    if name == "tiny-sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components())
        pipe.save_pretrained(out, safe_serialization=True)
    elif name == "tiny-controlnet":
        from diffusers import UNet2DConditionModel

        # Built from the SAVED tiny UNet so it matches what renders load.
        unet = UNet2DConditionModel.from_pretrained(
            builtin_dir("tiny-sdxl") / "unet", local_files_only=True, use_safetensors=True
        )
        build_tiny_controlnet(unet).save_pretrained(out, safe_serialization=True)
    else:
        raise JobError(f"built-in {name!r} cannot be saved to a folder")


def export_builtin(name: str, out_dir: Path) -> Path:
    """Write a built-in as a normal diffusers folder (`StableDiffusionXLPipeline.from_pretrained(out_dir)`)."""
    name = builtin_name(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise JobError(f"export folder {out_dir} exists and is not empty; choose a new folder or empty it")
    src = builtin_dir(name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------- file checks


def check_safetensors_file(path: Path, what: str = "model") -> None:
    """Refuse anything that is not a readable safetensors file, WITHOUT unpickling anything.

    The suffix is checked before the file is opened; then only the JSON header is parsed
    and the tensor byte ranges are checked against the file size (catches truncation).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        kind = "a pickle file, which can run code when loaded" if path.suffix.lower() in PICKLE_SUFFIXES else "not a .safetensors file"
        raise JobError(
            f"{what} file {path} is {kind}; castbook loads weights only from .safetensors. "
            f"Convert it once in a trusted environment (e.g. load it and save with safetensors.torch.save_file) "
            f"and point the spec at the .safetensors file"
        )
    if not path.is_file():
        raise JobError(f"{what} file {path} does not exist; check the path in the spec (paths are relative to the project root)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data needs {8 + n + end} bytes but the file has {size} (truncated?)")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise JobError(f"{what} file {path} is not a valid safetensors file ({e}); re-download or re-export it") from e


def check_diffusers_folder(path: Path, what: str = "model") -> None:
    """A diffusers folder must exist, have its index/config, and have safetensors weights only."""
    path = Path(path)
    if not path.is_dir():
        raise JobError(f"{what} folder {path} does not exist; check the path in the spec (paths are relative to the project root)")
    if not (path / "model_index.json").exists() and not (path / "config.json").exists():
        raise JobError(f"{what} folder {path} has no model_index.json or config.json; it is not a diffusers folder")
    dirs = [path] + [p for p in path.iterdir() if p.is_dir()]
    for d in dirs:
        weights = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
        if weights and not any(p.suffix.lower() == ".safetensors" for p in weights):
            names = ", ".join(sorted(p.name for p in weights))
            raise JobError(
                f"{what} folder {d} has only pickle weights ({names}); castbook loads only .safetensors. "
                f"Re-save the model with save_pretrained(..., safe_serialization=True)"
            )
        for p in weights:
            if p.suffix.lower() == ".safetensors":
                check_safetensors_file(p, what)


# --------------------------------------------------------------------------- device, dtype


def resolve_device(device: str | None = None) -> str:
    """`None` -> `cuda:0` when CUDA is available, else `cpu`."""
    import torch

    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """Job dtype label -> concrete label. `auto` is bf16 on CUDA and fp32 on CPU."""
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPE_LABELS:
        raise JobError(f"dtype {dtype!r} is not one of auto, fp32, fp16, bf16")
    if dtype == "fp16" and not device.startswith("cuda"):
        raise JobError("dtype 'fp16' needs a CUDA GPU (CPU half precision is unsupported or very slow); "
                       "use dtype: fp32 or auto on CPU")
    return dtype


def torch_dtype(label: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[label]


# --------------------------------------------------------------------------- loading


def make_scheduler(name: str, base_config):
    """A diffusers scheduler for castbook's name, from the base model's ORIGINAL scheduler config.

    Always start from the original config: building from a previous job's scheduler would
    carry its options (e.g. `use_karras_sigmas`) into the next one.
    """
    import diffusers

    if name not in SCHEDULERS:
        raise JobError(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    cls_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **kwargs)


def load_base_pipeline(model, root: Path, device: str, dtype_label: str, to_device: bool = True):
    """Load a `ResolvedModel` as a `StableDiffusionXLPipeline` on `device` (offline, safetensors only).

    `to_device=False` leaves file-loaded weights on the CPU (for model CPU offload, which
    places modules itself).
    """
    from diffusers import StableDiffusionXLPipeline

    td = torch_dtype(dtype_label)
    try:
        if model.kind == "builtin" or model.ref.startswith("builtin:"):
            name = builtin_name(model.ref)
            if name == "sdxl-random":
                pipe = build_sdxl_random_pipeline(device=device, torch_dtype=td)
            elif name in ("tiny-sdxl", "toy-sdxl"):
                pipe = StableDiffusionXLPipeline.from_pretrained(
                    builtin_dir(name), local_files_only=True, use_safetensors=True, torch_dtype=td
                )
            else:
                raise JobError(f"{model.ref} is not a base model; base_model must be one of "
                               f"{', '.join('builtin:' + n for n in BASE_MODELS)}, a diffusers folder or a .safetensors checkpoint")
        elif model.kind == "diffusers":
            path = Path(root) / model.ref
            check_diffusers_folder(path, "base model")
            pipe = StableDiffusionXLPipeline.from_pretrained(
                path, local_files_only=True, use_safetensors=True, torch_dtype=td
            )
        elif model.kind == "single_file":
            path = Path(root) / model.ref
            check_safetensors_file(path, "base model")
            if not model.config:
                raise JobError(
                    f"single-file checkpoint {model.ref} needs `config:` — a local diffusers folder with the "
                    f"model's configs (model_index.json, */config.json, tokenizers); castbook never fetches them from a hub"
                )
            cfg = Path(root) / model.config
            if not cfg.is_dir():
                raise JobError(f"config folder {cfg} for checkpoint {model.ref} does not exist")
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(cfg), local_files_only=True, torch_dtype=td
            )
        else:
            raise JobError(f"unknown base model kind {model.kind!r} for {model.ref}")
    except JobError:
        raise
    except Exception as e:  # diffusers raises many types; the user needs the file and the reason
        raise JobError(f"could not load base model {model.ref}: {type(e).__name__}: {e}") from e
    return pipe.to(device) if to_device else pipe


def load_controlnet(model, root: Path, device: str, dtype_label: str):
    """Load a ControlNet `ResolvedModel` (builtin:tiny-controlnet, diffusers folder or single file)."""
    from diffusers import ControlNetModel

    td = torch_dtype(dtype_label)
    try:
        if model.kind == "builtin" or model.ref.startswith("builtin:"):
            name = builtin_name(model.ref)
            if name not in CONTROLNET_MODELS:
                raise JobError(f"{model.ref} is not a ControlNet; use one of "
                               f"{', '.join('builtin:' + n for n in CONTROLNET_MODELS)} or a local ControlNet folder")
            cn = ControlNetModel.from_pretrained(builtin_dir(name), local_files_only=True, use_safetensors=True, torch_dtype=td)
        elif model.kind == "diffusers":
            path = Path(root) / model.ref
            check_diffusers_folder(path, "ControlNet")
            cn = ControlNetModel.from_pretrained(path, local_files_only=True, use_safetensors=True, torch_dtype=td)
        elif model.kind == "single_file":
            path = Path(root) / model.ref
            check_safetensors_file(path, "ControlNet")
            kw = {"config": str(Path(root) / model.config)} if model.config else {}
            cn = ControlNetModel.from_single_file(str(path), local_files_only=True, torch_dtype=td, **kw)
        else:
            raise JobError(f"unknown ControlNet kind {model.kind!r} for {model.ref}")
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"could not load ControlNet {model.ref}: {type(e).__name__}: {e}") from e
    return cn.to(device)


# torch.compile mode used when the spec asks for `compile: true` without a mode. Autotuned
# kernels without CUDA graphs: CUDA graphs ("reduce-overhead", "max-autotune") pin input
# buffers and re-record per shape/LoRA stack, which costs memory and breaks hotswapping.
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"


def apply_performance(pipe, performance: dict, device: str) -> list[str]:
    """Apply the spec's `performance:` options that are set at load time; returns their names.

    Order matters: the VAE swap and QKV fusion change modules, channels_last changes
    memory layout; `torch.compile` is NOT applied here but by `compile_pipeline`, after
    the first job's LoRAs are loaded (see `JobRenderer`), so the first graph already
    contains the LoRA layers and loading them does not force a recompile.
    SDPA (`F.scaled_dot_product_attention`) is diffusers' default attention: nothing to set.
    """
    import torch

    applied = ["sdpa"]
    if performance.get("fuse_qkv"):
        # Changes float summation order (pixels may differ in the last bit); off by default.
        pipe.fuse_qkv_projections(unet=True, vae=True)
        applied.append("fuse_qkv")
    if performance.get("channels_last"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if performance.get("vae_tiling"):
        pipe.vae.enable_tiling()
        applied.append("vae_tiling")
    if performance.get("vae_slicing"):
        pipe.vae.enable_slicing()
        applied.append("vae_slicing")
    # Model CPU offload moves modules to the GPU one at a time; meaningless without CUDA.
    if performance.get("cpu_offload") and device.startswith("cuda"):
        pipe.enable_model_cpu_offload(device=device)
        applied.append("cpu_offload")
    return applied


def compile_module(module, mode: str | None = None, backend: str = "inductor") -> None:
    """`torch.compile` a module in place (`nn.Module.compile`): it stays the same diffusers
    class, so peft/diffusers LoRA loading and hotswap keep working on it.

    `mode`: a torch.compile mode (default `DEFAULT_COMPILE_MODE`). `backend="eager"` only
    traces (cheap; tests use it to count recompiles without building kernels).
    Compilation itself happens lazily at the first call: run a warm-up job first.
    """
    kw = {"mode": mode or DEFAULT_COMPILE_MODE} if backend == "inductor" else {"backend": backend}
    module.compile(fullgraph=False, **kw)


def compile_pipeline(pipe, mode: str | None = None, backend: str = "inductor") -> list[str]:
    """Compile the UNet and the VAE decoder of `pipe`; returns the names for logs."""
    compile_module(pipe.unet, mode, backend)
    compile_module(pipe.vae.decoder, mode, backend)
    return ["compile_unet", "compile_vae_decode"]


def load_vae(ref: str, root: Path, device: str, dtype_label: str):
    """A replacement VAE from a local diffusers folder (e.g. an fp16-safe SDXL VAE: the stock one
    overflows in fp16, which diffusers works around by upcasting the decode to fp32 — slower and
    more memory; an fp16-fixed VAE avoids that). Single files are refused by the schema: their
    config would come from the hub."""
    from diffusers import AutoencoderKL

    path = Path(root) / ref
    td = torch_dtype(dtype_label)
    try:
        check_diffusers_folder(path, "VAE")
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, torch_dtype=td)
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"could not load VAE {ref}: {type(e).__name__}: {e}; give a local diffusers VAE folder "
                       f"(config.json + diffusion_pytorch_model.safetensors)") from e
    return vae.to(device)
