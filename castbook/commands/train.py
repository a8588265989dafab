"""castbook train: train a LoRA from a training spec (specs/training/*.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

from castbook.common import add_root_arg, command_parser, resolve_root


def register(subparsers) -> None:
    parser = command_parser(
        subparsers, "train", "Train a LoRA (SDXL UNet, optionally text encoders) from a training spec.",
        "castbook train specs/training/toy_character.yaml --resume",
    )
    parser.add_argument("spec", type=Path, help="training spec YAML")
    add_root_arg(parser)  # the same default as every command: the spec's project, not the cwd
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this spec's run")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: in this process (default); ray: in a Ray task (GPU if the cluster has one)")
    parser.add_argument("--ray-address", default=None,
                        help="with --executor ray: join this Ray cluster (default: start a private local Ray)")
    parser.add_argument("--no-samples", action="store_true", help="do not render samples during training")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def clip_i_scorer(spec, root: Path):
    """The trainer's sample scorer for `spec.evaluation` (None without references): mean CLIP-I of
    the sample images to the reference images, with `reports.metrics`. Module-level, so Ray sends it
    to the training worker by reference and the CLIP model loads there."""
    from reports.metrics import ClipScorer, ScoringError, clip_i
    from trainer.errors import TrainingError
    from trainer.train import TrainPaths

    ev = spec.evaluation
    if not ev.references:
        return None
    weights = root / ev.scoring_weights if ev.scoring_weights else None
    try:
        scorer = ClipScorer(ev.scoring_model, weights=weights, cache_dir=TrainPaths.for_spec(spec, root).cache / "clip")
    except ScoringError as exc:  # its messages name the setting and the fix
        raise TrainingError(f"evaluation: {exc}") from exc

    def score_images(images: list[Path], references: list[Path]) -> float:
        refs = scorer.embed_images(references)  # cached by file digest: cheap after the first step
        return float(sum(clip_i(e, refs)[0] for e in scorer.embed_images(images)) / len(images))

    return score_images


def run(args) -> int:
    from castbook.common import print_spec_errors
    from core.errors import CastbookError
    from schemas.loader import SpecErrors
    from trainer.train import load_training_spec, train_lora, train_lora_ray

    if args.ray_address and args.executor != "ray":
        print(f"castbook train: --ray-address {args.ray_address} needs --executor ray", file=sys.stderr)
        return 2
    root = resolve_root(args, args.spec)
    try:
        spec = load_training_spec(args.spec, root)
    except SpecErrors as exc:
        print_spec_errors(exc)
        return 2
    try:
        if args.executor == "ray":
            # No rich bar in a worker (no terminal there); the driver prints the result below.
            result = train_lora_ray(spec, root, ray_address=args.ray_address, resume=args.resume,
                                    device=args.device, progress=False, render=not args.no_samples,
                                    make_scorer=clip_i_scorer)
        else:
            result = train_lora(spec, root, resume=args.resume, device=args.device, progress=not args.quiet,
                                render=not args.no_samples, score_images=clip_i_scorer(spec, root))
    except CastbookError as exc:
        print(f"castbook train: {exc}", file=sys.stderr)
        return exc.exit_code
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
