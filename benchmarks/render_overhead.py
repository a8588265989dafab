"""castbook's render path vs a bare diffusers loop on the same pipeline, measured in one run.

Prints two ratios (no assertions):
  * steady-state per-job time, castbook (Ray actor → PNG with metadata → cache + run dir +
    fsync'd ledger) ÷ a bare in-process `pipe(...)` loop, after warm-up. Target ≤ 1.03.
  * fixed start-up (Ray init + actor start incl. imports + model load) ÷ a bare
    import + `from_pretrained` of the same pipeline.

    python benchmarks/render_overhead.py [--jobs 32] [--warmup 4] [--executor ray|local]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from core.jsonl import read_jsonl  # noqa: E402
from renderer.runner import run_render  # noqa: E402
from schemas.builtins import builtin_digest  # noqa: E402
from schemas.job import RenderJob, ResolvedModel, job_key  # noqa: E402
from schemas.plan import Plan  # noqa: E402
from schemas.spec import Spec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_jobs(n: int, steps: int, size: int) -> list[RenderJob]:
    model = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest=builtin_digest("tiny-sdxl"))
    jobs = []
    for i in range(n):
        j = RenderJob(key="", name=f"bench/hero/scene/draft/seed-{i}", job="bench", character="hero",
                      scene="scene", preset="draft", prompt=f"a hero, picture {i}", negative_prompt="blurry",
                      seed=i, width=size, height=size, num_inference_steps=steps, guidance_scale=5.0,
                      scheduler="euler", dtype="fp32", base_model=model)
        jobs.append(j.model_copy(update={"key": job_key(j)}))
    return jobs


def plan_of(jobs: list[RenderJob]) -> Plan:
    return Plan(spec=Spec(), jobs=jobs, root=REPO, spec_files=[])


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def bare(jobs: list[RenderJob], warmup: int) -> tuple[float, float, float]:
    """(load seconds incl. imports, steady per-job seconds, max job seconds)."""
    t0 = time.perf_counter()
    import torch
    from diffusers import StableDiffusionXLPipeline

    from renderer.builtins import builtin_dir
    from renderer.models import make_scheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_dir("tiny-sdxl"), local_files_only=True,
                                                     use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    times = []
    for j in jobs:
        t = time.perf_counter()
        pipe(prompt=j.prompt, negative_prompt=j.negative_prompt, num_inference_steps=j.num_inference_steps,
             guidance_scale=j.guidance_scale, width=j.width, height=j.height,
             generator=torch.Generator("cpu").manual_seed(j.seed)).images[0]
        times.append(time.perf_counter() - t)
    steady = times[warmup:]
    return load_s, sum(steady) / len(steady), max(times)


def castbook(jobs: list[RenderJob], warmup: int, executor: str) -> tuple[float, dict]:
    out = Path(tempfile.mkdtemp(prefix="cb-overhead-"))
    r = run_render(plan_of(jobs), out_dir=out, executor=executor, progress=False, quiet=True)
    assert r.exit_code == 0, r.counts
    recs = read_jsonl(r.run_dir / "manifest.jsonl")
    done = sorted(ts(x["finished_at"]) for x in recs)
    # Driver-side wall time between results after warm-up: includes Ray round trips, PNG
    # encoding, cache + run-dir writes and the fsync'd ledger line.
    per_job = (done[-1] - done[warmup - 1]) / (len(done) - warmup)
    return per_job, r.startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    a = ap.parse_args()
    jobs = make_jobs(a.jobs, a.steps, a.size)

    load_s, bare_job, _ = bare(jobs, a.warmup)
    # ray_init_s + actor_start_s (which includes the actor's imports and its model load)
    cb_job, parts = castbook(jobs, a.warmup, a.executor)
    fixed = (parts.get("ray_init_s") or 0.0) + (parts.get("actor_start_s") or 0.0)
    print(f"jobs: {a.jobs} x {a.size}x{a.size}, {a.steps} steps, warm-up {a.warmup}, executor {a.executor}")
    print(f"bare diffusers loop   : {bare_job * 1000:8.1f} ms/job   load (imports + from_pretrained) {load_s:6.2f} s")
    print(f"castbook actor path   : {cb_job * 1000:8.1f} ms/job   start-up {fixed:6.2f} s  {parts}")
    print(f"steady-state ratio    : {cb_job / bare_job:6.3f}   (target <= 1.03)")
    print(f"start-up ratio        : {fixed / load_s:6.2f}   (Ray init + actor start + model load / bare load)")


if __name__ == "__main__":
    main()
