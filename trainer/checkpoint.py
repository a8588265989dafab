"""Checkpoints: LoRA weights + optimizer + lr scheduler + RNG states + step, with no pickles.

A checkpoint is a folder `checkpoints/step-000020/`:
  lora.safetensors       diffusers-format LoRA (what samples and `load_lora_weights` use)
  trainable.safetensors  every trainable tensor by name (exact resume)
  optimizer.safetensors  AdamW state tensors + torch RNG states (uint8 tensors)
  state.json             step, optimizer param groups, lr scheduler / grad scaler state, loss history
It is written into a temporary folder and renamed into place, so a killed run never
leaves a half-written checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.files import new_temp_folder, swap_in_folder
from trainer.errors import TrainingError
from trainer.export import save_diffusers_lora

CHECKPOINT_PREFIX = "step-"
FORMAT_VERSION = 1


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (a folder is swapped in only when whole)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(CHECKPOINT_PREFIX + "*") if (p / "state.json").is_file())


def best_step(clip_i: dict[int, float]) -> int | None:
    """The step with the highest CLIP-I (the later one on ties); None without scores."""
    return max(clip_i, key=lambda s: (clip_i[s], s)) if clip_i else None


def rng_state_tensors() -> dict:
    import torch

    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.torch_cuda.{i}"] = s
    return out


def restore_rng(tensors: dict) -> None:
    import torch

    if "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].to(torch.uint8))
    cuda = sorted(k for k in tensors if k.startswith("rng.torch_cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])


def _jsonable(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if callable(obj):
        return None  # lr lambdas are rebuilt from the spec, not saved
    return obj


def save(trainer) -> Path:
    """Write the checkpoint of the current step and prune old ones (keeps the last K and the best)."""
    from safetensors.torch import save_file

    ck_dir = trainer.paths.checkpoints
    final = ck_dir / f"{CHECKPOINT_PREFIX}{trainer.step:06d}"
    tmp = new_temp_folder(final)
    try:
        save_diffusers_lora(tmp / "lora.safetensors", trainer.lora_layers(), trainer.adapter_configs(),
                            trainer.header_metadata())
        save_file({k: v.detach().cpu().contiguous() for k, v in trainer.trainable.items()},
                  tmp / "trainable.safetensors")
        opt = trainer.optimizer.state_dict()
        tensors = {}
        for idx, st in opt["state"].items():
            for name, value in st.items():
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
        tensors.update(rng_state_tensors())
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {
            "format": FORMAT_VERSION,
            "step": trainer.step,
            "spec_hash": trainer.prep.spec_hash,
            "dataset_digest": trainer.prep.dataset_digest,
            "param_groups": _jsonable(opt["param_groups"]),
            "lr_scheduler": _jsonable(trainer.lr_scheduler.state_dict()),
            "grad_scaler": _jsonable(trainer.scaler.state_dict()),
            "losses": trainer.losses,
            "step_seconds": trainer.step_seconds,
            "samples": {str(k): v for k, v in trainer.samples.items()},
            "clip_i": {str(k): v for k, v in trainer.clip_i.items()},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        swap_in_folder(tmp, final)  # fsyncs the files, then renames: never a half-written checkpoint
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(trainer, ck_dir)
    return final


def _prune(trainer, ck_dir: Path) -> None:
    keep = set(list_checkpoints(ck_dir)[-trainer.spec.checkpoints.keep_last :])
    best = best_step(trainer.clip_i)
    if best is not None:
        keep.add(ck_dir / f"{CHECKPOINT_PREFIX}{best:06d}")
    for p in list_checkpoints(ck_dir):
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def resume_latest(trainer) -> Path:
    """Load the newest checkpoint into `trainer` (weights, optimizer, scheduler, RNG, step, history)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    found = list_checkpoints(trainer.paths.checkpoints)
    if not found:
        raise TrainingError(f"--resume: no checkpoint in {trainer.paths.checkpoints}; run without --resume to start")
    path = found[-1]
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(path / "trainable.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TrainingError(f"--resume: checkpoint {path} cannot be read ({e}); delete that folder to resume from "
                            f"the one before it, or delete {trainer.paths.run_dir} to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found_format = state.get("format") if isinstance(state, dict) else None
        raise TrainingError(f"--resume: checkpoint {path} has format {found_format!r}; this castbook reads format "
                            f"{FORMAT_VERSION}. Delete {trainer.paths.run_dir} to start over")
    if state.get("spec_hash") != trainer.prep.spec_hash:
        raise TrainingError(
            f"--resume: checkpoint {path} was made from a different training spec (hash "
            f"{state.get('spec_hash', '?')[:12]} vs {trainer.prep.spec_hash[:12]}); restore the spec, or delete "
            f"{trainer.paths.run_dir} to start over"
        )
    if state.get("dataset_digest") != trainer.prep.dataset_digest:
        raise TrainingError(f"--resume: the dataset changed since checkpoint {path}; restore it or start over")
    missing = set(trainer.trainable) - set(weights)
    if missing:
        raise TrainingError(f"--resume: checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {min(missing)})")
    with torch.no_grad():
        for name, p in trainer.trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    sched = {k: v for k, v in state["lr_scheduler"].items() if k != "lr_lambdas"}
    trainer.lr_scheduler.load_state_dict({**trainer.lr_scheduler.state_dict(), **sched})
    if state.get("grad_scaler"):
        trainer.scaler.load_state_dict(state["grad_scaler"])
    restore_rng(tensors)
    trainer.step = state["step"]
    trainer.losses = list(state["losses"])
    trainer.step_seconds = list(state.get("step_seconds", []))
    trainer.samples = {int(k): v for k, v in state.get("samples", {}).items()}
    trainer.clip_i = {int(k): v for k, v in state.get("clip_i", {}).items()}
    return path
