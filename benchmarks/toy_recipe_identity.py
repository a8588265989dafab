"""Do the toy recipes still write the same bytes? Old code vs this checkout, tiny runs, one thread.

    python benchmarks/toy_recipe_identity.py --old /path/to/old/checkout [--recipes base,base-te,controlnet,clip]

Each recipe (the base model with and without trained text encoders, the ControlNet, the toy CLIP)
runs for a few steps on a few generated images, once with the old code (`--old`, a checkout
whose toy recipes are the pre-toyworld modules `trainer.from_scratch`, `trainer.toy_controlnet` and
`trainer.toy_clip`, or a newer one with toyworld/) and once with this checkout, each in a fresh process, in a temp
folder. It prints the sha256 of every file each run wrote (weights, configs, checkpoints and the
training record without its timings) and SAME or DIFFERENT per recipe. The shipped weights depend
on exactly these code paths, so a refactor of the recipes must print SAME everywhere.
Exits 1 when any recipe differs. Asserts no timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TOY_BASE = HERE / "renderer" / "weights" / "toy" / "sdxl"  # the committed base model, for the ControlNet

# Tiny, but every stage and option the shipped recipes use: warm-up, cosine decay, EMA, Min-SNR,
# offset noise, caption dropout, checkpoints, stop_after, the decoder stage, a second lr group.
SPECS: dict[str, dict] = {
    "base": {"seed": 0, "threads": 1, "data": {"count": 12},
             "vae": {"steps": 3, "batch_size": 4, "warmup_steps": 2, "decoder_steps": 2, "decoder_images": 8},
             "unet": {"steps": 6, "stop_after": 4, "batch_size": 4, "warmup_steps": 2},
             "checkpoint_every": 2, "work_dir": "work", "output": "out/sdxl"},
    "base-te": {"seed": 1, "threads": 1, "data": {"count": 8},
                "vae": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
                "unet": {"steps": 3, "batch_size": 4, "warmup_steps": 2, "train_text_encoders": True,
                         "text_encoder_learning_rate": 3e-3, "caption_dropout": 0.3},
                "checkpoint_every": 2, "work_dir": "work", "output": "out/sdxl"},
    "controlnet": {"seed": 0, "threads": 1, "data": {"count": 8}, "steps": 4, "batch_size": 4, "warmup_steps": 2,
                   "checkpoint_every": 2, "caption_dropout": 0.5, "control_dropout": 0.25,
                   "eval": {"count": 3, "seed": 2000}, "work_dir": "work", "output": "out/controlnet",
                   "base": str(TOY_BASE)},
    "clip": {"seed": 0, "threads": 1, "data": {"count": 24, "eval_count": 6},
             "train": {"steps": 4, "batch_size": 8, "warmup_steps": 2}, "output": "out/clip"},
}
TIMINGS = {"seconds", "images_per_second", "unet_images_per_second"}


def _modules(recipe: str):
    """(spec class, run function) from whichever layout the checkout on sys.path has."""
    import importlib

    kind = "base" if recipe.startswith("base") else recipe
    new = {"base": ("toyworld.base", "ToyBaseSpec", "run_base"),
           "controlnet": ("toyworld.controlnet", "ToyControlNetSpec", "run_controlnet"),
           "clip": ("toyworld.clip", "ToyClipSpec", "run_clip")}[kind]
    old = {"base": "trainer.from_scratch", "controlnet": "trainer.toy_controlnet", "clip": "trainer.toy_clip"}[kind]
    try:
        mod = importlib.import_module(new[0])
    except ImportError:
        mod = importlib.import_module(old)
    spec_cls = getattr(mod, new[1], None)
    if spec_cls is None:  # the specs moved to schemas/toy.py
        spec_cls = getattr(importlib.import_module("schemas.toy"), new[1])
    return spec_cls, getattr(mod, new[2])


def run_one(recipe: str, folder: Path) -> None:
    """In a fresh process, cwd = folder: train `recipe` there."""
    spec_cls, run = _modules(recipe)
    spec = spec_cls.model_validate(SPECS[recipe])
    kwargs = {} if recipe == "clip" else {"do_eval": False}
    run(spec, folder, log=lambda m: None, **kwargs)


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.endswith(".spec.json"):
            continue
        rel = str(p.relative_to(folder))
        if p.name.endswith(".training.json"):
            record = {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMINGS}
            out[rel + " (no timings)"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_side(code: Path, recipe: str, folder: Path, reuse: bool = False) -> dict[str, str]:
    if reuse and (folder / "done").exists():
        return json.loads((folder / "done").read_text())
    shutil.rmtree(folder, ignore_errors=True)  # a stale work_dir would let the run reuse its VAE
    folder.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", CASTBOOK_HOME=str(folder / "home"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", recipe, "--folder", str(folder)]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{recipe} with {code} failed:\n{proc.stderr[-3000:]}")
    out = digests(folder / "out") | {f"work/{k}": v for k, v in digests(folder / "work").items()
                                     if k.endswith(".safetensors")}
    (folder / "done").write_text(json.dumps(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, help="checkout of the code before the change")
    ap.add_argument("--new", type=Path, default=HERE, help="checkout after the change (default: this one)")
    ap.add_argument("--recipes", default=",".join(SPECS), help=f"comma-separated, from {list(SPECS)}")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    ap.add_argument("--reuse-old", action="store_true", help="with --work: reuse old runs already in it")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        run_one(args.run_one, args.folder)
        return 0
    if args.old is None:
        ap.error("--old is required (a checkout of the code before the change)")
    work = args.work or Path(tempfile.mkdtemp(prefix="toy-identity-"))
    differ = []
    for recipe in args.recipes.split(","):
        old = run_side(args.old.resolve(), recipe, work / "old" / recipe, reuse=args.reuse_old)
        new = run_side(args.new.resolve(), recipe, work / "new" / recipe)
        same = old == new
        print(f"{recipe}: {'SAME' if same else 'DIFFERENT'}")
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name, "-"), new.get(name, "-")
            mark = "" if a == b else "   <-- differs"
            print(f"  {name}\n    old {a}\n    new {b}{mark}")
        if not same:
            differ.append(recipe)
    print(f"{'DIFFERENT: ' + ', '.join(differ) if differ else 'all recipes SAME'} (runs in {work})")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
