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
   stay frozen. Loss: `from_scratch.unet_loss` itself (epsilon MSE, offset noise, Min-SNR),
   run on a UNet that receives the ControlNet's residuals the way the pipeline passes them.
3. export: the ControlNet as an fp16 diffusers folder (`<output>/config.json` +
   `diffusion_pytorch_model.safetensors`, swapped in atomically) and `<output>.training.json`.
4. eval (`evaluate_controlnet`): held-out poses and prompts rendered with and without the
   control (same seeds); the body is segmented in each output and compared with the pose:
   mask IoU with the filled pose polygon and the share of bodies whose centroid lands within
   half a radius of the pose centre. The checker's colour/shape accuracy shows whether the
   control breaks the character.

Determinism: fixed thread count, `torch.use_deterministic_algorithms(True)`, seeded
generators; the same spec on the same machine gives the same files.
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
from pydantic import BaseModel, ConfigDict, Field, model_validator

# ----------------------------------------------------------------------------- the spec


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlDataSpec(_Frozen):
    seed: int = 0  # toy-world generator seed (hold-outs excluded, like the base model's data)
    count: int = Field(5000, ge=1)  # images generated in memory
    size: int = Field(64, ge=32)


class ControlEvalSpec(_Frozen):
    count: int = Field(48, ge=1)  # held-out poses and prompts (generator seed `seed`)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    seed: int = 2000  # generator seed of the held-out labels and of the render noise
    conditioning_scale: float = Field(1.0, ge=0)  # controlnet_conditioning_scale (a spec's `scale:`)
    batch_size: int = Field(16, ge=1)


class ToyControlNetSpec(_Frozen):
    """A ControlNet training run on the toy base model."""

    seed: int = 0  # torch seed for init, batches and noise
    threads: int = Field(1, ge=1)  # fixed: the thread count changes float results
    data: ControlDataSpec = ControlDataSpec()
    steps: int = Field(1300, ge=1)
    batch_size: int = Field(16, ge=1)  # small batches, more steps: the zero-initialised path opens with steps
    learning_rate: float = Field(2e-3, gt=0)  # constant after warmup
    warmup_steps: int = Field(50, ge=0)
    noise_offset: float = Field(0.1, ge=0)  # as the base model was trained
    snr_gamma: float | None = Field(5.0, gt=0)  # Min-SNR weighting; null = plain MSE
    caption_dropout: float = Field(0.1, ge=0, le=1)  # uncond samples: CFG runs the ControlNet on them too
    control_dropout: float = Field(0.0, ge=0, le=1)  # share of samples with a black (empty) control image
    eval: ControlEvalSpec = ControlEvalSpec()
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints in work_dir
    work_dir: str = "/tmp/castbook-toy-controlnet"
    output: str = "renderer/weights/toy/controlnet"  # ControlNet diffusers folder, relative to the project root
    base: str = "renderer/weights/toy/sdxl"  # the frozen base model (diffusers folder)

    @model_validator(mode="after")
    def _held_out_eval(self):
        if self.eval.seed == self.data.seed:
            raise ValueError(f"eval.seed ({self.eval.seed}) equals data.seed: the eval poses would be training "
                             f"poses; choose another eval.seed")
        return self


def load_controlnet_spec(path: Path) -> ToyControlNetSpec:
    from schemas.loader import load_yaml_model

    return load_yaml_model(Path(path), ToyControlNetSpec)  # type: ignore[return-value]


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

    from toyworld import base as fs

    latents = fs.encode_latents(pipe.vae, images_u8) * pipe.vae.config.scaling_factor
    index, embeds, pooled = fs.caption_embeddings(pipe, captions)
    with torch.no_grad():  # constants: no graph may reach into the training steps
        empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    return ControlData(latents, controls_u8, index, embeds, pooled, empty_e[0], empty_p[0])


def sample_batch(data: ControlData, n: int, caption_dropout: float, control_dropout: float, generator):
    """(latents, prompt embeds, pooled, control tensor) for `n` random images."""
    import torch

    from toyworld import base as fs

    idx = torch.randint(0, len(data.latents), (n,), generator=generator)
    e = data.embeds[data.index[idx]].clone()
    p = data.pooled[data.index[idx]].clone()
    fs.drop_captions(e, p, data.empty_embeds, data.empty_pooled, caption_dropout, generator)
    c = control_tensor(data.control[idx])
    if control_dropout:
        c[torch.rand(n, generator=generator) < control_dropout] = 0
    return data.latents[idx], e, p, c


