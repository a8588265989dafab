"""Train `builtin:toy-controlnet`: a ControlNet on the toy base model, conditioned on drawn pose maps.

The control a user gives is `{type: canny, image: pose.png}` with a *pose map*: the
character's outline as a white line on black (`toyworld.world.pose_map`, or drawn by
hand). Training therefore shows the ControlNet exactly what the renderer will feed it:

1. data: toy images (`toyworld.generate_one`) and, per image, the pose map of its body,
   turned into a control image by `control_image` (the renderer's canny preprocessing,
   `renderer.control.ControlPreparer.prepare`) and then into a tensor by `control_tensor`
   (the pipeline's `control_image_processor`: RGB, values in [0, 1]). Training and eval go
   through the same two functions, so they cannot drift from each other or from a render.
2. model: `ControlNetModel.from_unet(toy-sdxl UNet)` with the standard zero-initialised output
   layers (at step 0 the ControlNet changes nothing); the base UNet, VAE and text encoders
   stay frozen. Loss: `toyworld.unet.unet_loss` itself (epsilon MSE, offset noise, Min-SNR),
   run on a UNet that receives the ControlNet's residuals the way the pipeline passes them.
3. export: the ControlNet as an fp16 diffusers folder (`<output>/config.json` +
   `diffusion_pytorch_model.safetensors`, swapped in atomically) and `<output>.training.json`.
4. eval (`toyworld.controlnet_eval.evaluate_controlnet`): held-out poses and prompts rendered with and without the
   control (same seeds); the body is segmented in each output and compared with the pose:
   mask IoU with the filled pose polygon and the share of bodies whose centroid lands within
   half a radius of the pose centre. The checker's colour/shape accuracy shows whether the
   control breaks the character.

Training runs through `toyworld.loop.train_loop`, inside `loop.deterministic` (fixed thread
count, deterministic algorithms, seeded generators): the same spec on the same machine gives the
same files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.toy import ToyControlNetSpec
from toyworld.export import (
    atomic_save_safetensors,
    load_frozen_base,
    resolve,
    save_pipeline,
    write_record,
)
from toyworld.loop import deterministic, noise_scheduler, seeded, train_loop
from toyworld.unet import caption_embeddings, drop_captions, unet_loss
from toyworld.vae import encode_latents

# ----------------------------------------------------------------------------- control images

# What `castbook plan` resolves for `{type: canny, image: ...}` (schemas.spec.CannyControl defaults).
CANNY_PARAMS = {"low_threshold": 100, "high_threshold": 200}


@lru_cache(maxsize=1)
def _canny_detector():
    from controlnet_aux import CannyDetector  # lazy: importing controlnet_aux takes seconds

    return CannyDetector()


def control_image(pose_image, size: int = 64):
    """A pose map -> the control image a render uses for `{type: canny, image: pose.png}`.

    The same steps as `ControlPreparer.prepare` with `preprocess: true`: controlnet_aux's
    CannyDetector with the spec's default thresholds, then RGB and a bicubic resize to the job.
    """
    from PIL import Image

    out = _canny_detector()(pose_image.convert("RGB"), output_type="pil", **CANNY_PARAMS)
    return out.convert("RGB").resize((size, size), Image.BICUBIC)


def control_u8(images) -> "torch.Tensor":
    """Control images (PIL, RGB) -> uint8 N x 3 x H x W (what training keeps in memory)."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def control_tensor(u8) -> "torch.Tensor":
    """uint8 control images -> the float tensor the ControlNet sees in the pipeline.

    `StableDiffusionXLControlNetPipeline.prepare_image` runs `VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False)`: pixels / 255 in float32, no [-1, 1] shift (tested to be byte-equal).
    """
    return u8.float() / 255.0


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ControlData:
    """Everything the training loop samples from: scaled latents, control images, caption embeddings."""

    latents: "torch.Tensor"  # N x 4 x 16 x 16, scaled by the VAE's scaling_factor
    control: "torch.Tensor"  # N x 3 x size x size, uint8
    index: "torch.Tensor"  # N: row of `embeds`/`pooled` for each image's caption
    embeds: "torch.Tensor"
    pooled: "torch.Tensor"
    empty_embeds: "torch.Tensor"  # the encoded "" (negative_prompt="")
    empty_pooled: "torch.Tensor"


def toy_examples(count: int, seed: int, size: int = 64):
    """(uint8 images N x 3 x size x size, captions, labels, uint8 control images), generated in memory."""
    import torch

    from toyworld import world as tw

    images, captions, labels, controls = [], [], [], []
    for i in range(count):
        img, label = tw.generate_one(seed, i, size)
        images.append(np.asarray(img))
        captions.append(label.caption)
        labels.append(label)
        controls.append(control_image(tw.pose_map(label.shape, label.pose, size), size))
    u8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return u8, captions, labels, control_u8(controls)


