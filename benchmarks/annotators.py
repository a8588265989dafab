"""Annotator cost on this machine: load (from_pretrained from a local folder) and one map per detector.

The weights are controlnet-aux's real networks at random init (tests/annotator_fixtures.py), so
the times are those of the real architectures; the maps themselves mean nothing. One torch thread.
    python benchmarks/annotators.py [--sizes 64 512]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import annotator_fixtures as af  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from renderer.control import ControlPreparer  # noqa: E402
from schemas.job import ResolvedControl, ResolvedModel  # noqa: E402

DETECTORS = {"pose": "openpose", "depth": "midas", "normal": "normalbae", "seg": "sam"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        im = Image.new("RGB", (768, 768), "black")
        ImageDraw.Draw(im).ellipse((240, 80, 528, 368), fill="white")
        im.save(root / "figure.png")
        digest = hashlib.sha256((root / "figure.png").read_bytes()).hexdigest()
        t = time.perf_counter()
        for write in (af.write_openpose, af.write_midas, af.write_normalbae, af.write_mobile_sam):
            write(root / "ann")
        print(f"write random annotator files: {time.perf_counter() - t:.1f} s")
        cn = ResolvedModel(ref="builtin:tiny-controlnet", kind="builtin", digest="builtin:tiny-controlnet@1")
        prep = ControlPreparer(root)
        # SAM encodes at 1024 px whatever the size; its cost is the mask grid (points_per_side²).
        runs = [(t, d, s, {}) for t, d in DETECTORS.items() if t != "seg" for s in args.sizes]
        runs += [("seg", "sam", args.sizes[0], {"points_per_side": n}) for n in (4, 32)]
        for type_, det, size, params in runs:
            c = ResolvedControl(type=type_, image="figure.png", image_digest=digest, scale=1.0, preprocess=True,
                                model=cn, detector=det, annotator_dir="ann", detector_params=params)
            loads = prep.stats["detector_loads"]
            t = time.perf_counter()
            prep.prepare(c, size, size)
            dt = time.perf_counter() - t
            what = "load + map" if prep.stats["detector_loads"] > loads else "map"
            print(f"{type_:6} {det:9} {size:4}px {params or ''} {what:10} {dt:6.2f} s")


if __name__ == "__main__":
    main()
