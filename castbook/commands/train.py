"""castbook train: train a LoRA from a training spec (specs/training/*.yaml)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from castbook.common import command_parser


def register(subparsers) -> None:
    parser = command_parser(
        subparsers, "train", "Train a LoRA (SDXL UNet, optionally text encoders) from a training spec.",
        "castbook train specs/training/toy_character.yaml --resume",
    )
    parser.add_argument("spec", type=Path, help="training spec YAML")
    parser.add_argument("--root", type=Path, default=None, help="project root (paths in the spec are relative to it; default: cwd)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this spec's run")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: in this process (default); ray: in a Ray task (GPU if the cluster has one)")
    parser.add_argument("--ray-address", default=None,
                        help="with --executor ray: join this Ray cluster (default: start a private local Ray)")
    parser.add_argument("--no-samples", action="store_true", help="do not render samples during training")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from castbook.common import print_spec_errors
    from schemas.loader import SpecErrors

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = (args.root or Path.cwd()).resolve()
    try:
        from trainer.train import load_training_spec

        spec = load_training_spec(args.spec, root)
    except SpecErrors as exc:
        print_spec_errors(exc)
        return 2
    from trainer.data import DatasetError
    from trainer.train import TrainingError, train_lora, train_lora_ray

    if args.ray_address and args.executor != "ray":
        print(f"castbook train: --ray-address {args.ray_address} needs --executor ray", file=sys.stderr)
        return 2
    try:
        if args.executor == "ray":
            # No rich bar in a worker (no terminal there); the driver prints the result below.
            result = train_lora_ray(spec, root, ray_address=args.ray_address, resume=args.resume,
                                    device=args.device, progress=False, render=not args.no_samples)
        else:
            result = train_lora(spec, root, resume=args.resume, device=args.device, progress=not args.quiet,
                                render=not args.no_samples)
    except (TrainingError, DatasetError) as exc:
        print(f"castbook train: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    first = sum(result.losses[:10]) / max(len(result.losses[:10]), 1)
    last = sum(result.losses[-10:]) / max(len(result.losses[-10:]), 1)
    print(f"trained {result.steps} steps on {result.device}; loss {first:.4f} -> {last:.4f}"
          f" (final {result.losses[-1] if result.losses else float('nan'):.6f})")
    for label, path in (("LoRA", result.lora_file), ("kohya", result.kohya_file), ("report", result.report)):
        if path:
            print(f"{label}: {path}")
    return 0
