"""`castbook loras add FILE --registry R`: register a downloaded or trained LoRA (logic: schemas/lora_registry.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Add a LoRA file to a registry YAML (comments are kept).

The entry gets the LoRA's rank, trigger words suggested from its metadata, a weight and notes;
SD 1.x/2.x LoRAs, LyCORIS files and name clashes are refused.

examples:
  castbook loras add specs/examples/loras/downloaded.safetensors --registry specs/examples/registry.yaml
  castbook loras add my_style.safetensors --name painterly --kind style --weight 0.7 --registry specs/examples/registry.yaml
  castbook validate specs/examples/registry.yaml
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("loras", help="add a LoRA file to a registry", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="loras_command", required=True)
    a = sub.add_parser("add", help="write a registry entry for a LoRA file")
    a.add_argument("file", type=Path, help="the LoRA .safetensors (inside the project)")
    a.add_argument("--registry", type=Path, required=True, help="registry YAML to add to (created if missing)")
    a.add_argument("--name", default=None, help="registry name (default: the file's ss_output_name/title, else its stem)")
    a.add_argument("--kind", default="other", choices=["character", "background", "pose", "expression", "style", "other"])
    a.add_argument("--weight", type=float, default=1.0, help="default weight in a stack (default 1.0)")
    a.add_argument("--notes", default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from schemas.lora_registry import add_lora

    name, entry = add_lora(args.file, args.registry, args.name, args.kind, args.weight, args.notes)
    words = ", ".join(entry["trigger_words"]) or "none found (add them by hand)"
    print(f"added {name} to {args.registry}: {entry['path']} (rank {entry.get('rank', '?')}, trigger words: {words})")
    print(f"check it with: castbook validate {args.registry}")
    return 0