def encode_data(pipe, images_u8, captions, controls_u8) -> ControlData:
    """Latents (posterior means x scaling_factor) and caption embeddings from the frozen base pipeline."""
    import torch

    latents = encode_latents(pipe.vae, images_u8) * pipe.vae.config.scaling_factor
    index, embeds, pooled = caption_embeddings(pipe, captions)
    with torch.no_grad():  # constants: no graph may reach into the training steps
        empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    return ControlData(latents, controls_u8, index, embeds, pooled, empty_e[0], empty_p[0])


def sample_batch(data: ControlData, n: int, caption_dropout: float, control_dropout: float, generator):
    """(latents, prompt embeds, pooled, control tensor) for `n` random images."""
    import torch

    idx = torch.randint(0, len(data.latents), (n,), generator=generator)
    e = data.embeds[data.index[idx]].clone()
    p = data.pooled[data.index[idx]].clone()
    drop_captions(e, p, data.empty_embeds, data.empty_pooled, caption_dropout, generator)
    c = control_tensor(data.control[idx])
    if control_dropout:
        c[torch.rand(n, generator=generator) < control_dropout] = 0
    return data.latents[idx], e, p, c


# ----------------------------------------------------------------------------- model and loss


def build_controlnet(unet, seed: int):
    """ControlNet copied from the base UNet; standard zero-initialised outputs (no perturbation)."""
    from diffusers import ControlNetModel

    with seeded(seed):  # the conditioning embedding's inner convs are random
        # (16, 32, 64): three stages, 4x downsampling, like the toy VAE (64x64 image -> 16x16 latents).
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


def controlled_unet(unet, controlnet, control, scale: float = 1.0):
    """A callable with the UNet's signature whose output includes the ControlNet's residuals.

    Same calls as the pipeline's denoising loop, so `toyworld.unet.unet_loss` can train through it.
    """

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs):
        down, mid = controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=control, conditioning_scale=scale,
                               added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return forward


def controlnet_loss(unet, controlnet, latents, embeds, pooled, control, scheduler, spec: ToyControlNetSpec,
                    size: int, generator):
    """`toyworld.unet.unet_loss` (epsilon MSE, offset noise, Min-SNR) with the control applied.

    `spec` supplies `noise_offset` and `snr_gamma`, the only fields unet_loss reads.
    """
    return unet_loss(controlled_unet(unet, controlnet, control), latents, embeds, pooled, scheduler, spec, size,
                     generator)


def paired_loss(unet, controlnet, data: ControlData, spec: ToyControlNetSpec, size: int, scheduler, seed: int,
                repeats: int = 4) -> dict:
    """Denoising loss on the same noise and timesteps without and with the control (all of `data`, no dropout)."""
    import torch

    lat, e, p = data.latents, data.embeds[data.index], data.pooled[data.index]
    c = control_tensor(data.control)
    base, ctl = [], []
    with torch.no_grad():
        for r in range(repeats):
            base.append(float(unet_loss(unet, lat, e, p, scheduler, spec, size, torch.Generator().manual_seed(seed + r))))
            ctl.append(float(controlnet_loss(unet, controlnet, lat, e, p, c, scheduler, spec, size,
                                             torch.Generator().manual_seed(seed + r))))
    return {"without_control": sum(base) / repeats, "with_control": sum(ctl) / repeats}


def controlnet_lr(spec: ToyControlNetSpec):
    """Linear warm-up, then constant."""

    def lr_at(step: int) -> float:
        return spec.learning_rate * min(1.0, (step + 1) / max(1, spec.warmup_steps))

    return lr_at


def train_controlnet(unet, data: ControlData, spec: ToyControlNetSpec, scheduler_config,
                     log: Callable[[str], None] = print, steps: int | None = None,
                     checkpoint: Callable[[int, object], None] | None = None):
    """Train a fresh ControlNet on the frozen `unet`; returns (controlnet, losses, seconds)."""
    import torch

    unet.eval().requires_grad_(False)
    controlnet = build_controlnet(unet, spec.seed)
    controlnet.train()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)  # lr: train_loop sets it from controlnet_lr
    scheduler = noise_scheduler(scheduler_config)
    g = torch.Generator().manual_seed(spec.seed + 3)
    total = spec.steps if steps is None else steps

    def step_loss(step: int):
        lat, e, p, c = sample_batch(data, spec.batch_size, spec.caption_dropout, spec.control_dropout, g)
        return controlnet_loss(unet, controlnet, lat, e, p, c, scheduler, spec, spec.data.size, g)

    run = train_loop(step_loss, opt, controlnet_lr(spec), total, clip_params=params, name="controlnet", log=log,
                     log_every=25, batch_size=spec.batch_size,
                     checkpoint=(lambda done: checkpoint(done, controlnet)) if checkpoint else None,
                     checkpoint_every=spec.checkpoint_every)
    controlnet.eval()
    return controlnet, run.losses, run.seconds


