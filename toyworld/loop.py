"""The one training loop of the toy recipes (VAE, decoder, UNet, ControlNet, CLIP) and what they share.

`train_loop` runs the steps: a recipe passes a callable that draws its batch and returns the loss
of one step, its optimizer and learning-rate function, and optionally an EMA, a hook after each
optimizer step, a checkpoint hook and stop conditions. The noising is diffusers' `DDPMScheduler`,
the learning rate is set by torch's `LambdaLR`.

Every number here is pinned: the shipped weights (`schemas.builtins.SHIPPED_WEIGHTS`) were trained
with exactly this arithmetic, and `benchmarks/toy_recipe_identity.py` checks that a retrain gives
the same bytes. Where a library function rounds differently, the recipe's own line stays, with the
measured difference next to it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch
    from diffusers import DDPMScheduler


# ----------------------------------------------------------------------------- determinism


@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """A fixed thread count, deterministic algorithms and a seeded global RNG inside the block; the
    caller's thread count, algorithm setting and RNG state come back afterwards."""
    import torch

    threads_before = torch.get_num_threads()
    algorithms_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(threads_before)
            torch.use_deterministic_algorithms(algorithms_before, warn_only=warn_only_before)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for a model's random init; the caller's RNG state comes back afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- noise


def alphas_cumprod(scheduler_config) -> "torch.Tensor":
    """SDXL's training noise schedule (scaled_linear betas): float64 cumulative product, then float32."""
    import torch

    n = scheduler_config["num_train_timesteps"]
    b0, b1 = scheduler_config["beta_start"], scheduler_config["beta_end"]
    betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def noise_scheduler(scheduler_config) -> "DDPMScheduler":
    """The training noise schedule as a `DDPMScheduler` (its `add_noise` noises the latents)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    # Keep the recipe's float64-then-float32 schedule: DDPMScheduler's own (float32 throughout) differs
    # in 986 of 1000 entries (up to 4.8e-7), which changes every trained weight; add_noise on this one
    # is bit-identical to the recipe's a.sqrt() * x + (1 - a).sqrt() * noise (measured).
    scheduler.alphas_cumprod = alphas_cumprod(scheduler_config)
    return scheduler


def min_snr_weighted(per_sample, scheduler, timesteps, gamma: float):
    """Min-SNR-gamma weighting of per-sample epsilon losses (Hang et al. 2023)."""
    import torch

    ac = scheduler.alphas_cumprod
    # Not diffusers.training_utils.compute_snr: its (sqrt(a) / sqrt(1 - a)) ** 2 differs from
    # a / (1 - a) in 675 of 1000 timesteps (relative 2e-7), which changes the trained weights.
    snr = ac[timesteps] / (1 - ac[timesteps])
    return per_sample * torch.clamp(snr, max=gamma) / snr


# ----------------------------------------------------------------------------- EMA


class Ema:
    """Exponential moving average of `params` into `shadow` (same shapes, same order), with the
    recipe's warm-up: decay min(decay, (1 + step) / (10 + step)), 0.1 at step 0."""

    def __init__(self, shadow: list, params: list, decay: float):
        if len(shadow) != len(params):
            raise ValueError(f"EMA: {len(shadow)} shadow tensors for {len(params)} parameters")
        self.shadow, self.params, self.decay = shadow, params, decay

    def decay_at(self, step: int) -> float:
        # Not diffusers.training_utils.EMAModel: its warm-up gives decay 0.0 at the first step (no
        # setting gives 0.1), and its s - (1 - d) * (s - p) update differs from lerp in the last bit
        # of 434 of 1000 elements (measured): both change the shipped UNet.
        return min(self.decay, (1 + step) / (10 + step))

    def update(self, step: int) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [q.detach() for q in self.params], 1 - self.decay_at(step))


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopResult:
    losses: list[float]
    done: int  # optimizer steps taken (fewer than asked when a stop condition ended the run)
    seconds: float


def train_loop(
    step_loss: Callable[[int], "torch.Tensor"],
    optimizer,
    lr_at: Callable[[int], float],
    steps: int,
    *,
    clip_params: list,
    max_grad_norm: float = 1.0,
    name: str,
    log: Callable[[str], None] = print,
    log_every: int = 50,
    batch_size: int | None = None,
    ema: Ema | None = None,
    after_step: Callable[[], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int | None = None,
    stop_after: int | None = None,
    max_minutes: float | None = None,
) -> LoopResult:
    """Run `steps` optimizer steps; returns the losses, the steps done and the seconds.

    Each step: `loss = step_loss(step)` (draws its batch, returns the loss), zero grads, backward,
    clip the gradient norm of `clip_params` to `max_grad_norm`, optimizer step, learning-rate
    step, `ema.update(step)`, `after_step()`. Every `checkpoint_every` steps (not the last: the
    caller saves the final state) `checkpoint(steps_done)`. Stops early at `stop_after` steps (the
    schedule stays that of `steps`) or after `max_minutes`.

    The learning rate of each param group is its initial `lr` times `lr_at(step)`: build the
    optimizer with lr=1.0 (or a group's share of the recipe's lr) and give `lr_at` the recipe's
    learning rate itself. A factor-only `lr_at` times the recipe's lr would round differently from
    the recipe's lr formula (the UNet's: at 79 of 6000 steps), and change the trained weights.
    """
    import torch

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    t0, done = time.time(), 0
    avg = log_every
    for step in range(steps):
        if max_minutes and time.time() - t0 > max_minutes * 60:
            log(f"{name}: stopping at step {step}/{steps}: max_minutes={max_minutes} reached")
            break
        if stop_after and step >= stop_after:
            log(f"{name}: stopping at step {step}/{steps}: stop_after={stop_after}")
            break
        lr = optimizer.param_groups[0]["lr"]
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip_params, max_grad_norm)
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(step)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        done = step + 1
        if step % log_every == 0 or done == steps:
            el = time.time() - t0
            speed = f" {done * batch_size / max(el, 1e-9):.1f} img/s" if batch_size else ""
            log(f"{name} step {done}/{steps} loss(avg{avg}) {sum(losses[-avg:]) / len(losses[-avg:]):.4f} "
                f"lr {lr:.2e} {el:.0f}s{speed}")
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done != steps:
            checkpoint(done)
    return LoopResult(losses, done, time.time() - t0)
