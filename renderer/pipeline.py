"""Render ONE RenderJob on an already-loaded pipeline (docs/INTERFACES.md, `renderer.pipeline`).

`JobRenderer` keeps one base pipeline at a time (keyed by model digest and dtype), its
LoRA adapters, ControlNets and ControlNet pipeline variants, and renders jobs on them.

Parity: for a job without LoRA or control, the pixels equal a plain
`StableDiffusionXLPipeline.from_pretrained(folder)(prompt=..., negative_prompt=...,
num_inference_steps=..., guidance_scale=..., width=..., height=...,
generator=torch.Generator("cpu").manual_seed(seed))` call. castbook adds nothing hidden.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import JobError
from renderer import test_hooks
from renderer.control import ControlPreparer
from renderer.ip_adapter import IpAdapterManager
from renderer.loras import DEFAULT_MAX_LOADED, LoraManager
from renderer.models import (
    load_base_pipeline,
    load_controlnet,
    load_vae,
    make_scheduler,
    resolve_device,
    resolve_dtype,
)
from renderer.passes import run_passes
from renderer.performance import apply_performance, compile_module, compile_pipeline


@dataclass
class RenderOutput:
    image: object  # PIL.Image.Image
    control_maps: list = field(default_factory=list)  # [(file name, PIL image)]
    timings: dict = field(default_factory=dict)
    peak_memory_bytes: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    fallback: str | None = None
    lora_switched: bool = False


class JobRenderer:
    """Renders jobs one at a time, loading models lazily and caching them between jobs."""

    def __init__(
        self,
        root: Path,
        performance: dict | None = None,
        device: str | None = None,
        max_loras: int = DEFAULT_MAX_LOADED,
        inject_oom: int | None = None,
    ):
        self.root = Path(root).resolve()
        self.performance = dict(performance or {})
        self.device = resolve_device(device)
        # Hotswap only pays off with a compiled UNet (no recompile per LoRA switch).
        self.loras = LoraManager(self.root, max_loaded=max_loras,
                                 hotswap=bool(self.performance.get("lora_hotswap")),
                                 target_rank=self.performance.get("max_lora_rank"))
        self.controls = ControlPreparer(self.root)
        self.ip_adapters = IpAdapterManager(self.root)
        # Test hook (renderer/test_hooks.py): renders that raise a simulated CUDA OOM, so the fallback runs on CPU.
        self._inject_oom = test_hooks.injected_ooms() if inject_oom is None else inject_oom
        self.pipe = None
        self._pipe_key: tuple | None = None
        self._model_ref = ""
        self._base_scheduler_config = None
        self._controlnets: dict[tuple, object] = {}  # (digest, dtype) -> ControlNetModel
        self._control_pipes: dict[tuple, object] = {}  # tuple of controlnet keys -> pipeline
        self._pass_pipes: dict[tuple, object] = {}  # img2img/inpaint/refiner pipelines of the passes (renderer/passes.py)
        self._fallback: str | None = None
        self._compiled = False
        self.applied: list[str] = []  # performance options in effect (for logs and bench results)
        self.stats: dict = {"model_loads": 0, "lora_loads": self.loras.loads, "controlnet_loads": 0,
                            "control": self.controls.stats, "oom_fallbacks": 0, "jobs": 0,
                            "hotswap": self.loras.hotswap_stats, "compiled": False, "warmup_s": None}

    # ------------------------------------------------------------------ public

    def render(self, job) -> RenderOutput:
        """Render `job` (a `schemas.job.RenderJob`). Raises `JobError` with a user-facing message."""
        import torch

        t_start = time.perf_counter()
        timings = {"model_load_s": 0.0, "lora_load_s": 0.0, "lora_switch_s": 0.0, "control_s": 0.0,
                   "denoise_s": 0.0, "total_s": 0.0}
        # 1. check inputs before any expensive work
        dtype = resolve_dtype(job.dtype, self.device)
        if job.width % 8 or job.height % 8:
            raise JobError(f"{job.name}: width and height must be multiples of 8, got {job.width}x{job.height}")
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        # 2. base model (one at a time)
        t = time.perf_counter()
        pipe = self._base_pipe(job.base_model, dtype, job.vae)
        timings["model_load_s"] = time.perf_counter() - t
        if job.loras and self.performance.get("fuse_qkv"):
            raise JobError(f"{job.name}: performance.fuse_qkv cannot be combined with LoRAs (the fused q/k/v "
                           f"projection bypasses the LoRA layers, so they would silently do nothing); "
                           f"turn fuse_qkv off for specs with LoRAs")
        # 3. LoRA stack
        lora_info = self.loras.apply(pipe, job.loras, model_ref=job.base_model.ref)
        timings["lora_load_s"] = lora_info["lora_load_s"]
        timings["lora_switch_s"] = lora_info["lora_switch_s"]
        # 3b. IP-Adapter: loaded into the UNet every pipeline variant shares (unloaded for a job
        # without one); its image embeddings go into the pipeline kwargs, for later passes too
        t = time.perf_counter()
        ip_kwargs = self.ip_adapters.apply(pipe, job, dtype, guidance=job.guidance_scale > 1)
        timings["ip_adapter_s"] = time.perf_counter() - t
        # 4. controls: maps + ControlNet pipeline variant
        t = time.perf_counter()
        kwargs = dict(ip_kwargs)
        control_maps = []
        if job.controls:
            maps = []
            for c in job.controls:
                image, name = self.controls.prepare(c, job.width, job.height)
                maps.append(image)
                if name:
                    control_maps.append((name, image))
            run_pipe = self._control_pipe(job.controls, dtype)
            if len(job.controls) == 1:
                kwargs["image"] = maps[0]
                kwargs["controlnet_conditioning_scale"] = float(job.controls[0].scale)
            else:
                kwargs["image"] = maps
                kwargs["controlnet_conditioning_scale"] = [float(c.scale) for c in job.controls]
        else:
            run_pipe = pipe
        timings["control_s"] = time.perf_counter() - t
        # 5. compile once, after the first LoRAs are in (their layers are part of the graph)
        self._maybe_compile()
        # 6. scheduler, always from the base model's original config
        run_pipe.scheduler = make_scheduler(job.scheduler, self._base_scheduler_config)
        # 7. denoise + decode (with one OOM retry on CUDA)
        t = time.perf_counter()
        if job.passes is None:
            image = self._denoise(run_pipe, job, kwargs)
        else:  # 7b. first pass + finishing passes on the same components (renderer/passes.py)
            image = run_passes(self, run_pipe, job, kwargs, dtype, timings)
        timings["denoise_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        self.stats["jobs"] += 1
        return RenderOutput(
            image=image,
            control_maps=control_maps,
            timings=timings,
            peak_memory_bytes=self._peak_memory(),
            device=self.device,
            dtype=dtype,
            fallback=self._fallback,
            lora_switched=lora_info["lora_switched"],
        )

    def warmup(self, job) -> float:
        """Render `job` once and discard it: loads models and LoRAs and, with `compile`, builds the
        compiled graphs (minutes on SDXL), so per-image figures of later jobs exclude it.
        Returns the seconds taken (also kept in `stats["warmup_s"]`)."""
        t = time.perf_counter()
        self.render(job)
        self.stats["jobs"] -= 1  # not a job of the run
        seconds = time.perf_counter() - t
        self.stats["warmup_s"] = seconds
        return seconds

    def register_controlnet(self, model, controlnet, dtype: str = "auto") -> None:
        """Use an already-built ControlNet for jobs whose control model is `model` (a
        `ResolvedModel`), instead of loading it (e.g. a random SDXL ControlNet for benchmarks)."""
        dtype = resolve_dtype(dtype, self.device)
        self._controlnets[(model.digest, model.ref, dtype)] = controlnet.to(self.device)
        if self._compiled:
            self._compile_module(controlnet)

    def load_base_model(self, model, dtype: str = "auto", vae=None) -> None:
        """Load `model` (a `ResolvedModel`, with an optional replacement `vae`) now, e.g. in an
        actor's constructor; later jobs on the same model and VAE reuse it."""
        self._base_pipe(model, resolve_dtype(dtype, self.device), vae)

    def unload(self) -> None:
        """Drop every loaded model (frees memory)."""
        self.pipe = None
        self._pipe_key = None
        self._controlnets.clear()
        self._control_pipes.clear()
        self._pass_pipes.clear()
        self.loras.reset()
        self.ip_adapters.reset()
        self._fallback = None
        self._compiled = False
        self.stats["compiled"] = False
        self._free_cuda()

    # ------------------------------------------------------------------ internals

    def _base_pipe(self, model, dtype: str, vae=None):
        key = (model.digest, model.ref, dtype, vae.digest if vae is not None else None)
        if self._pipe_key == key:
            return self.pipe
        self.unload()  # keep one base model at a time
        offload = bool(self.performance.get("cpu_offload")) and self.device.startswith("cuda")
        pipe = load_base_pipeline(model, self.root, self.device, dtype, to_device=not offload)
        pipe.set_progress_bar_config(disable=True)
        if vae is not None:  # performance.vae, e.g. an fp16-fixed SDXL VAE
            pipe.register_modules(vae=load_vae(vae.ref, self.root, self.device if not offload else "cpu", dtype))
        self.applied = apply_performance(pipe, self.performance, self.device)
        self.pipe, self._pipe_key, self._model_ref = pipe, key, model.ref
        self._base_scheduler_config = pipe.scheduler.config
        self.stats["model_loads"] += 1
        return pipe

    def _control_pipe(self, controls, dtype: str):
        from diffusers import MultiControlNetModel, StableDiffusionXLControlNetPipeline

        keys = []
        for c in controls:
            k = (c.model.digest, c.model.ref, dtype)
            if k not in self._controlnets:
                self._controlnets[k] = load_controlnet(c.model, self.root, self.device, dtype)
                self.stats["controlnet_loads"] += 1
                if self._compiled:
                    self._compile_module(self._controlnets[k])
            keys.append(k)
        pkey = tuple(keys)
        if pkey not in self._control_pipes:
            nets = [self._controlnets[k] for k in keys]
            controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
            # Shares every component (UNet with its LoRA adapters, VAE, text encoders) with the base pipe.
            cp = StableDiffusionXLControlNetPipeline(**self.pipe.components, controlnet=controlnet)
            cp.set_progress_bar_config(disable=True)
            if self.performance.get("cpu_offload") and self.device.startswith("cuda"):
                cp.enable_model_cpu_offload(device=self.device)
            self._control_pipes[pkey] = cp
        return self._control_pipes[pkey]

    def _maybe_compile(self) -> None:
        if not self.performance.get("compile") or self._compiled:
            return
        names = compile_pipeline(self.pipe, self.performance.get("compile_mode"),
                                 backend=self.performance.get("compile_backend", "inductor"))
        for cn in self._controlnets.values():
            self._compile_module(cn)
        self.applied += names
        self._compiled = True
        self.stats["compiled"] = True

    def _compile_module(self, module) -> None:
        compile_module(module, self.performance.get("compile_mode"), self.performance.get("compile_backend", "inductor"))

    def _call(self, pipe, job, kwargs):
        import numpy as np
        import torch
        from diffusers.image_processor import VaeImageProcessor

        if self._inject_oom > 0:
            self._inject_oom -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by CASTBOOK_INJECT_OOM for testing)")
        out = pipe(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            width=job.width,
            height=job.height,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            **{"output_type": "np", **kwargs},  # float pixels, to see NaNs; converted exactly as output_type="pil" would
        )
        if kwargs.get("output_type") == "latent":  # a finishing pass continues from the latents (renderer/passes.py)
            return out.images
        arr = out.images
        if np.isnan(arr).any():
            raise JobError(
                f"{job.name}: the image contains NaN values (numerical overflow, often fp16 with this model "
                f"or VAE); try dtype: bf16 or fp32"
            )
        return VaeImageProcessor.numpy_to_pil(arr)[0]

    def _denoise(self, pipe, job, kwargs):
        import torch

        try:
            return self._call(pipe, job, kwargs)
        except torch.cuda.OutOfMemoryError as first:
            self.oom_fallback(pipe)
            try:
                return self._call(pipe, job, kwargs)
            except torch.cuda.OutOfMemoryError as e:
                raise JobError(
                    f"{job.name}: out of GPU memory even with {self._fallback} ({e}); "
                    f"render smaller images or use a GPU with more memory"
                ) from first

    def oom_fallback(self, pipe) -> str:
        """After a CUDA out-of-memory error: free the cache, tile the VAE and, on CUDA, offload models
        to the CPU between uses. Sticky: the next jobs would run out of memory too. Returns what was
        applied (`vae_tiling+cpu_offload`)."""
        self._free_cuda()
        self.stats["oom_fallbacks"] += 1
        applied = ["vae_tiling"]
        pipe.vae.enable_tiling()
        if self.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=self.device)
            applied.append("cpu_offload")
        self._fallback = "+".join(applied)
        return self._fallback

    def _peak_memory(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def _free_cuda(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
