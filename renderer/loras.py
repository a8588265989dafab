"""LoRA stacks on a loaded SDXL pipeline: load each file once, switch with `set_adapters`.

Each LoRA file becomes a named peft adapter (name = registry name) the first time a job
needs it, and stays loaded; a job's stack only changes the active adapters and their
weights. Jobs without LoRAs disable adapters (exactly the base model's pixels). At most
`max_loaded` adapters stay loaded: the least recently used ones not needed now are deleted.

Both diffusers/peft-format (`unet.…lora_A.weight`) and kohya-format (`lora_unet_…`,
`lora_te1_…`, `.alpha`) safetensors files load; only safetensors files are accepted.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

from renderer.errors import JobError
from renderer.models import check_safetensors_file

DEFAULT_MAX_LOADED = 8


def lora_file_keys(path: Path) -> list[str]:
    """The tensor names in a LoRA safetensors file (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def lora_format(keys: list[str]) -> str:
    """`kohya`, `peft` (diffusers/peft names) or `unknown`."""
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")) for k in keys):
        return "kohya"
    if any((".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k
            or ".lora_down." in k or ".lora_up." in k) for k in keys):
        return "peft"
    return "unknown"


def _short(e: Exception, limit: int = 400) -> str:
    """The first lines of a (possibly huge, e.g. size-mismatch) library error."""
    text = str(e).strip()
    return text if len(text) <= limit else text[:limit].rstrip() + f" … ({len(text) - limit} more characters)"


class LoraManager:
    """Owns the adapters loaded into ONE pipeline. Call `reset()` when the pipeline is replaced."""

    def __init__(self, root: Path, max_loaded: int = DEFAULT_MAX_LOADED):
        self.root = Path(root)
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # name -> digest, least recently used first
        self.loads: dict[str, int] = {}  # name -> number of times its file was loaded
        self.active: tuple | None = None  # ((name, weight), ...) currently set; () = disabled
        self._disabled = False

    def reset(self) -> None:
        """The pipeline (and with it every adapter) is gone."""
        self.loaded.clear()
        self.active = None
        self._disabled = False

    def apply(self, pipe, loras, model_ref: str = "base model") -> dict:
        """Make `loras` (a job's `ResolvedLora`s) the active stack on `pipe`.

        Returns {"lora_load_s", "lora_switch_s", "lora_switched"}.
        """
        # Sorted by name: LoRA deltas are summed, and a fixed order makes the float sum
        # (and so the pixels) independent of the order the spec lists them.
        stack = tuple(sorted(((l.name, float(l.weight)) for l in loras), key=lambda t: t[0]))
        by_name = {l.name: l for l in loras}
        if len(by_name) != len(loras):
            raise JobError(f"the LoRA stack lists the same LoRA twice: {[l.name for l in loras]}")
        load_s = 0.0
        t0 = time.perf_counter()
        # 1. load missing files (evicting least recently used adapters beyond the cap)
        for name, _ in stack:
            lora = by_name[name]
            if self.loaded.get(name) != lora.digest:
                t = time.perf_counter()
                self._load(pipe, lora, needed=set(by_name), model_ref=model_ref)
                load_s += time.perf_counter() - t
            self.loaded.move_to_end(name)
        # 2. switch the active stack
        switched = stack != self.active
        if switched:
            if not stack:
                if self.loaded:
                    pipe.disable_lora()
                    self._disabled = True
            else:
                if self._disabled:
                    pipe.enable_lora()
                    self._disabled = False
                pipe.set_adapters([n for n, _ in stack], [w for _, w in stack])
            self.active = stack
        total = time.perf_counter() - t0
        return {"lora_load_s": load_s, "lora_switch_s": max(total - load_s, 0.0), "lora_switched": switched}

    def _load(self, pipe, lora, needed: set[str], model_ref: str) -> None:
        path = self.root / lora.path
        check_safetensors_file(path, f"LoRA {lora.name!r}")
        keys = lora_file_keys(path)
        if not keys:
            raise JobError(f"LoRA {lora.name!r} file {lora.path} has no tensors")
        if lora.name in self.loaded:  # same name, different file digest: the file changed
            self._delete(pipe, lora.name)
        while len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if n not in needed), None)
            if victim is None:
                break  # the job itself needs more than the cap; allow it
            self._delete(pipe, victim)
        fmt = lora_format(keys)
        try:
            pipe.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=lora.name,
                use_safetensors=True, local_files_only=True,
            )
        except Exception as e:
            self._forget_partial(pipe, lora.name)
            raise JobError(
                f"LoRA {lora.name!r} ({lora.path}, {fmt} format, {len(keys)} tensors) does not fit base model "
                f"{model_ref}: {type(e).__name__}: {_short(e)}. Use a LoRA trained for this base model"
            ) from e
        # diffusers may only warn when keys match nothing: check the adapter really landed somewhere.
        placed = [c for c, names in pipe.get_list_adapters().items() if lora.name in names]
        if not placed:
            self._forget_partial(pipe, lora.name)
            raise JobError(
                f"LoRA {lora.name!r} ({lora.path}, {fmt} format): none of its {len(keys)} tensors "
                f"(e.g. {keys[0]!r}) match a layer of base model {model_ref}, so it would change nothing. "
                f"It was probably trained for a different base model; use a LoRA made for {model_ref}"
            )
        self.loaded[lora.name] = lora.digest
        self.loads[lora.name] = self.loads.get(lora.name, 0) + 1
        self.active = None  # load_lora_weights activates only the new adapter: re-set the stack

    def _delete(self, pipe, name: str) -> None:
        pipe.delete_adapters(name)
        self.loaded.pop(name, None)
        self.active = None

    @staticmethod
    def _forget_partial(pipe, name: str) -> None:
        try:
            if any(name in names for names in pipe.get_list_adapters().values()):
                pipe.delete_adapters(name)
        except Exception:  # best effort: the original error is what the user needs
            pass
