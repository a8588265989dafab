"""Few-step samplers on the toy model: what 4 steps cost against 20, and what the checker reads.

Renders the same prompts from the toy-world prompt grid through castbook's own render path
(`renderer.pipeline.JobRenderer`, in this process) once per setting, and prints for each its
seconds per image, the ratio to the baseline (Euler, 20 steps, guidance 5: the toy model's
recipe) measured in this same run, and the pixel checker's accuracy on colour, shape and
background. No assertions; results go to benchmarks/RESULTS.md.

    python benchmarks/few_step.py [--prompts 48] [--threads 1]

The toy model is not distilled, so 4 steps lose quality here; a distilled LoRA (Lightning, DMD2,
Hyper, LCM, TCD) is what makes 4 steps look like 20 on a real model. What this measures is the cost
side exactly, and that every few-step scheduler runs end to end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (label, scheduler, steps, guidance)
SETTINGS = [
    ("baseline euler 20 steps", "euler", 20, 5.0),
    ("euler 4 steps", "euler", 4, 5.0),
    ("euler_trailing 4 steps", "euler_trailing", 4, 5.0),
    ("lcm 4 steps", "lcm", 4, 5.0),
    ("tcd 4 steps", "tcd", 4, 5.0),
    ("fast preset (euler_trailing 4, cfg 1)", "euler_trailing", 4, 1.0),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="prompts from the 135-prompt grid (every k-th)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from renderer.pipeline import JobRenderer
    from schemas.builtins import builtin_digest
    from schemas.job import RenderJob, ResolvedModel
    from toyworld import checker
    from toyworld.base import eval_prompts

    torch.set_num_threads(args.threads)
    grid = eval_prompts()
    grid = grid[:: max(1, len(grid) // args.prompts)][: args.prompts]
    model = ResolvedModel(ref="builtin:toy-sdxl", kind="builtin", digest=builtin_digest("toy-sdxl"))
    renderer = JobRenderer(Path(__file__).resolve().parents[1])

    def job(prompt: str, seed: int, scheduler: str, steps: int, guidance: float) -> RenderJob:
        return RenderJob(key="bench", name=f"few/{seed}", job="few", character=None, scene="grid", preset="toy",
                         prompt=prompt, negative_prompt="", seed=seed, width=64, height=64,
                         num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler, dtype="fp32",
                         base_model=model)

    renderer.render(job(grid[0][0], 0, "euler", 2, 5.0))  # load the model outside the timings
    rows = []
    for label, scheduler, steps, guidance in SETTINGS:
        images, t0 = [], time.perf_counter()
        for i, (prompt, _) in enumerate(grid):
            images.append(renderer.render(job(prompt, 1000 + i, scheduler, steps, guidance)).image)
        seconds = (time.perf_counter() - t0) / len(grid)
        result = checker.evaluate([(img, exp) for img, (_, exp) in zip(images, grid)])
        acc = {k: result["attributes"][k]["accuracy"] for k in ("colour", "shape", "background", "all_three")}
        rows.append((label, seconds, acc))

    base = rows[0][1]
    print(f"toy-sdxl, 64x64, {len(grid)} grid prompts, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'setting':40} {'s/image':>8} {'ratio':>6} {'colour':>7} {'shape':>7} {'backgr.':>7} {'all 3':>7}")
    for label, seconds, acc in rows:
        print(f"{label:40} {seconds:8.3f} {seconds / base:6.2f} " +
              " ".join(f"{100 * acc[k]:6.1f}%" for k in ("colour", "shape", "background", "all_three")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
