"""LoRA stacks on a loaded SDXL pipeline: load each file once, switch with `set_adapters`.

Each LoRA file becomes a named peft adapter (name = registry name) the first time a job
needs it, and stays loaded; a job's stack only changes the active adapters and their
weights. Jobs without LoRAs disable adapters (exactly the base model's pixels). At most
`max_loaded` adapters stay loaded: the least recently used ones not needed now are deleted.

Both diffusers/peft-format (`unet.…lora_A.weight`) and kohya-format (`lora_unet_…`,
`lora_te1_…`, `.alpha`) safetensors files load; only safetensors files are accepted.

Hotswap mode (`performance.lora_hotswap`, for a compiled UNet): adapters are named slots
(`hotswap-0`, `hotswap-1`, …) instead of registry names, and a LoRA that is not loaded
replaces the weights of a slot in place (`load_lora_weights(..., hotswap=True)`), so the
compiled graph stays valid and nothing recompiles. `pipe.enable_lora_hotswap(target_rank=R)`
runs before the first load; R must be the largest rank ever loaded (smaller ranks are
zero-padded), so pass the registry's max rank; without it the first stack's max rank is used.
Text-encoder LoRA layers cannot be hotswapped (diffusers): such a file, or a file with a
larger rank, falls back to a normal load (counted in `hotswap_fallbacks`; a compiled
model then recompiles once).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

from core.errors import JobError
from renderer.models import check_safetensors_file

DEFAULT_MAX_LOADED = 8


def lora_file_keys(path: Path) -> list[str]:
    """The tensor names in a LoRA safetensors file (reads the header only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def lora_file_rank(path: Path) -> int | None:
    """The largest LoRA rank in a safetensors file (from the header's tensor shapes), or None."""
    from safetensors import safe_open

    ranks = []
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if ".lora_A." in k or ".lora.down." in k or ".lora_down." in k:
                ranks.append(f.get_slice(k).get_shape()[0])
    return max(ranks) if ranks else None


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

    def __init__(self, root: Path, max_loaded: int = DEFAULT_MAX_LOADED, hotswap: bool = False,
                 target_rank: int | None = None):
        self.root = Path(root)
        self.max_loaded = max_loaded
        self.hotswap = hotswap
        self.target_rank = target_rank
        self.slots: OrderedDict[str, tuple[str, str]] = OrderedDict()  # hotswap: slot -> (name, digest), LRU first
        self.hotswap_stats = {"hotswaps": 0, "hotswap_fallbacks": 0, "target_rank": None}
        self._hotswap_ready = False  # enable_lora_hotswap has run on this pipeline
        self._active_slots: tuple | None = None  # hotswap: adapters currently set active, in order
        self._base_scaling: dict[str, list] = {}  # hotswap: slot -> [(scaling dict, unweighted value)]
        self.loaded: OrderedDict[str, str] = OrderedDict()  # name -> digest, least recently used first
        self.loads: dict[str, int] = {}  # name -> number of times its file was loaded
        self.active: tuple | None = None  # ((name, weight), ...) currently set; () = disabled
        self._disabled = False

    def reset(self) -> None:
        """The pipeline (and with it every adapter) is gone."""
        self.loaded.clear()
        self.slots.clear()
        self._active_slots = None
        self._base_scaling.clear()
        self.active = None
        self._disabled = False
        self._hotswap_ready = False

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
        if self.hotswap:
            return self._apply_hotswap(pipe, stack, by_name, model_ref)
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
        switched = self._switch(pipe, stack, [n for n, _ in stack])
        total = time.perf_counter() - t0
        return {"lora_load_s": load_s, "lora_switch_s": max(total - load_s, 0.0), "lora_switched": switched}

    def _switch(self, pipe, stack: tuple, adapters: list[str]) -> bool:
        """Make `adapters` (peft names, in `stack` order) active with the stack's weights."""
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
                pipe.set_adapters(adapters, [w for _, w in stack])
            self.active = stack
        return switched

    def _apply_hotswap(self, pipe, stack: tuple, by_name: dict, model_ref: str) -> dict:
        load_s = 0.0
        t0 = time.perf_counter()
        if stack and not self._hotswap_ready:
            # Before the first load: pads every adapter to one rank and makes scalings tensors,
            # so later swaps change only tensor values, never shapes or Python constants.
            rank = self.target_rank or max(
                (lora_file_rank(self.root / by_name[n].path) or 1) for n, _ in stack)
            pipe.enable_lora_hotswap(target_rank=rank, check_compiled="ignore")
            self.hotswap_stats["target_rank"] = rank
            self._hotswap_ready = True
        held = {v: slot for slot, v in self.slots.items()}  # (name, digest) -> slot
        needed = {(n, by_name[n].digest) for n, _ in stack}
        for name, _ in stack:
            lora = by_name[name]
            if (name, lora.digest) in held:
                continue
            t = time.perf_counter()
            free = next((s for s, v in self.slots.items() if v not in needed), None)
            if free is None:  # every slot holds a LoRA this stack needs: add a slot (first loads)
                slot = f"hotswap-{len(self.slots)}"
                self._load(pipe, lora, needed=set(), model_ref=model_ref, adapter_name=slot)
                self._active_slots = None  # load_lora_weights activated only the new slot
                # diffusers pads/tensorises only at the FIRST load; later slots need it too.
                from peft.utils.hotswap import prepare_model_for_compiled_hotswap

                prepare_model_for_compiled_hotswap(pipe.unet, target_rank=self.hotswap_stats["target_rank"],
                                                   check_compiled="ignore")
            else:
                slot = free
                self._hotswap_into(pipe, lora, slot, model_ref)
            self.slots[slot] = (name, lora.digest)
            held[(name, lora.digest)] = slot
            self.loaded = OrderedDict((v[0], v[1]) for v in self.slots.values())
            load_s += time.perf_counter() - t
        slots = [held[(n, by_name[n].digest)] for n, _ in stack]
        for slot in slots:
            self.slots.move_to_end(slot)
        switched = self._switch_in_place(pipe, stack, slots)
        total = time.perf_counter() - t0
        return {"lora_load_s": load_s, "lora_switch_s": max(total - load_s, 0.0), "lora_switched": switched}

    def _switch_in_place(self, pipe, stack: tuple, slots: list[str]) -> bool:
        """Like `_switch`, but LoRA weights become values in the (tensor) scalings, filled in place.

        `set_adapters` writes Python floats into every layer's `scaling`, and a compiled graph
        is specialised on those floats: each new weight would recompile. Only a change of the
        active adapter list goes through `set_adapters` (that recompiles anyway). The list is in
        LoRA name order, as in normal mode, so the float sum (the pixels) does not depend on
        which slot a LoRA landed in; a stack whose names sort in the other slot order therefore
        builds one more graph (at most K! per K-LoRA active set, each cached by torch.compile).
        """
        import torch

        switched = stack != self.active
        if not switched:
            return False
        if not stack:
            if self.slots:
                pipe.disable_lora()
                self._disabled = True
            self.active = stack
            return True
        if self._disabled:
            pipe.enable_lora()
            self._disabled = False
        if tuple(slots) != self._active_slots:
            pipe.set_adapters(list(slots), [1.0] * len(slots))
            self._active_slots = tuple(slots)
        for slot, (_, weight) in zip(slots, stack):
            for scaling, base in self._base_scaling.get(slot, []):
                value = base * weight
                current = scaling[slot]
                if isinstance(current, torch.Tensor):
                    current.fill_(value)
                else:
                    scaling[slot] = torch.tensor(value)
        self.active = stack
        return True

    def _record_base_scaling(self, pipe, slot: str) -> None:
        """The slot's unweighted scalings (alpha / r of the file just loaded), per LoRA layer."""
        from peft.tuners.lora import LoraLayer

        entries = []
        for name in ("unet", "text_encoder", "text_encoder_2"):
            model = getattr(pipe, name, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, LoraLayer) and slot in module.scaling:
                    entries.append((module.scaling, float(module.scaling[slot])))
        self._base_scaling[slot] = entries

    def _hotswap_into(self, pipe, lora, slot: str, model_ref: str) -> None:
        path = self.root / lora.path
        check_safetensors_file(path, f"LoRA {lora.name!r}")
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=slot, hotswap=True,
                                   use_safetensors=True, local_files_only=True)
            self.hotswap_stats["hotswaps"] += 1
            self._record_base_scaling(pipe, slot)
            self.loads[lora.name] = self.loads.get(lora.name, 0) + 1
        except Exception:
            # e.g. text-encoder layers or a rank above target_rank: replace the slot the slow way.
            self.hotswap_stats["hotswap_fallbacks"] += 1
            pipe.delete_adapters(slot)
            self._active_slots = None
            self._load(pipe, lora, needed=set(), model_ref=model_ref, adapter_name=slot)
        self.active = None

    def _load(self, pipe, lora, needed: set[str], model_ref: str, adapter_name: str | None = None) -> None:
        adapter = adapter_name or lora.name
        path = self.root / lora.path
        check_safetensors_file(path, f"LoRA {lora.name!r}")
        keys = lora_file_keys(path)
        if not keys:
            raise JobError(f"LoRA {lora.name!r} file {lora.path} has no tensors")
        if adapter_name is None and lora.name in self.loaded:  # same name, different file digest: the file changed
            self._delete(pipe, lora.name)
        while adapter_name is None and len(self.loaded) >= self.max_loaded:
            victim = next((n for n in self.loaded if n not in needed), None)
            if victim is None:
                break  # the job itself needs more than the cap; allow it
            self._delete(pipe, victim)
        fmt = lora_format(keys)
        try:
            pipe.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=adapter,
                use_safetensors=True, local_files_only=True,
            )
        except Exception as e:
            self._forget_partial(pipe, adapter)
            raise JobError(
                f"LoRA {lora.name!r} ({lora.path}, {fmt} format, {len(keys)} tensors) does not fit base model "
                f"{model_ref}: {type(e).__name__}: {_short(e)}. Use a LoRA trained for this base model"
            ) from e
        # diffusers may only warn when keys match nothing: check the adapter really landed somewhere.
        placed = [c for c, names in pipe.get_list_adapters().items() if adapter in names]
        if not placed:
            self._forget_partial(pipe, adapter)
            raise JobError(
                f"LoRA {lora.name!r} ({lora.path}, {fmt} format): none of its {len(keys)} tensors "
                f"(e.g. {keys[0]!r}) match a layer of base model {model_ref}, so it would change nothing. "
                f"It was probably trained for a different base model; use a LoRA made for {model_ref}"
            )
        if adapter_name is None:
            self.loaded[lora.name] = lora.digest
        else:
            self._record_base_scaling(pipe, adapter)
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
