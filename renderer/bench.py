"""`castbook bench`: castbook's render path against a bare diffusers loop, in one process.

One fixed job set is rendered twice on the SAME pipeline object, interleaved image by image
(so drift, clocks and caches hit both sides alike):

* castbook: `RenderActor.render(job=...)` in-process — what the runner's actor runs
  (JobRenderer → PNG with metadata), without Ray;
* bare: `pipe(prompt=..., generator=...)` on the actor's own pipeline.

Reported: s/image p50/p95 of both and their ratio, peak memory, model load, warm-up /
first compile, LoRA switch costs with and without hotswap (and the recompiles each causes),
and the model FLOPs per image (counted on the meta device, `renderer.flops`) → achieved
TFLOP/s and % of the GPU's bf16 peak. Everything lands in a results JSON and in a run-like
directory (`run.json` with `"kind": "bench"`, `plan.jsonl`, `manifest.jsonl`, images) that
`reports/benchmark.py` reads for its trends; both go under `--out` only.

LoRA files and the control image are generated (seeded) into a temporary folder
(`renderer.bench_assets`); the terminal summary is `renderer.bench_summary`.
"""

from __future__ import annotations

import platform
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from core.digests import file_digest
from core.errors import JobError
from renderer.bench_assets import make_control_image, make_lora_files, resolve_model
from schemas.base import Strict
from schemas.job import RenderJob, ResolvedControl, ResolvedLora, ResolvedModel, job_key
from schemas.records import ManifestRecord, RenderResult
from schemas.schedulers import SchedulerName

BENCH_VERSION = 1
MEMORY_BUDGET_BYTES = 10 * 10**9  # SDXL bf16 + 2 LoRAs at 1024² should fit (issue target)


class BenchOptions(Strict):
    """What `castbook bench` renders. Defaults: the GPU figure of merit (SDXL 1024², 30 steps)."""

    model: str = "builtin:sdxl-random"
    size: int = Field(1024, ge=16)
    steps: int = Field(30, ge=1)
    images: int = Field(8, ge=1)
    compile: bool = False
    compile_mode: str | None = None  # None: renderer.performance.DEFAULT_COMPILE_MODE
    compile_backend: str = "inductor"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    loras: int = Field(0, ge=0, le=8)
    lora_rank: int = Field(8, ge=1)
    hotswap: bool | None = None  # None: on when compiled
    switch_both: bool | None = None  # also measure the other LoRA mode (second pipeline); None: tiny models only
    controlnet: bool = False
    batch: int = Field(0, ge=0)  # >1: also time one batched call of this many jobs on the bare pipe
    guidance_scale: float = 5.0
    scheduler: SchedulerName = "euler"  # few-step ones (lcm, tcd, euler_trailing) with --steps 4
    device: str | None = None
    channels_last: bool = False
    fuse_qkv: bool = False


# --------------------------------------------------------------------------- small helpers


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def dynamo_graphs() -> int:
    """Graphs torch.compile has built so far in this process (each recompile adds one)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _with_key(job: RenderJob) -> RenderJob:
    # schemas.job, not schemas.expand: expansion's prompt templates need jinja2, which the GPU box lacks.
    return job.model_copy(update={"key": job_key(job)})


# --------------------------------------------------------------------------- the render paths


def make_actor(root: Path, performance: dict, model: ResolvedModel, device: str | None, dtype: str):
    """The runner's RenderActor, in-process (no Ray), with `model` loaded."""
    from renderer.actor import RenderActor

    actor = RenderActor(root=root, performance=performance, base_model=model, device=device, dtype=dtype)
    if actor.load_error:
        raise JobError(f"could not load {model.ref}: {actor.load_error}")
    return actor


def _castbook_render(actor, job: RenderJob) -> RenderResult:
    res = actor.render(job=job)
    if res.error:
        raise JobError(f"bench job {job.name} failed in castbook's path: {res.error}")
    return res


