"""`castbook bench`: castbook's render path vs a bare diffusers loop on the same pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schemas.schedulers import SCHEDULERS

DESCRIPTION = """Render a fixed job set twice in one process — through castbook's actor path and through a
bare diffusers loop on the same pipeline — and print s/image p50/p95 of both, the overhead
ratio, peak memory, model load, first-compile and LoRA switch times, and (on a GPU) the
achieved TFLOP/s and % of the device's bf16 peak. Needs no weights and no network.

examples:
  castbook bench --model builtin:tiny-sdxl --size 64 --steps 4 --images 4          # CPU, seconds
  castbook bench --model builtin:sdxl-random --size 1024 --steps 30 --compile --loras 2 --controlnet
  bash benchmarks/gpu_suite.sh                                                    # the GPU suite
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark castbook's render path against bare diffusers",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:sdxl-random",
                   help="builtin:tiny-sdxl, builtin:sdxl-random (default) or a local diffusers folder / .safetensors")
    p.add_argument("--size", type=int, default=1024, help="width = height in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=30, help="num_inference_steps (default 30)")
    p.add_argument("--images", type=int, default=8, help="images per side (default 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder")
    p.add_argument("--compile-mode", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: max-autotune-no-cudagraphs)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; 'eager' only traces: counts recompiles cheaply)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--loras", type=int, default=0, help="LoRAs stacked on every job (generated, seeded; default 0)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the generated LoRAs (every other one half)")
    p.add_argument("--hotswap", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA hotswap (default: on with --compile)")
    p.add_argument("--switch-both", action=argparse.BooleanOptionalAction, default=None,
                   help="also time LoRA switches in the other mode on a second pipeline (default: tiny models only)")
    p.add_argument("--controlnet", action="store_true", help="add one ControlNet (preprocess: false control map)")
    p.add_argument("--batch", type=int, default=0, help="also time one batched bare call of N jobs (default off)")
    p.add_argument("--guidance", type=float, default=5.0, help="guidance_scale (> 1 means CFG, a doubled batch)")
    p.add_argument("--scheduler", default="euler", choices=sorted(SCHEDULERS),
                   help="sampler of every job (default euler); lcm, tcd, euler_trailing are the few-step ones")
    p.add_argument("--device", default=None, help="cuda:0 or cpu (default: cuda:0 when available)")
    p.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels_last memory format")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse q/k/v projections (not with --loras)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="where the bench run directory goes (default runs/)")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imports here: `castbook --help` must not import torch.
    from pydantic import ValidationError

    from core.errors import JobError

    try:
        from renderer.bench import BenchOptions, run_bench
        from renderer.bench_summary import summary_lines

        opts = BenchOptions(model=args.model, size=args.size, steps=args.steps, images=args.images,
                            compile=args.compile, compile_mode=args.compile_mode, compile_backend=args.compile_backend,
                            dtype=args.dtype, loras=args.loras, lora_rank=args.lora_rank, hotswap=args.hotswap,
                            switch_both=args.switch_both, controlnet=args.controlnet, batch=args.batch,
                            guidance_scale=args.guidance, scheduler=args.scheduler, device=args.device, channels_last=args.channels_last,
                            fuse_qkv=args.fuse_qkv)
        _quiet_libraries()
        progress = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
        results = run_bench(opts, args.out, progress=progress)
    except ValidationError as e:
        for err in e.errors():
            print(f"castbook bench: --{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}",
                  file=sys.stderr)
        return 2
    except JobError as e:
        print(f"castbook bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(summary_lines(results)))
    return 0


def _quiet_libraries() -> None:
    """LoRA files without text-encoder layers make diffusers log a harmless line per load."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated")
