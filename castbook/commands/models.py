"""`castbook models`: list the built-in models, export one as a plain diffusers folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """List built-in models or export one as a normal diffusers folder.

examples:
  castbook models list
  castbook models export builtin:tiny-sdxl exported/tiny-sdxl
  # then, in plain diffusers:  StableDiffusionXLPipeline.from_pretrained("exported/tiny-sdxl")
"""

BUILTIN_HELP = {
    "tiny-sdxl": "SDXL architecture, tiny, random weights from a fixed seed (CPU tests and demos)",
    "tiny-controlnet": "ControlNet made from tiny-sdxl's UNet, output layers perturbed so control images matter",
    "sdxl-random": "full SDXL-base architecture, random weights, built in memory (GPU benchmarks; not exportable)",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list or export built-in models", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list built-in models")
    e = sub.add_parser("export", help="write a built-in model as a diffusers folder")
    e.add_argument("name", help="built-in name, e.g. builtin:tiny-sdxl")
    e.add_argument("out_dir", type=Path, help="new (or empty) folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imports here: `castbook --help` must not import torch.
    from core.errors import JobError
    from renderer.builtins import BASE_MODELS, CONTROLNET_MODELS, builtin_digest, export_builtin

    if args.models_command == "list":
        for name in BASE_MODELS + CONTROLNET_MODELS:
            print(f"builtin:{name:<16} {builtin_digest(name):<28} {BUILTIN_HELP.get(name, '')}")
        return 0
    if args.models_command == "export":
        if args.name.endswith("sdxl-random"):
            print("castbook models export: builtin:sdxl-random is built in memory and is not exported "
                  "(its random weights would be ≈7 GB)", file=sys.stderr)
            return 2
        try:
            out = export_builtin(args.name, args.out_dir)
        except JobError as e:
            print(f"castbook models export: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out} (load it with StableDiffusionXLPipeline.from_pretrained({str(out)!r}))")
        return 0
    return 2