def _bare_pipe(renderer, controlnet):
    """The pipeline object the bare loop calls: the actor's own, or a ControlNet pipe sharing its modules."""
    if controlnet is None:
        return renderer.pipe
    from diffusers import StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline(**renderer.pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bare_call(pipe, jobs: list[RenderJob], control_image, device: str):
    """One plain diffusers call for `jobs` (same settings, one or more prompts/seeds)."""
    import torch

    from renderer.models import make_scheduler

    j = jobs[0]
    pipe.scheduler = make_scheduler(j.scheduler, pipe.scheduler.config)
    kwargs = {}
    if control_image is not None:
        kwargs = {"image": control_image, "controlnet_conditioning_scale": float(j.controls[0].scale)}
    gens = [torch.Generator("cpu").manual_seed(x.seed) for x in jobs]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    images = pipe(
        prompt=[x.prompt for x in jobs] if len(jobs) > 1 else j.prompt,
        negative_prompt=[x.negative_prompt for x in jobs] if len(jobs) > 1 else j.negative_prompt,
        num_inference_steps=j.num_inference_steps, guidance_scale=j.guidance_scale,
        width=j.width, height=j.height, generator=gens if len(jobs) > 1 else gens[0], **kwargs,
    ).images
    seconds = time.perf_counter() - t
    peak = int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else peak_rss_bytes()
    return images, seconds, peak


def _pixels(png_or_image):
    import io

    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(png_or_image)) if isinstance(png_or_image, bytes) else png_or_image
    return np.asarray(img.convert("RGB"), dtype=np.int16)


# --------------------------------------------------------------------------- LoRA switching


def measure_lora_switch(actor, base: RenderJob, loras: list[ResolvedLora], extra: ResolvedLora) -> dict:
    """Switch costs on `actor`'s pipeline, in its mode (hotswap or plain load):

    1. stack (a, b) at weights (0.8, 0.6) — sets the state, not timed;
    2. same files, weights (0.5, 0.9): `set_adapters` only;
    3. `b` replaced by a LoRA not loaded yet (it sorts after `a` too, so the active adapter order,
       which is name order for reproducible sums, stays the same): hotswap into b's slot, or a
       normal load.
    Each reports the switch seconds, that job's render seconds and the graphs compiled for it.
    """
    a, b = loras[0], loras[1]

    def job(stack, seed):
        return _with_key(base.model_copy(update={"loras": tuple(stack), "seed": seed,
                                                 "name": f"bench/switch/{seed}"}))

    def run(j):
        g0 = dynamo_graphs()
        res = _castbook_render(actor, j)
        return res, dynamo_graphs() - g0

    w = lambda lora, x: lora.model_copy(update={"weight": x})  # noqa: E731
    _castbook_render(actor, job([w(a, 0.8), w(b, 0.6)], 9001))
    r1, g1 = run(job([w(a, 0.5), w(b, 0.9)], 9002))
    r2, g2 = run(job([w(a, 0.5), w(extra, 0.9)], 9003))
    hs = getattr(actor.renderer.loras, "hotswap", False)
    return {
        "mode": "hotswap" if hs else "load",
        "set_adapters_s": r1.timings["lora_switch_s"],
        "set_adapters_render_s": r1.seconds,
        "set_adapters_new_graphs": g1,
        "new_file_s": r2.timings["lora_load_s"] + r2.timings["lora_switch_s"],
        "new_file_render_s": r2.seconds,
        "new_file_new_graphs": g2,
        "hotswap_stats": dict(getattr(actor.renderer.loras, "hotswap_stats", {}) or {}) if hs else None,
    }


# --------------------------------------------------------------------------- main


