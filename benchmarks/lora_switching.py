"""Job order and LoRA switching: grouped (castbook's order) vs shuffled, on one actor.

N LoRA names (registered on the example LoRA files) × M jobs each, rendered by one
in-process RenderActor (the same class the Ray actor runs) in two orders:
  * grouped: `renderer.runner.order_jobs` (what `castbook render` does);
  * shuffled: a fixed-seed random order.
Prints wall time per order, the ratio shuffled ÷ grouped, and LoRA file loads per run
(the actor keeps at most 8 adapters loaded, so > 8 names in a shuffled order reload).
No assertions.

    python benchmarks/lora_switching.py [--loras 12] [--per-lora 4]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from core.digests import file_digest  # noqa: E402
from renderer.actor import RenderActor  # noqa: E402
from renderer.runner import order_jobs  # noqa: E402
from schemas.builtins import builtin_digest  # noqa: E402
from schemas.job import RenderJob, ResolvedLora, ResolvedModel, job_key  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = ["specs/examples/loras/luca_character.safetensors", "specs/examples/loras/portorosso_bg.safetensors",
         "specs/examples/loras/luca_happy.safetensors"]


def make_jobs(n_loras: int, per_lora: int) -> list[RenderJob]:
    model = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest=builtin_digest("tiny-sdxl"))
    jobs = []
    for li in range(n_loras):
        path = FILES[li % len(FILES)]
        digest = file_digest(REPO / path)
        lora = ResolvedLora(name=f"lora{li:02d}", path=path, digest=digest, weight=0.8, kind="style")
        for s in range(per_lora):
            j = RenderJob(key="", name=f"bench/hero/s{li}/draft/seed-{s}", job="bench", character="hero",
                          scene=f"s{li}", preset="draft", prompt="a hero", negative_prompt="", seed=s,
                          width=64, height=64, num_inference_steps=2, guidance_scale=5.0, scheduler="euler",
                          dtype="fp32", base_model=model, loras=(lora,))
            jobs.append(j.model_copy(update={"key": job_key(j)}))
    return jobs


def run(jobs: list[RenderJob]) -> tuple[float, int, int, float]:
    actor = RenderActor(root=REPO, performance={}, base_model=jobs[0].base_model)
    t = time.perf_counter()
    switches = 0
    lora_s = 0.0  # actor-side LoRA load + switch time: robust to a busy machine's denoise noise
    for j in jobs:
        res = actor.render(job=j)
        if res.error:
            sys.exit(f"{j.name}: {res.error}")
        switches += res.lora_switched
        lora_s += res.timings.get("lora_load_s", 0.0) + res.timings.get("lora_switch_s", 0.0)
    seconds = time.perf_counter() - t
    loads = sum((actor.stats().get("lora_loads") or {}).values())
    return seconds, loads, switches, lora_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loras", type=int, default=12)
    ap.add_argument("--per-lora", type=int, default=4)
    a = ap.parse_args()
    jobs = make_jobs(a.loras, a.per_lora)
    shuffled = list(jobs)
    random.Random(0).shuffle(shuffled)
    run(jobs[:1])  # warm-up: imports, built-in model files
    g_s, g_loads, g_sw, g_lora = run(order_jobs(shuffled))
    s_s, s_loads, s_sw, s_lora = run(shuffled)
    print(f"{len(jobs)} jobs, {a.loras} LoRAs x {a.per_lora} jobs, one actor (≤ 8 adapters loaded)")
    print(f"grouped : {g_s:7.2f} s  LoRA loads {g_loads:3d}  stack switches {g_sw:3d}  LoRA load+switch {g_lora:6.2f} s")
    print(f"shuffled: {s_s:7.2f} s  LoRA loads {s_loads:3d}  stack switches {s_sw:3d}  LoRA load+switch {s_lora:6.2f} s")
    print(f"ratio shuffled / grouped: wall {s_s / g_s:5.2f}, LoRA load+switch time {s_lora / max(g_lora, 1e-9):5.2f}")


if __name__ == "__main__":
    main()
