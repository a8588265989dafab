"""What the finishing passes do to the pixels, on the toy model, read by the toy-world checker.

    python benchmarks/passes.py [--prompts 24] [--steps 20] [--json out.json]
    python benchmarks/passes.py --write-plate specs/examples/assets/toy/plate_beach.png --scene beach

For each of N toy-world prompts (colour, shape, eyes, expression, background; seeds 0..N-1), it
renders on builtin:toy-sdxl (64x64, euler, guidance 5) the plain first pass, then runs on that same
first-pass image (as `run_passes` does after the first pass; the latent variant re-encodes it):
hires 64->128 with Lanczos at strength 0.25 and 0.35 and with the latent upscaler at 0.55, and the
detail pass; and, as whole jobs, the character inpainted into a plate of the prompt's background
(`mask: auto`). It prints the checker's
accuracy per attribute (colour, shape, background, eyes, expression) for each variant, the time per
image, the plate's exactness outside the mask, and what the VAE round trip alone does to a plate.
Timings are printed, never asserted (the baseline is the plain pass, in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

ATTRS = ("colour", "shape", "background", "eyes", "expression")


def draw_plate(path: Path, scene: str, size: int = 64, seed: int = 5) -> None:
    """A background plate: the toy world's own scene drawing (toyworld/world.py), no character."""
    from toyworld import world as tw

    k = tw.SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k))
    tw._draw_background(ImageDraw.Draw(img), scene, size, np.random.default_rng(seed))
    img.resize((size, size), Image.Resampling.BOX).save(path)