def run_bench(opts: BenchOptions, out: Path, progress=print) -> dict:
    """Run the benchmark; write the results JSON and the run-like directory under `out` (and
    nowhere else). Returns the results."""
    work = Path(tempfile.mkdtemp(prefix="castbook-bench-"))  # generated LoRAs + control image (root)
    try:
        return _run_bench(opts, Path(out), work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_bench(opts: BenchOptions, out: Path, work: Path, progress) -> dict:
    import numpy as np
    import torch

    from core.files import atomic_write_bytes, atomic_write_json
    from renderer.flops import bf16_peak_tflops, image_flops
    from renderer.models import resolve_device, resolve_dtype
    from renderer.outputs import (
        base_environment,
        finish_run_info,
        image_relpath,
        new_run_dir,
        new_run_info,
        utc_now,
        write_plan_jsonl,
    )
    from renderer.writer import append_record

    # 1. check inputs before any expensive work
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if opts.size % 8:
        raise JobError(f"--size must be a multiple of 8, got {opts.size}")
    model = resolve_model(opts.model)
    tiny = opts.model == "builtin:tiny-sdxl"
    hotswap = opts.compile if opts.hotswap is None else opts.hotswap
    switch_both = tiny if opts.switch_both is None else opts.switch_both
    performance = {"dtype": dtype, "compile": opts.compile, "compile_mode": opts.compile_mode,
                   "compile_backend": opts.compile_backend, "lora_hotswap": hotswap,
                   "channels_last": opts.channels_last, "fuse_qkv": opts.fuse_qkv}
    stem = f"bench-{model.ref.split(':')[-1].split('/')[-1]}-{'compiled' if opts.compile else 'eager'}"
    run_dir = new_run_dir(out, stem)
    # `spec_files` holds the bench label, so benchmark trends compare only like with like.
    run = new_run_info(run_dir, kind="bench", root=Path.cwd(), spec_files=[bench_label(opts, dtype)],
                       total=opts.images, executor="local", actors=1, characters={}, scoring=None)
    atomic_write_json(run_dir / "run.json", run)

    # 2. load through the actor (model load timed by the actor itself)
    progress(f"loading {opts.model} on {device} ({dtype})")
    t = time.perf_counter()
    actor = make_actor(work, performance, model, opts.device, dtype)
    model_load_s = float(actor.startup.get("model_load_s", time.perf_counter() - t))
    renderer = actor.renderer
    pipe = renderer.pipe

    # 3. assets: LoRA files fitting this UNet, a control image, the ControlNet
    n_files = max(opts.loras, 2) + 1
    ranks = [opts.lora_rank if i % 2 == 0 else max(1, opts.lora_rank // 2) for i in range(n_files)]
    lora_paths = make_lora_files(pipe.unet, work / "loras", ranks)
    loras = [ResolvedLora(name=f"bench-lora-{i}", path=str(p.relative_to(work)), digest=file_digest(p),
                          weight=round(0.8 - 0.1 * i, 3), kind="other") for i, p in enumerate(lora_paths)]
    if hotswap:
        renderer.loras.target_rank = max(ranks)  # the registry's max rank, as the runner would pass
    controls: tuple = ()
    controlnet = control_image = None
    if opts.controlnet:
        from diffusers import ControlNetModel

        from renderer.models import torch_dtype

        make_control_image(work / "control.png", opts.size)
        from PIL import Image

        control_image = Image.open(work / "control.png").convert("RGB")
        if tiny:
            cn_model = resolve_model("builtin:tiny-controlnet")
            from renderer.models import load_controlnet

            controlnet = load_controlnet(cn_model, work, device, dtype)
        else:  # an SDXL-shaped ControlNet copied from the UNet (random too, same cost as a real one)
            cn_model = ResolvedModel(ref="builtin:bench-controlnet-from-unet", kind="builtin",
                                     digest=f"bench-controlnet:{model.digest}")
            with torch.device(device):  # initialise on the GPU: a CPU init of 1.2 B parameters takes long
                controlnet = ControlNetModel.from_unet(pipe.unet)
            controlnet = controlnet.to(dtype=torch_dtype(dtype))
        renderer.register_controlnet(cn_model, controlnet, dtype)
        controls = (ResolvedControl(type="canny", image="control.png", image_digest=file_digest(work / "control.png"),
                                    scale=0.8, preprocess=False, model=cn_model, detector="none"),)

    def make_job(i: int, seed: int, name: str) -> RenderJob:
        return _with_key(RenderJob(
            key="", name=name, job="bench", character="hero", scene=f"scene-{i % 4}", preset="bench",
            prompt=f"a portrait of a hero, scene {i}, detailed", negative_prompt="blurry, lowres",
            seed=seed, width=opts.size, height=opts.size, num_inference_steps=opts.steps,
            guidance_scale=opts.guidance_scale, scheduler=opts.scheduler, dtype=dtype, base_model=model,
            loras=tuple(loras[: opts.loras]), controls=controls))

    jobs = [make_job(i, i, f"bench/hero/scene-{i % 4}/bench/seed-{i}") for i in range(opts.images)]
    warm_job = make_job(999, 999, "bench/warmup")

    # 4. warm-up: loads LoRAs/ControlNet and, with --compile, builds the graphs (not in per-image figures)
    progress("warm-up" + (" (first compile: minutes on SDXL)" if opts.compile else ""))
    g0 = dynamo_graphs()
    warmup_s = renderer.warmup(warm_job)  # what the actor runs before its first job
    warmup_graphs = dynamo_graphs() - g0
    bare_pipe = _bare_pipe(renderer, controlnet)
    t = time.perf_counter()
    _bare_call(bare_pipe, [warm_job], control_image, device)  # the bare side's own first call
    bare_warmup_s = time.perf_counter() - t

    # 5. measure, interleaved: castbook, bare, bare, castbook, ...
    write_plan_jsonl(run_dir / "plan.jsonl", jobs)
    cb_s, cb_mem, bare_s, bare_mem, same, max_diff = [], [], [], [], 0, 0
    bare_images = []
    g_measure = dynamo_graphs()
    for i, job in enumerate(jobs):
        order = ("castbook", "bare") if i % 2 == 0 else ("bare", "castbook")
        for side in order:
            if side == "castbook":
                res = _castbook_render(actor, job)
                png = res.png
                rel = image_relpath(job)
                atomic_write_bytes(run_dir / rel, png)
                cb_s.append(res.seconds)
                cb_mem.append(int(res.peak_memory_bytes or 0))
                append_record(run_dir / "manifest.jsonl", ManifestRecord(
                    key=job.key, name=job.name, status="rendered", image=rel, seconds=res.seconds,
                    steps=job.num_inference_steps, peak_memory_bytes=res.peak_memory_bytes, timings=res.timings,
                    lora_switched=res.lora_switched, fallback=res.fallback, actor=0, finished_at=utc_now()))
            else:
                images, secs, peak = _bare_call(bare_pipe, [job], control_image, device)
                bare_images.append(images[0])
                bare_s.append(secs)
                bare_mem.append(peak)
        diff = int(np.abs(_pixels(png) - _pixels(bare_images[-1])).max())
        same += diff == 0
        max_diff = max(max_diff, diff)
        progress(f"  image {i + 1}/{len(jobs)}: castbook {cb_s[-1]:.3f} s, bare {bare_s[-1]:.3f} s")
    measure_graphs = dynamo_graphs() - g_measure

    # 6. batching: one call with `batch` prompts/seeds vs the same jobs one by one
    batching = None
    if opts.batch > 1:
        n = min(opts.batch, len(jobs))
        images, secs, peak = _bare_call(bare_pipe, jobs[:n], control_image, device)
        diffs = [int(np.abs(_pixels(a) - _pixels(b)).max()) for a, b in zip(images, bare_images[:n])]
        batching = {"batch": n, "batched_s_per_image": secs / n, "sequential_s_per_image": float(np.mean(bare_s[:n])),
                    "speedup": float(np.mean(bare_s[:n])) / (secs / n), "peak_memory_bytes": peak,
                    "max_pixel_diff_vs_single": max(diffs), "identical_images": sum(d == 0 for d in diffs)}

    # 7. FLOPs (meta device) → achieved TFLOP/s and % of peak
    cfg = opts.guidance_scale > 1.0
    flops = image_flops(pipe, opts.size, opts.size, opts.steps, cfg, controlnet)
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    # The table holds bf16 (= fp16) tensor-core peaks: a % of it means nothing for fp32 runs.
    peak_tflops = bf16_peak_tflops(gpu) if dtype in ("bf16", "fp16") else None
    cb_p50, bare_p50 = percentile(cb_s, 50), percentile(bare_s, 50)
    achieved = flops["per_image"] / cb_p50 / 1e12 if cb_p50 else None
    achieved_bare = flops["per_image"] / bare_p50 / 1e12 if bare_p50 else None

    # 8. LoRA switching, in this pipeline's mode, then (optionally) the other mode on a second pipeline
    switch = {"hotswap": None, "load": None}
    if not opts.fuse_qkv:  # fused q/k/v projections and LoRAs do not mix (JobRenderer refuses)
        progress("LoRA switch timings")
        first = measure_lora_switch(actor, jobs[0], loras[:2], loras[-1])
        switch[first["mode"]] = first
    if switch_both and not opts.fuse_qkv:
        other_perf = dict(performance, lora_hotswap=not hotswap)
        other = make_actor(work, other_perf, model, opts.device, dtype)
        if not hotswap:
            other.renderer.loras.target_rank = max(ranks)
        if controlnet is not None:
            other.renderer.register_controlnet(controls[0].model, controlnet, dtype)
        other.renderer.warmup(warm_job)
        second = measure_lora_switch(other, jobs[0], loras[:2], loras[-1])
        switch[second["mode"]] = second
        del other

    # 9. results
    env = dict(base_environment(), device=device, dtype=dtype, gpu=gpu,
               cuda=torch.version.cuda if device.startswith("cuda") else None,
               torch_threads=torch.get_num_threads(), hostname=socket.gethostname(), python=platform.python_version())
    peak_all = max(cb_mem + bare_mem) if (cb_mem or bare_mem) else None
    results = {
        "kind": "bench", "bench_version": BENCH_VERSION, "run_id": run_dir.name, "run_dir": str(run_dir),
        "started": run["started"], "finished": utc_now(),
        "options": opts.model_dump(), "performance": performance, "applied": list(renderer.applied),
        "castbook_path": "RenderActor", "environment": env,
        "model_load_s": model_load_s,
        "warmup_s": warmup_s, "bare_warmup_s": bare_warmup_s,
        "first_compile_s": warmup_s if opts.compile else None,
        "compiled_graphs": {"warmup": warmup_graphs, "measurement": measure_graphs},
        "castbook": _side(cb_s, cb_mem), "bare": _side(bare_s, bare_mem),
        "overhead_ratio": cb_p50 / bare_p50 if cb_p50 and bare_p50 else None,
        "overhead_ratio_mean": float(np.mean(cb_s)) / float(np.mean(bare_s)) if cb_s and bare_s else None,
        "identical_images": same, "max_pixel_diff": max_diff,
        "peak_memory_bytes": peak_all,
        "peak_memory_kind": "cuda_max_memory_allocated" if device.startswith("cuda") else "process_max_rss",
        "within_10gb": (peak_all <= MEMORY_BUDGET_BYTES) if device.startswith("cuda") and peak_all else None,
        "lora_switch": switch,
        "flops": flops,
        "achieved_tflops": achieved, "achieved_tflops_bare": achieved_bare,
        "device_bf16_peak_tflops": peak_tflops,
        "percent_of_peak": 100.0 * achieved / peak_tflops if achieved and peak_tflops else None,
        "batching": batching,
    }
    # 10. the run-like directory (reports/benchmark.py trends) and the results JSON
    run["environment"] = env
    run["startup"].update(model_load_s=model_load_s, warmup_s=warmup_s)
    run["bench"] = results
    finish_run_info(run, status="finished", counts={"rendered": len(jobs), "cached": 0, "failed": 0})
    run["finished"] = results["finished"]
    atomic_write_json(run_dir / "run.json", run)
    atomic_write_json(run_dir / "bench.json", results)
    atomic_write_json(out / f"{run_dir.name}.json", results)
    return results


def bench_label(opts: BenchOptions, dtype: str) -> str:
    """Stands in for `spec_files`, so benchmark trends compare only like with like."""
    return (f"bench:{opts.model}:{opts.size}px:{opts.steps}steps:{dtype}:"
            f"{'compiled' if opts.compile else 'eager'}:loras{opts.loras}:{'cn' if opts.controlnet else 'nocn'}")


def _side(seconds: list[float], mems: list[int]) -> dict:
    import numpy as np

    return {"s_per_image_p50": percentile(seconds, 50), "s_per_image_p95": percentile(seconds, 95),
            "s_per_image_mean": float(np.mean(seconds)) if seconds else None, "seconds": seconds,
            "peak_memory_bytes": max(mems) if mems else None}
