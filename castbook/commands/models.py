"""`castbook models`: list built-ins, export one (diffusers folder or single file), inspect a file,
convert a pickle to safetensors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """List built-in models, export one, inspect a model file, convert a pickle.

examples:
  castbook models list
  castbook models export builtin:tiny-sdxl exported/tiny-sdxl
  # then, in plain diffusers:  StableDiffusionXLPipeline.from_pretrained("exported/tiny-sdxl")
  castbook models export builtin:toy-sdxl toy.safetensors --format single-file
  castbook models inspect models/sd_xl_base_1.0.safetensors
  castbook models inspect loras/downloaded.safetensors --json
  castbook models convert ip-adapter_sdxl.bin --to safetensors
"""

BUILTIN_HELP = {
    "tiny-sdxl": "SDXL architecture, tiny, random weights from a fixed seed (CPU tests and demos)",
    "tiny-controlnet": "ControlNet made from tiny-sdxl's UNet, output layers perturbed so control images matter",
    "sdxl-random": "full SDXL-base architecture, random weights, built in memory (GPU benchmarks; not exportable)",
    "toy-sdxl": "trained by castbook on its toy world (specs/toy/toy-base.yaml; docs/TOYWORLD.md)",
    "toy-controlnet": "pose ControlNet trained on toy-sdxl (specs/toy/toy-controlnet.yaml)",
    "tiny-ip-adapter": "plain IP-Adapter + image encoder for tiny-sdxl, random (code paths only)",
    "toy-ip-adapter": "IP-Adapter + image encoder trained on toy-sdxl, hold-outs excluded (specs/toy/toy-ip-adapter.yaml)",
    "tiny-clip": "open_clip scorer from a tiny config, random (consistency plumbing)",
    "toy-clip": "open_clip scorer trained on the toy world (default for toy-sdxl)",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list, export, inspect or convert models", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="list built-in models")
    e = sub.add_parser("export", help="write a built-in model as a diffusers folder or a single-file checkpoint")
    e.add_argument("name", help="built-in name, e.g. builtin:tiny-sdxl")
    e.add_argument("out_dir", type=Path, help="new (or empty) folder to write; with --format single-file, a new .safetensors file")
    e.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers",
                   help="diffusers: a folder (fp32 + fp16 variant); single-file: one file in the original Stability layout")
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="single-file weights dtype (default fp32)")
    i = sub.add_parser("inspect", help="say what a .safetensors file is, without loading its weights")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    c = sub.add_parser("convert", help="convert a pickled .bin/.pt/.ckpt of tensors to .safetensors (never runs code)")
    c.add_argument("file", type=Path)
    c.add_argument("--to", choices=["safetensors"], required=True)
    c.add_argument("--out", type=Path, default=None, help="output file (default: FILE with .safetensors)")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imports here: `castbook --help` must not import torch.
    from core.errors import JobError

    try:
        if args.models_command == "list":
            return _list()
        if args.models_command == "export":
            return _export(args)
        if args.models_command == "inspect":
            return _inspect(args)
        if args.models_command == "convert":
            from renderer.model_convert import convert_to_safetensors

            out = convert_to_safetensors(args.file, args.out)
            print(f"wrote {out} (check it with `castbook models inspect {out}`)")
            return 0
    except JobError as e:
        print(f"castbook models {args.models_command}: {e}", file=sys.stderr)
        return 2
    return 2


def _list() -> int:
    from schemas.builtins import BASE_MODELS, CLIP_MODELS, CONTROLNET_MODELS, IP_ADAPTER_MODELS, builtin_digest

    for kind, names in (("base", BASE_MODELS), ("controlnet", CONTROLNET_MODELS), ("ip-adapter", IP_ADAPTER_MODELS),
                        ("scorer", CLIP_MODELS)):
        for name in names:
            print(f"builtin:{name:<16} {kind:<11} {builtin_digest(name):<28} {BUILTIN_HELP.get(name, '')}")
    return 0


def _export(args) -> int:
    from renderer.model_export import export_builtin, export_builtin_single_file

    if args.name.endswith("sdxl-random"):
        print("castbook models export: builtin:sdxl-random is built in memory and is not exported "
              "(its random weights would be ≈7 GB)", file=sys.stderr)
        return 2
    if args.format == "single-file":
        out = export_builtin_single_file(args.name, args.out_dir, args.dtype)
        print(f"wrote {out} (use it as `base_model: {out}`; plain diffusers: "
              f"StableDiffusionXLPipeline.from_single_file({str(out)!r}, config=<folder with the configs>))")
        return 0
    out = export_builtin(args.name, args.out_dir)
    print(f"wrote {out} (load it with StableDiffusionXLPipeline.from_pretrained({str(out)!r}); "
          f"variant='fp16' for the half-precision files)")
    return 0


def _inspect(args) -> int:
    from core.safetensors_info import inspect_file

    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['description']}")
    print(f"  architecture  {info['architecture']}")
    print(f"  dtype         {info['dtype']}" + (f"  (mixed: {info['dtypes']})" if len(info["dtypes"]) > 1 else ""))
    print(f"  size          {info['size_bytes'] / 1e6:.1f} MB, {info['tensors']} tensors, {info['parameters']:,} parameters")
    if info["kind"] == "lora":
        print(f"  rank          {info['rank']}")
        for model, families in info["targets"].items():
            print(f"  targets       {model}: {', '.join(families)}")
    for note in info["notes"]:
        print(f"  note          {note}")
    h = info["hashes"]
    print(f"  sha256        {h['sha256']}")
    print(f"  model hash    {h['a1111_model_hash']}  (A1111 short hash)")
    print(f"  LoRA hash     {h['a1111_lora_hash']}  (A1111/addnet, tensor data only; full {h['lora_hash']})")
    if info["trigger_words"]:
        print(f"  trigger words {', '.join(info['trigger_words'])}  (suggested from the metadata)")
    if info["metadata"]:
        print("  metadata")
        for k, v in info["metadata"].items():
            shown = v if len(v) <= 100 else v[:97] + "..."
            print(f"    {k}: {shown}")
    return 0
