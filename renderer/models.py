"""Loading base models, ControlNets and VAEs: built-ins, local diffusers folders, single-file safetensors.

Offline always (`local_files_only=True`). Weights are only ever read from safetensors: pickle
formats (`schemas.spec.PICKLE_SUFFIXES`: `.ckpt`, `.bin`, `.pt`, `.pth`, ...) can run code when
opened, so they are refused before the file is opened. Built-in weights come from
`renderer.builtins`; load-time performance options are `renderer.performance`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from core.errors import JobError
from renderer.builtins import build_sdxl_random_pipeline, builtin_dir, builtin_name
from schemas.builtins import BASE_MODELS, CONTROLNET_MODELS
from schemas.schedulers import SCHEDULERS
from schemas.spec import PICKLE_SUFFIXES

WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",)



DTYPE_LABELS = ("fp32", "fp16", "bf16")

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
    recipe = SCHEDULERS[name]
    return getattr(diffusers, recipe.cls).from_config(base_config, **recipe.config)


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
            # renderer/single_file.py: kind from the header, config chosen by shape (or `config:`), offline
            from renderer.single_file import load_single_file

            path = Path(root) / model.ref
            check_safetensors_file(path, "base model")
            cfg = Path(root) / model.config if model.config else None
            pipe = load_single_file(path, cfg, td, want="sdxl-base")
        else:
            raise JobError(f"unknown base model kind {model.kind!r} for {model.ref}")
    except JobError:
        raise
    except Exception as e:  # diffusers raises many types; the user needs the file and the reason
        raise JobError(f"could not load base model {model.ref}: {type(e).__name__}: {e}") from e
    return pipe.to(device) if to_device else pipe


def load_refiner_pipeline(model, root: Path, device: str, dtype_label: str, to_device: bool = True):
    """Load an SDXL refiner as a `StableDiffusionXLImg2ImgPipeline` (offline, safetensors only):
    a single-file refiner checkpoint (original layout; config chosen by shape from
    renderer/configs/sdxl-refiner unless `model.config` names one) or a diffusers folder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    td = torch_dtype(dtype_label)
    try:
        if model.kind == "single_file":
            from renderer.single_file import load_single_file

            path = Path(root) / model.ref
            check_safetensors_file(path, "refiner")
            # Any SDXL checkpoint may refine (A1111 allows a base fine-tune as refiner too).
            pipe = load_single_file(path, Path(root) / model.config if model.config else None, td, want=None)
        elif model.kind == "diffusers":
            path = Path(root) / model.ref
            check_diffusers_folder(path, "refiner")
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                                    torch_dtype=td)
        else:
            raise JobError(f"{model.ref} is not a refiner; give a refiner .safetensors checkpoint or diffusers folder")
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"could not load refiner {model.ref}: {type(e).__name__}: {e}") from e
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
