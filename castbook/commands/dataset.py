"""castbook dataset prepare: de-duplicate, filter and bucket-crop a folder of training images."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dataset", help="prepare training images (dedupe, quality filter, caption audit, bucket crops)",
        description="Prepare training images.\n\nExample:\n  castbook dataset prepare raw/luca --out data/luca --trigger lucaxyz",
    )
    sub = p.add_subparsers(dest="dataset_command", metavar="{prepare}")
    sub.required = True
    g = sub.add_parser("prepare", help="write a cleaned copy of DIR to --out, with prepare.json and prepare.html")
    g.add_argument("dir", type=Path, help="input folder of images with same-name .txt captions (never modified)")
    g.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    g.add_argument("--trigger", default=None, help="trigger word every caption should contain")
    g.add_argument("--min-size", type=int, default=256, help="drop images whose shorter side is smaller (default 256)")
    g.add_argument("--blur-threshold", type=float, default=100.0,
                   help="drop images whose Laplacian variance is lower (default 100)")
    g.add_argument("--max-aspect", type=float, default=3.0, help="drop images with a longer/shorter side ratio above this")
    g.add_argument("--phash-distance", type=int, default=6, help="dHash Hamming distance for near duplicates (default 6)")
    g.add_argument("--resolution", type=int, default=1024, help="bucket resolution (default 1024)")
    g.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this (default 64)")
    g.add_argument("--poses", action="store_true",
                   help="also detect OpenPose keypoints, cluster the poses, write pose maps/captions and poses.html")
    g.add_argument("--annotator", type=Path, default=None,
                   help="folder with body_pose_model.pth, hand_pose_model.pth, facenet.pth (trusted local files)")
    g.add_argument("--clusters", type=int, default=None, help="number of pose clusters (default: best silhouette, 2-8)")
    g.add_argument("--min-confidence", type=float, default=0.7,
                   help="drop pose detections whose mean keypoint score is lower (default 0.7)")
    g.set_defaults(func=run)


def run(args) -> int:
    from core.errors import CastbookError
    from trainer.errors import PrepareError
    from trainer.prepare import PrepareOptions, prepare_dataset

    try:
        if args.poses:
            from trainer.poses import PoseOptions, check_annotator

            # Check the annotator before any work: a missing file should not cost a full prepare.
            pose_options = PoseOptions(annotator=check_annotator(args.annotator), clusters=args.clusters,
                                       min_confidence=args.min_confidence)
            if args.clusters is not None and args.clusters < 1:
                raise PrepareError(f"--clusters {args.clusters} must be at least 1")
        summary = prepare_dataset(args.dir, args.out, PrepareOptions(
            trigger=args.trigger, min_size=args.min_size, blur_threshold=args.blur_threshold,
            max_aspect=args.max_aspect, phash_distance=args.phash_distance, resolution=args.resolution,
            bucket_step=args.bucket_step))
        if args.poses:
            from trainer.poses import prepare_poses

            poses = prepare_poses(Path(summary["output"]), pose_options)
            print(f"poses: {poses['counts']['posed']} of {poses['counts']['images']} images in {poses['k']} clusters; "
                  f"report: {Path(summary['output']) / 'poses.html'}")
    except CastbookError as exc:
        print(f"castbook dataset prepare: {exc}", file=sys.stderr)
        return exc.exit_code
    c = summary["counts"]
    print(f"kept {c['kept']}, dropped {c['dropped']} of {c['images']} images; "
          f"{c['caption_warnings']} caption warnings; report: {Path(summary['output']) / 'prepare.html'}")
    return 0
