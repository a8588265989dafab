"""castbook training step time ÷ a bare peft + diffusers training step, same tiny model, same run.

    python benchmarks/train_step.py [--steps 30] [--rounds 5] [--device cpu|cuda] [--resolution 64]

Both sides: builtin:tiny-sdxl UNet, the same LoRA config, AdamW, batch 2, grad clipping.
castbook's step includes everything it does per step (seeded per-step draws, cached
latents/text embeddings from its cache, SDXL time ids); the bare step uses tensors
already in memory. Rounds alternate between the two so machine load hits both.
Target: ratio <= 1.05. Prints the ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_data(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zqx, pattern {i}")


def bare_step_fn(trainer, device: str, batch: int, seed: int):
    """A plain diffusers+peft LoRA step on a fresh copy of the same UNet."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from renderer.builtins import builtin_dir

    unet = UNet2DConditionModel.from_pretrained(builtin_dir("tiny-sdxl") / "unet", local_files_only=True).to(device)
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(trainer.models.pipe.scheduler.config)
    mb = trainer.micro_batch(0, 0)  # the same tensors castbook trains on
    latents, embeds, pooled, time_ids = (mb[k].to(device) for k in ("latents", "embeds", "pooled", "time_ids"))
    unet.train()

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="steps per round per side")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from schemas.training import TrainingSpec
    from trainer.train import Trainer

    batch = 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", 4, args.resolution)
        spec = TrainingSpec.model_validate({
            "base_model": "builtin:tiny-sdxl", "kind": "character",
            "dataset": {"folders": ["data"], "trigger": "zqx"},
            "lora": {"rank": 4, "target_modules": TARGETS},
            "train": {"steps": 10_000, "learning_rate": 1e-4, "resolution": args.resolution, "batch_size": batch},
            "output": {"name": "bench", "folder": "out"},
        })
        trainer = Trainer(spec, root, device=args.device, progress=False, render=False)
        device = trainer.models.device
        bare = bare_step_fn(trainer, device, batch, spec.train.seed)
        for _ in range(3):  # warm-up: fills castbook's latent/text caches, allocator, kernels
            trainer.train_step()
            bare()

        def timed(fn) -> float:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / args.steps

        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(timed(trainer.train_step))
            theirs.append(timed(bare))
        ratios = [a / b for a, b in zip(ours, theirs)]
        o, b, r = statistics.median(ours), statistics.median(theirs), statistics.median(ratios)
        print(f"device={device} resolution={args.resolution} batch={batch} steps/round={args.steps} rounds={args.rounds}")
        print(f"castbook step  median {o * 1000:.1f} ms")
        print(f"bare step      median {b * 1000:.1f} ms")
        print(f"ratio castbook/bare = {r:.3f} (per-round: {', '.join(f'{x:.3f}' for x in ratios)}; target <= 1.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