def prompts(n: int) -> list[dict]:
    from toyworld import world as tw

    out = []
    for i in range(n):
        label, _ = tw.sample_label(2026, i)
        out.append({"prompt": tw.caption_for(label.colour, label.shape, label.eyes, label.expression, label.background),
                    "colour": label.colour, "shape": label.shape, "eyes": label.eyes,
                    "expression": label.expression, "background": label.background, "seed": i})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write-plate", type=Path)
    ap.add_argument("--scene", default="beach")
    ap.add_argument("--variants", help="comma-separated variant names to run (the plain first pass always runs)")
    args = ap.parse_args()
    if args.write_plate:
        draw_plate(args.write_plate, args.scene)
        print(f"wrote {args.write_plate}")
        return 0

    import torch

    from renderer.passes import _decode, _encode, pass_pipe, plate_mask
    from renderer.pipeline import JobRenderer
    from schemas.job import RenderJob, ResolvedModel
    from schemas.passes import ResolvedDetail, ResolvedHires, ResolvedInit, ResolvedPasses
    from toyworld import checker

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    toy = ResolvedModel(ref="builtin:toy-sdxl", kind="builtin", digest="builtin:toy-sdxl@r2")
    root = Path(tempfile.mkdtemp(prefix="passes-bench-"))
    for scene in ("beach", "town", "night"):
        draw_plate(root / f"plate_{scene}.png", scene)
    renderer = JobRenderer(root)
    variants = {
        "plain 64": None,
        "hires lanczos 0.1": ResolvedPasses(hires=ResolvedHires(scale=2, upscaler="lanczos", strength=0.1, steps=20, width=128, height=128)),
        "hires lanczos 0.15": ResolvedPasses(hires=ResolvedHires(scale=2, upscaler="lanczos", strength=0.15, steps=20, width=128, height=128)),
        "hires lanczos 0.25": ResolvedPasses(hires=ResolvedHires(scale=2, upscaler="lanczos", strength=0.25, steps=15, width=128, height=128)),
        "hires lanczos 0.35": ResolvedPasses(hires=ResolvedHires(scale=2, upscaler="lanczos", strength=0.35, steps=15, width=128, height=128)),
        "hires latent 0.55": ResolvedPasses(hires=ResolvedHires(scale=2, upscaler="latent", strength=0.55, steps=30, width=128, height=128)),
        "detail 0.2": ResolvedPasses(detail=ResolvedDetail(target="character", detector="toy", padding=8, strength=0.2, steps=15, prompt=None)),
        "detail 0.3": ResolvedPasses(detail=ResolvedDetail(target="character", detector="toy", padding=8, strength=0.3, steps=15, prompt=None)),
        "detail 0.4": ResolvedPasses(detail=ResolvedDetail(target="character", detector="toy", padding=8, strength=0.4, steps=15, prompt=None)),
        "plate (auto mask)": "plate",
    }
    if args.variants:
        wanted = {"plain 64", *(v.strip() for v in args.variants.split(","))}
        unknown = wanted - set(variants)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in wanted}
    from renderer import passes as rp

    items = prompts(args.prompts)
    results: dict = {}
    plate_exact = []
    firsts: list = []
    for name, passes in variants.items():
        pairs, seconds = [], []
        for n, it in enumerate(items):
            if passes is not None and passes != "plate":
                job = RenderJob(key="bench", name=f"bench/{it['seed']}", job="bench", character=None, scene="s",
                                preset="p", prompt=it["prompt"], negative_prompt="", seed=it["seed"], width=64,
                                height=64, num_inference_steps=args.steps, guidance_scale=5.0, scheduler="euler",
                                dtype="fp32", base_model=toy, passes=passes)
                t = time.perf_counter()
                if passes.hires is not None:
                    image = rp._hires(renderer, job, firsts[n], {}, "fp32")
                else:
                    image = rp._detail(renderer, job, firsts[n], {}, "fp32", renderer.stats.setdefault("passes", {}))
                seconds.append(time.perf_counter() - t)
                pairs.append((image, {k: it[k] for k in ATTRS}))
                continue
            if passes == "plate":
                p = ResolvedPasses(init=ResolvedInit(image=f"plate_{it['background']}.png", image_digest="x",
                                                     strength=1.0, mask="auto"))
            else:
                p = passes
            job = RenderJob(key="bench", name=f"bench/{it['seed']}", job="bench", character=None, scene="s", preset="p",
                            prompt=it["prompt"], negative_prompt="", seed=it["seed"], width=64, height=64,
                            num_inference_steps=args.steps, guidance_scale=5.0, scheduler="euler", dtype="fp32",
                            base_model=toy, passes=p)
            t = time.perf_counter()
            out = renderer.render(job)
            seconds.append(time.perf_counter() - t)
            if passes is None:
                firsts.append(out.image)
            pairs.append((out.image, {k: it[k] for k in ATTRS}))
            if passes == "plate":
                plate = np.array(Image.open(root / f"plate_{it['background']}.png").convert("RGB"))
                outside = np.array(plate_mask(renderer, job)) == 0
                plate_exact.append(int(np.abs(np.array(out.image, dtype=int) - plate)[outside].max()))
        ev = checker.evaluate(pairs)
        results[name] = {k: ev["attributes"][k]["accuracy"] for k in (*ATTRS, "all_three")}
        results[name]["s_per_image"] = float(np.median(seconds))  # hires/detail: the pass alone
        print(name, {k: (round(v, 3) if v is not None else None) for k, v in results[name].items()}, flush=True)
    # What the VAE round trip alone does to a plate (why castbook pastes the plate back).
    pipe = pass_pipe(renderer, "img2img", "fp32")
    vae = {}
    for scene in ("beach", "town", "night"):
        plate = Image.open(root / f"plate_{scene}.png").convert("RGB")
        d = np.abs(np.array(_decode(pipe, _encode(pipe, plate)), dtype=float) - np.array(plate, dtype=float))
        vae[scene] = {"mean": round(float(d.mean()), 2), "p99": float(np.percentile(d, 99)), "max": float(d.max())}
    results["plate_outside_mask_max_diff"] = max(plate_exact, default=None)  # None: no plate variant ran
    results["vae_round_trip_on_plates"] = vae
    results["peak_rss_bytes"] = renderer._peak_memory()
    results["model_loads"] = renderer.stats["model_loads"]
    if plate_exact:
        print("plate: max |difference| outside the mask over all images:", max(plate_exact))
    print("VAE round trip alone (0-255 units):", vae)
    print("peak RSS:", results["peak_rss_bytes"] // 2**20, "MiB; model loads:", renderer.stats["model_loads"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
