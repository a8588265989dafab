"""`castbook models convert FILE --to safetensors`: a pickled `.bin`/`.pt`/`.ckpt`/`.pth` -> `.safetensors`.

The pickle is read with `torch.load(weights_only=True)`, torch's restricted unpickler: it rebuilds
tensors and plain containers only and refuses every other global, so a payload in the file never
runs. Nested dicts of tensors (IP-Adapter's `{"image_proj": {...}, "ip_adapter": {...}}`) are
flattened with dotted keys, the layout diffusers' loaders expect; a Lightning-style `state_dict`
wrapper is unwrapped. Anything that is not a tensor (numbers, strings, objects) is refused with the
key that holds it. Rendering still never opens pickles (renderer/models.py).
"""

from __future__ import annotations

from pathlib import Path

from core.errors import JobError
from renderer.single_file import save_file_atomically
from schemas.spec import PICKLE_SUFFIXES


def _flatten(obj, prefix: str, out: dict, path: Path) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise JobError(f"{path}: key {k!r} under {prefix or 'the top level'} is not a string; only dicts of tensors convert")
            _flatten(v, f"{prefix}.{k}" if prefix else k, out, path)
    else:
        raise JobError(f"{path} holds more than tensors: {prefix or 'the top level'} is a {type(obj).__name__}; "
                       f"castbook converts only (nested) dicts of tensors")


def convert_to_safetensors(path: Path, out: Path | None = None) -> Path:
    """Convert `path` (a pickle of tensors) to `out` (default: same name, `.safetensors`); atomic write."""
    import pickle

    import torch

    path = Path(path)
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise JobError(f"{path} is not a pickle file ({', '.join(PICKLE_SUFFIXES)}); nothing to convert")
    if not path.is_file():
        raise JobError(f"{path} does not exist")
    out = Path(out) if out else path.with_suffix(".safetensors")
    if out.exists():
        raise JobError(f"{out} exists; remove it or choose another output name")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"{path} needs more than tensors to load and was refused without running it ({first}). "
                       f"Only convert files from sources you trust; castbook never runs code from model files") from e
    except Exception as e:
        raise JobError(f"{path} could not be read as a torch file: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and set(obj) >= {"state_dict"} and isinstance(obj["state_dict"], dict):
        extra = [k for k in obj if k != "state_dict"]
        if extra:
            raise JobError(f"{path} holds {', '.join(map(str, extra))} beside its state_dict; castbook converts only tensors")
        obj = obj["state_dict"]
    tensors: dict = {}
    _flatten(obj, "", tensors, path)
    if not tensors:
        raise JobError(f"{path} holds no tensors")
    # safetensors refuses shared storage (tied weights): give each tensor its own contiguous copy.
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    return save_file_atomically(tensors, out, {"format": "pt", "castbook.converted_from": path.name})