# ----------------------------------------------------------------------------- model and loss


def build_controlnet(unet, seed: int):
    """ControlNet copied from the base UNet; standard zero-initialised outputs (no perturbation)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)  # the conditioning embedding's inner convs are random
    # (16, 32, 64): three stages, 4x downsampling, like the toy VAE (64x64 image -> 16x16 latents).
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


def controlled_unet(unet, controlnet, control, scale: float = 1.0):
    """A callable with the UNet's signature whose output includes the ControlNet's residuals.

    Same calls as the pipeline's denoising loop, so `from_scratch.unet_loss` can train through it.
    """

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs):
        down, mid = controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=control, conditioning_scale=scale,
                               added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid)

    return forward


def controlnet_loss(unet, controlnet, latents, embeds, pooled, control, ac, spec: ToyControlNetSpec, size: int,
                    generator):
    """`from_scratch.unet_loss` (epsilon MSE, offset noise, Min-SNR) with the control applied.

    `spec` supplies `noise_offset` and `snr_gamma`, the only fields unet_loss reads.
    """
    from toyworld import base as fs

    return fs.unet_loss(controlled_unet(unet, controlnet, control), latents, embeds, pooled, ac, spec, size,
                        generator)


def paired_loss(unet, controlnet, data: ControlData, spec: ToyControlNetSpec, size: int, ac, seed: int,
                repeats: int = 4) -> dict:
    """Denoising loss on the same noise and timesteps without and with the control (all of `data`, no dropout)."""
    import torch

    from toyworld import base as fs

    lat, e, p = data.latents, data.embeds[data.index], data.pooled[data.index]
    c = control_tensor(data.control)
    base, ctl = [], []
    with torch.no_grad():
        for r in range(repeats):
            base.append(float(fs.unet_loss(unet, lat, e, p, ac, spec, size, torch.Generator().manual_seed(seed + r))))
            ctl.append(float(controlnet_loss(unet, controlnet, lat, e, p, c, ac, spec, size,
                                             torch.Generator().manual_seed(seed + r))))
    return {"without_control": sum(base) / repeats, "with_control": sum(ctl) / repeats}


def _lr_at(spec: ToyControlNetSpec, step: int) -> float:
    return spec.learning_rate * min(1.0, (step + 1) / max(1, spec.warmup_steps))


def train_controlnet(unet, data: ControlData, spec: ToyControlNetSpec, scheduler_config,
                     log: Callable[[str], None] = print, steps: int | None = None,
                     checkpoint: Callable[[int, object], None] | None = None):
    """Train a fresh ControlNet on the frozen `unet`; returns (controlnet, losses, seconds)."""
    import torch

    from toyworld import base as fs

    unet.eval().requires_grad_(False)
    controlnet = build_controlnet(unet, spec.seed)
    controlnet.train()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    ac = fs.alphas_cumprod(scheduler_config)
    g = torch.Generator().manual_seed(spec.seed + 3)
    total = spec.steps if steps is None else steps
    size = spec.data.size
    losses, t0 = [], time.time()
    for step in range(total):
        lr = _lr_at(spec, step)
        for group in opt.param_groups:
            group["lr"] = lr
        lat, e, p, c = sample_batch(data, spec.batch_size, spec.caption_dropout, spec.control_dropout, g)
        loss = controlnet_loss(unet, controlnet, lat, e, p, c, ac, spec, size, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if step % 25 == 0 or done == total:
            el = time.time() - t0
            recent = sum(losses[-25:]) / len(losses[-25:])
            log(f"controlnet step {done}/{total} loss(avg25) {recent:.4f} lr {lr:.2e} {el:.0f}s "
                f"{done * spec.batch_size / max(el, 1e-9):.1f} img/s")
        if checkpoint and done % spec.checkpoint_every == 0 and done != total:
            checkpoint(done, controlnet)
    controlnet.eval()
    return controlnet, losses, time.time() - t0


def load_trained_controlnet(folder: Path):
    """The exported ControlNet as fp32 (stored as fp16), as the renderer loads it."""
    import torch
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(Path(folder), local_files_only=True, use_safetensors=True,
                                           torch_dtype=torch.float32)


# ----------------------------------------------------------------------------- eval


def pose_mask(shape: str, pose, size: int = 64) -> np.ndarray:
    """The filled pose polygon (what `render` paints as the body), as a boolean mask."""
    from PIL import Image, ImageDraw

    from toyworld import world as tw

    k = tw._SS
    img = Image.new("L", (size * k, size * k), 0)
    ImageDraw.Draw(img).polygon(tw._xf(tw._shape_polygon(shape), pose, k), fill=255)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX)) >= 128


def body_mask(image, background: str) -> np.ndarray:
    """The character's filled silhouette in an image of the prompted scene (empty if none).

    The checker's body step (`toyworld.checker.classify`, 2.) with the scene known from the
    prompt: pixels nearer (CIELAB) to any body colour than to the scene's palette, the sclera or
    the mouth colour; the largest connected component, holes (eyes, mouth) filled.
    """
    from scipy import ndimage

    from toyworld import world as tw
    from toyworld.checker import rgb_to_lab

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    lab = rgb_to_lab(rgb)
    bodies = rgb_to_lab(np.array(list(tw.COLOURS.values()), dtype=float))
    others = rgb_to_lab(np.array([*tw.SCENE_PALETTES[background].values(), tw.SCLERA, tw.MOUTH], dtype=float))
    d = ((lab[..., None, :] - np.concatenate([bodies, others])) ** 2).sum(-1)
    candidate = d.argmin(-1) < len(bodies)
    labels, n = ndimage.label(candidate)
    if n == 0:
        return np.zeros(candidate.shape, bool)
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(ndimage.binary_closing(body, iterations=1)) | body


def pose_agreement(image, label) -> dict:
    """How well the body in `image` matches `label.pose`: IoU, centroid distance (px), hit."""
    body = body_mask(image, label.background)
    target = pose_mask(label.shape, label.pose, image.size[0])
    union = (body | target).sum()
    iou = float((body & target).sum() / union) if union else 0.0
    if body.sum() == 0:
        return {"iou": 0.0, "centroid_distance": None, "hit": False}
    ys, xs = np.nonzero(body)
    # Pixel (i, j) covers [j, j+1) x [i, i+1) in the generator's continuous coordinates.
    dist = float(np.hypot(xs.mean() + 0.5 - label.pose.x, ys.mean() + 0.5 - label.pose.y))
    return {"iou": iou, "centroid_distance": dist, "hit": dist <= 0.5 * label.pose.radius}


def _summary(scores: list[dict]) -> dict:
    dists = [s["centroid_distance"] for s in scores if s["centroid_distance"] is not None]
    return {
        "mean_iou": sum(s["iou"] for s in scores) / len(scores),
        "position_hit_rate": sum(s["hit"] for s in scores) / len(scores),
        "mean_centroid_distance_px": (sum(dists) / len(dists)) if dists else None,
        "bodies_found": len(dists),
    }


def eval_cases(spec: ControlEvalSpec, size: int = 64):
    """The held-out labels (poses + prompts) and their control images."""
    from toyworld import world as tw

    labels = [tw.sample_label(spec.seed, i, size)[0] for i in range(spec.count)]
    return labels, [control_image(tw.pose_map(l.shape, l.pose, size), size) for l in labels]


def evaluate_controlnet(base_pipe, controlnet, spec: ControlEvalSpec, size: int = 64,
                        save_dir: Path | None = None) -> dict:
    """Render held-out prompts with and without the pose control (same seeds) and compare with the poses.

    Returns `{"count", "with_control": {...}, "without_control": {...}, ...}`; each side has
    mean_iou, position_hit_rate (centroid within 0.5 radius of the pose centre),
    mean_centroid_distance_px, bodies_found and `checker` (toyworld.checker accuracy).
    """
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from toyworld import base as fs
    from toyworld import checker as ev

    # 1. the held-out cases
    labels, maps = eval_cases(spec, size)
    # 2. two pipelines over the same components
    comps = {k: v for k, v in base_pipe.components.items()}
    plain = StableDiffusionXLPipeline(**comps)
    control = StableDiffusionXLControlNetPipeline(**comps, controlnet=controlnet)
    for p in (plain, control):
        p.set_progress_bar_config(disable=True)
    # 3. render, batch by batch, the same seed per case on both sides
    with_c, without_c = [], []
    for i in range(0, len(labels), spec.batch_size):
        chunk = labels[i : i + spec.batch_size]
        prompts = [l.caption for l in chunk]
        common = dict(prompt=prompts, negative_prompt=[""] * len(chunk), num_inference_steps=spec.steps,
                      guidance_scale=spec.guidance_scale, width=size, height=size)

        def gens():
            return [torch.Generator("cpu").manual_seed(spec.seed + i + j) for j in range(len(chunk))]

        with torch.no_grad():
            without_c.extend(plain(generator=gens(), **common).images)
            with_c.extend(control(image=maps[i : i + spec.batch_size], generator=gens(),
                                  controlnet_conditioning_scale=spec.conditioning_scale, **common).images)
    if save_dir:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for k, (a, b, m) in enumerate(zip(with_c, without_c, maps)):
            a.save(save_dir / f"{k:03d}-with.png")
            b.save(save_dir / f"{k:03d}-without.png")
            m.save(save_dir / f"{k:03d}-control.png")
    # 4. pose agreement and the checker, per side
    out = {"count": len(labels), "steps": spec.steps, "guidance_scale": spec.guidance_scale,
           "conditioning_scale": spec.conditioning_scale, "seed": spec.seed}
    for name, images in (("with_control", with_c), ("without_control", without_c)):
        side = _summary([pose_agreement(img, l) for img, l in zip(images, labels)])
        checked = ev.evaluate([(img, {"name": f"{k:03d}", "colour": l.colour, "shape": l.shape, "eyes": l.eyes,
                                      "expression": l.expression, "background": l.background})
                               for k, (img, l) in enumerate(zip(images, labels))])
        side["checker"] = fs.accuracy_row(checked)
        out[name] = side
    return out


# ----------------------------------------------------------------------------- the whole run


def run_controlnet(spec: ToyControlNetSpec, root: Path, log: Callable[[str], None] = print,
                   do_eval: bool = True) -> dict:
    """Data, training, export to `root/spec.output`, eval. Returns the training record."""
    import torch

    from toyworld import base as fs

    def resolve(p: str) -> Path:
        return Path(p) if Path(p).is_absolute() else Path(root) / p

    # 1. determinism, the frozen base model
    fs.set_determinism(spec.seed, spec.threads)
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    base_dir = resolve(spec.base)
    if not (base_dir / "model_index.json").exists():
        raise FileNotFoundError(f"base model {base_dir} is not a diffusers folder; train it first with "
                                f"`castbook toymodel train-base specs/toy/toy-base.yaml` or fix `base:`")
    pipe = fs.load_pipeline(base_dir)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
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
    ac = fs.alphas_cumprod(pipe.scheduler.config)
    curve = []

    def checkpoint(step: int, controlnet) -> None:
        fs.atomic_save_safetensors(dict(controlnet.state_dict()), work / "controlnet.safetensors", {"step": str(step)})
        held = paired_loss(pipe.unet, controlnet, held_out, spec, size, ac, spec.eval.seed)
        curve.append({"step": step, **held})
        log(f"checkpoint: ControlNet at step {step} -> {work / 'controlnet.safetensors'}; held-out loss "
            f"{held['without_control']:.4f} without control, {held['with_control']:.4f} with")

    controlnet, losses, t_train = train_controlnet(pipe.unet, data, spec, pipe.scheduler.config, log,
                                                   checkpoint=checkpoint)
    checkpoint(spec.steps, controlnet)

    # 4. export (fp16, atomic swap) and reload what the renderer will load
    out = resolve(spec.output)
    fs.save_pipeline(controlnet, out)  # works for any diffusers model: deepcopy -> fp16 -> save_pretrained -> swap
    controlnet = load_trained_controlnet(out)
    held_loss = paired_loss(pipe.unet, controlnet, held_out, spec, size, ac, spec.eval.seed)
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
        t0 = time.time()
        record["eval"] = evaluate_controlnet(pipe, controlnet, spec.eval, size, save_dir=work / "eval")
        record["eval"]["seconds"] = round(time.time() - t0, 1)
        log("eval: " + json.dumps({k: record["eval"][k] for k in ("with_control", "without_control")}))
    (out.parent / f"{out.name}.training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record