def load_trained_controlnet(folder: Path):
    """The exported ControlNet as fp32 (stored as fp16), as the renderer loads it."""
    import torch
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(Path(folder), local_files_only=True, use_safetensors=True,
                                           torch_dtype=torch.float32)


# ----------------------------------------------------------------------------- the whole run


def run_controlnet(spec: ToyControlNetSpec, root: Path, log: Callable[[str], None] = print,
                   do_eval: bool = True) -> dict:
    """Data, training, export to `root/spec.output`, eval. Returns the training record."""
    with deterministic(spec.seed, spec.threads):
        return _run_controlnet(spec, root, log, do_eval)


def _run_controlnet(spec: ToyControlNetSpec, root: Path, log: Callable[[str], None], do_eval: bool) -> dict:
    import torch

    # 1. the frozen base model
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pipe = load_frozen_base(root, spec.base)
    size = spec.data.size

    # 2. data: images, pose maps -> control images, latents, caption embeddings
    log(f"generating {spec.data.count} toy images + pose controls (seed {spec.data.seed}, {size}px)")
    images, captions, _, controls = toy_examples(spec.data.count, spec.data.seed, size)
    t_data = time.time() - t_start
    t0 = time.time()
    data = encode_data(pipe, images, captions, controls)
    del images
    # the eval's held-out cases (same labels and control images as eval_cases), for a paired loss
    h_images, h_captions, _, h_controls = toy_examples(spec.eval.count, spec.eval.seed, size)
    held_out = encode_data(pipe, h_images, h_captions, h_controls)
    t_cache = time.time() - t0
    log(f"cached {len(data.latents)} latents and {len(data.embeds)} caption embeddings in {t_cache:.0f}s")

    # 3. train; at each checkpoint, the held-out loss without vs with the control shows whether
    # the ControlNet has started to use the pose (the training loss alone is too noisy to tell)
    scheduler = noise_scheduler(pipe.scheduler.config)
    curve = []

    def checkpoint(step: int, controlnet) -> None:
        atomic_save_safetensors(dict(controlnet.state_dict()), work / "controlnet.safetensors", {"step": str(step)})
        held = paired_loss(pipe.unet, controlnet, held_out, spec, size, scheduler, spec.eval.seed)
        curve.append({"step": step, **held})
        log(f"checkpoint: ControlNet at step {step} -> {work / 'controlnet.safetensors'}; held-out loss "
            f"{held['without_control']:.4f} without control, {held['with_control']:.4f} with")

    controlnet, losses, t_train = train_controlnet(pipe.unet, data, spec, pipe.scheduler.config, log,
                                                   checkpoint=checkpoint)
    checkpoint(spec.steps, controlnet)

    # 4. export (fp16, atomic swap) and reload what the renderer will load
    out = resolve(root, spec.output)
    save_pipeline(controlnet, out)  # works for any diffusers model: deepcopy -> fp16 -> save_pretrained -> swap
    controlnet = load_trained_controlnet(out)
    held_loss = paired_loss(pipe.unet, controlnet, held_out, spec, size, scheduler, spec.eval.seed)
    log(f"held-out denoising loss: {held_loss['without_control']:.4f} without control, "
        f"{held_loss['with_control']:.4f} with")
    record = {
        "spec": spec.model_dump(mode="json"),
        "steps_done": spec.steps,
        "seconds": {"data": round(t_data, 1), "cache": round(t_cache, 1), "train": round(t_train, 1),
                    "total": round(time.time() - t_start, 1)},
        "images_per_second": round(spec.steps * spec.batch_size / max(t_train, 1e-9), 1),
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "held_out_loss": held_loss,  # of the exported (fp16-rounded) weights
        "held_out_loss_curve": curve,
        "threads": spec.threads,
        "torch": torch.__version__,
    }
    # 5. eval
    if do_eval:
        from toyworld.controlnet_eval import evaluate_controlnet  # it imports this module

        t0 = time.time()
        record["eval"] = evaluate_controlnet(pipe, controlnet, spec.eval, size, save_dir=work / "eval")
        record["eval"]["seconds"] = round(time.time() - t0, 1)
        log("eval: " + json.dumps({k: record["eval"][k] for k in ("with_control", "without_control")}))
    write_record(out, record)
    return record
