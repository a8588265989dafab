"""`castbook toymodel train-base|train-clip|train-controlnet|train-ip-adapter|eval-base SPEC`: train the toy-world built-ins."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "toymodel",
        help="train the toy-world base model (VAE + UNet), its ControlNet, IP-Adapter or toy CLIP on a CPU",
        description="Train builtin:toy-sdxl / builtin:toy-controlnet / builtin:toy-ip-adapter / builtin:toy-clip from a recipe in specs/toy/ "
                    "(see docs/TOYWORLD.md).",
    )
    sub = p.add_subparsers(dest="toymodel_command",
                           metavar="{train-base,train-decoder,export-base,train-clip,train-controlnet,train-ip-adapter,eval-ip-adapter,eval-base}")
    sub.required = True
    b = sub.add_parser("train-base", help="VAE then UNet from scratch; writes a diffusers folder (e.g. renderer/weights/toy/sdxl)")
    b.add_argument("spec", type=Path, help="recipe YAML, e.g. specs/toy/toy-base.yaml")
    b.add_argument("--no-eval", action="store_true", help="skip the prompt-grid evaluation at the end")
    d = sub.add_parser("train-decoder", help="only stage 3 (decoder fine-tune), e.g. on a second core while train-base runs")
    d.add_argument("spec", type=Path, help="the same recipe YAML as train-base")
    x = sub.add_parser("export-base", help="assemble the latest EMA UNet checkpoint of a stopped run into the output folder")
    x.add_argument("spec", type=Path, help="the same recipe YAML as train-base")
    x.add_argument("--no-eval", action="store_true", help="skip the prompt-grid evaluation")
    x.add_argument("--note", default="", help="free text stored in the training record (e.g. why it was stopped)")
    c = sub.add_parser("train-clip", help="contrastive toy CLIP; writes renderer/weights/toy/clip")
    c.add_argument("spec", type=Path, help="recipe YAML, e.g. specs/toy/toy-clip.yaml")
    n = sub.add_parser("train-controlnet",
                       help="ControlNet on drawn pose maps (canny); writes renderer/weights/toy/controlnet, then eval")
    n.add_argument("spec", type=Path, help="recipe YAML, e.g. specs/toy/toy-controlnet.yaml")
    n.add_argument("--no-eval", action="store_true", help="skip the with/without-control pose evaluation at the end")
    ip = sub.add_parser("train-ip-adapter",
                        help="IP-Adapter + small image encoder on the frozen base; writes renderer/weights/toy/ip-adapter, then eval")
    ip.add_argument("spec", type=Path, help="recipe YAML, e.g. specs/toy/toy-ip-adapter.yaml")
    ip.add_argument("--no-eval", action="store_true", help="skip the held-out characters' evaluation at the end")
    ie = sub.add_parser("eval-ip-adapter", help="held-out characters with the trained IP-Adapter at several scales")
    ie.add_argument("spec", type=Path, help="the recipe YAML the adapter was trained with")
    ie.add_argument("--scale", type=float, action="append", help="IP-Adapter scale (repeatable; default: the recipe's)")
    e = sub.add_parser("eval-base", help="render the fixed prompt grid with a trained base model and check it")
    e.add_argument("spec", type=Path, help="the recipe YAML the model was trained with (its eval section is used)")
    e.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the spec's output)")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def _root_for(spec_path: Path) -> Path:
    from castbook.common import resolve_root

    return resolve_root(argparse.Namespace(root=None), spec_path)  # the one default root; no --root here


def run(args: argparse.Namespace) -> int:
    from schemas import toy as recipes
    from schemas.loader import SpecErrors

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        if args.toymodel_command == "train-clip":
            from toyworld import clip as toy_clip

            record = toy_clip.run_clip(recipes.load_clip_spec(args.spec), _root_for(args.spec), log=log)
            print(json.dumps(record["retrieval_held_out"], indent=2))
            return 0
        if args.toymodel_command == "train-controlnet":
            from toyworld import controlnet as toy_controlnet

            record = toy_controlnet.run_controlnet(recipes.load_controlnet_spec(args.spec), _root_for(args.spec),
                                                   log=log, do_eval=not args.no_eval)
            print(json.dumps(record.get("eval", {}), indent=2))
            return 0
        if args.toymodel_command == "train-ip-adapter":
            from toyworld import ip_adapter as toy_ip

            record = toy_ip.run_ip_adapter(recipes.load_ip_adapter_spec(args.spec), _root_for(args.spec), log=log,
                                           do_eval=not args.no_eval)
            print(json.dumps(record.get("eval", {}), indent=2))
            return 0
        if args.toymodel_command == "eval-ip-adapter":
            from toyworld import ip_adapter_eval

            spec = recipes.load_ip_adapter_spec(args.spec)
            results = ip_adapter_eval.eval_shipped(spec, _root_for(args.spec), args.scale or [spec.eval.scale], log=log)
            print(json.dumps(results, indent=2))
            return 0
        from toyworld import base

        spec = recipes.load_base_spec(args.spec)
        if args.toymodel_command == "train-base":
            record = base.run_base(spec, _root_for(args.spec), log=log, do_eval=not args.no_eval)
            print(json.dumps(record.get("eval", {}), indent=2))
            return 0
        if args.toymodel_command == "train-decoder":
            base.run_decoder_stage(spec, log=log)
            return 0
        if args.toymodel_command == "export-base":
            record = base.export_from_checkpoint(spec, _root_for(args.spec), log=log, do_eval=not args.no_eval,
                                                 note=args.note)
            print(json.dumps(record.get("eval", {}), indent=2))
            return 0
        from toyworld import checker
        from toyworld.export import load_pipeline

        folder = args.model or (_root_for(args.spec) / spec.output)
        result = base.evaluate_pipeline(load_pipeline(folder), spec.eval, spec.data.size, limit=spec.eval.limit)
        print(json.dumps(result, indent=2, sort_keys=True) if args.json else checker.format_table(result))
        return 0
    except SpecErrors as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
