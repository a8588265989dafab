"""castbook reproduce: re-render an image from the job stored in its PNG, and compare bytes."""

from __future__ import annotations

import sys
from pathlib import Path

from castbook.common import command_parser


def register(subparsers) -> None:
    parser = command_parser(
        subparsers, "reproduce", "Re-render a castbook PNG from its embedded job (in-process) and compare bytes.",
        "castbook reproduce runs/20261130T031500Z-luca/images/main/luca/beach/draft/seed-1.png",
    )
    parser.add_argument("image", type=Path, help="a PNG written by castbook render")
    parser.add_argument("--root", type=Path, default=None,
                        help="project root the job's paths are relative to (default: the run's root, else cwd)")
    parser.add_argument("--out", type=Path, default=None, help="also write the re-rendered PNG here")
    parser.set_defaults(func=run)


def _run_root(image: Path) -> Path | None:
    """The project root recorded in the image's run.json, if the image sits in a run directory."""
    import json

    for parent in image.resolve().parents:
        run_json = parent / "run.json"
        if run_json.is_file():
            try:
                return Path(json.loads(run_json.read_text())["root"])
            except (ValueError, KeyError, OSError):
                return None
    return None


def run(args) -> int:
    from core.files import atomic_write_bytes
    from renderer.png_metadata import read_castbook_chunk
    from schemas.job import RenderJob

    if not args.image.is_file():
        print(f"castbook reproduce: {args.image} does not exist", file=sys.stderr)
        return 2
    try:
        meta = read_castbook_chunk(args.image)
        job = RenderJob.model_validate(meta["job"])
    except Exception as e:
        print(f"castbook reproduce: {e}", file=sys.stderr)
        return 2
    root = args.root or _run_root(args.image) or Path.cwd()

    from renderer.actor import RenderActor

    actor = RenderActor(root=root, performance=meta.get("performance"), base_model=job.base_model, dtype=job.dtype,
                        device=meta.get("environment", {}).get("device"))
    result = actor.render(job=job)
    if result.error:
        print(f"castbook reproduce: could not render {job.name}: {result.error}", file=sys.stderr)
        return 1
    if args.out:
        atomic_write_bytes(args.out, result.png)
    original = args.image.read_bytes()
    if result.png == original:
        print(f"match: {args.image} reproduces byte for byte ({job.name}, key {job.key[:12]})")
        return 0
    print(_describe_difference(original, result.png, meta.get("environment", {}), actor), file=sys.stderr)
    return 1


def _describe_difference(original: bytes, new: bytes, env: dict, actor) -> str:
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(new)).convert("RGB"), dtype=np.int16)
    lines = ["differ: the re-rendered PNG is not byte-identical"]
    if a.shape != b.shape:
        lines.append(f"  size differs: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
    else:
        d = np.abs(a - b)
        lines.append(f"  pixels: {int((d.max(axis=-1) > 0).sum())} differ, max difference {int(d.max())}/255")
    now = actor.environment(device=env.get("device") or "cpu", dtype=env.get("dtype") or "fp32")
    for k in sorted(set(env) | set(now)):
        if env.get(k) != now.get(k):
            lines.append(f"  environment {k}: image {env.get(k)!r}, here {now.get(k)!r}")
    return "\n".join(lines)
