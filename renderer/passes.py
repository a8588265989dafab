"""Finishing passes of one job, on the components the `JobRenderer` already loaded.

Called once from `JobRenderer.render` (renderer/pipeline.py, step 7) for a job whose `passes`
(schemas/passes.py) are set, in this order:

1. first pass: text-to-image (with the job's controls) as usual; or img2img from `init_image`;
   or inpainting into a `background_plate` (`StableDiffusionXLInpaintPipeline`), after which the
   plate is pasted back outside the mask (`VaeImageProcessor.apply_overlay`, with the mask
   feathered inwards only), so outside the mask the image equals the plate exactly (0/255; the
   VAE round trip alone would change it, see benchmarks/RESULTS.md);
2. refiner hand-off (text-to-image first passes only): the base stops at `denoising_end=switch_at`
   and returns latents; `StableDiffusionXLImg2ImgPipeline` on the refiner's components continues
   from `denoising_start=switch_at`, as in diffusers' base+refiner recipe;
3. hires fix: upscale (Lanczos on the image, or bilinear on the latents), then img2img at the
   larger size with the hires strength and steps; strength 0 returns the upscale itself;
4. detail pass: find the character (renderer/detect.py), crop with padding, re-render the crop
   at the job's largest side with img2img, paste it back with a feathered mask.

Every pass pipeline is built once from `pipe.components` (`StableDiffusionXLImg2ImgPipeline(
**pipe.components)` and the inpaint twin) and cached on the renderer, so the weights, the LoRA
adapters and their weights are shared: no second copy. A refiner that is another model is loaded
once and cached the same way. Every call draws from a fresh `torch.Generator("cpu").manual_seed(
seed)` and uses the job's prompt, negative prompt, guidance and scheduler; extra conditioning in
the first pass's kwargs (e.g. IP-Adapter embeddings) is passed to every pass, the ControlNet
inputs only to the first.
"""

from __future__ import annotations

import time
from pathlib import Path

from core.errors import JobError

# First-pass kwargs that belong to the ControlNet pipeline only.
CONTROL_KWARGS = frozenset({"image", "controlnet_conditioning_scale", "control_guidance_start",
                            "control_guidance_end", "guess_mode"})
ASPECT_TOLERANCE = 0.01  # an init image or plate whose aspect ratio differs more is refused
AUTO_MASK_FRACTION = 0.72  # `mask: auto`: a centred ellipse over the middle 72 % of width and height
PLATE_FEATHER = 2.0  # px, Gaussian radius of the inward feather of the plate blend
DETAIL_FEATHER_FRACTION = 0.25  # of the padding: Gaussian radius of the detail paste mask


def first_pass_kwargs(job) -> dict:
    """What the text-to-image first pass adds: the refiner's `denoising_end` and latent output
    where the next pass takes latents (refiner, latent upscaler)."""
    p = job.passes
    if p is None or p.init is not None:
        return {}
    if p.refiner is not None:
        return {"denoising_end": p.refiner.switch_at, "output_type": "latent"}
    if p.hires is not None and p.hires.upscaler == "latent":
        return {"output_type": "latent"}
    return {}


def run_passes(renderer, run_pipe, job, kwargs: dict, dtype: str, timings: dict):
    """The job's image after all its passes (a PIL image). `kwargs` are the first pass's extra
    pipeline arguments (controls, adapters)."""
    p = job.passes
    extra = {k: v for k, v in kwargs.items() if k not in CONTROL_KWARGS}
    stats = renderer.stats.setdefault("passes", {})
    t = time.perf_counter()
    if p.init is not None:
        if p.refiner is not None:
            raise JobError(f"{job.name}: a refiner hand-off needs a text-to-image first pass; it cannot follow "
                           "init_image or background_plate yet")
        result = _init_pass(renderer, job, extra, dtype)
        _count(stats, "inpaint" if p.init.mask else "img2img")
    else:
        result = renderer._denoise(run_pipe, job, {**kwargs, **first_pass_kwargs(job)})
    timings["first_pass_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if p.refiner is not None:
        pipe = _refiner_pipe(renderer, p.refiner, dtype)
        want_latents = p.hires is not None and p.hires.upscaler == "latent"
        result = _img2img_call(renderer, pipe, job, dict(image=result, denoising_start=p.refiner.switch_at,
                                                         num_inference_steps=job.num_inference_steps),
                               extra, latents=want_latents, scheduler_config=pipe.scheduler.config)
        _count(stats, "refiner")
    if p.hires is not None:
        result = _hires(renderer, job, result, extra, dtype)
        _count(stats, "hires")
    if p.detail is not None:
        result = _detail(renderer, job, result, extra, dtype, stats)
    timings["passes_s"] = time.perf_counter() - t
    return result


# --- pipelines (cached on the renderer, built from the loaded components) ------------------------


def pass_pipe(renderer, kind: str, dtype: str):
    """`StableDiffusionXLImg2ImgPipeline` or `StableDiffusionXLInpaintPipeline` on the base
    pipeline's components (the same UNet with its LoRA adapters, VAE and text encoders)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    key = (kind, renderer._pipe_key)
    if key not in renderer._pass_pipes:
        cls = StableDiffusionXLImg2ImgPipeline if kind == "img2img" else StableDiffusionXLInpaintPipeline
        pipe = cls(**renderer.pipe.components)
        pipe.set_progress_bar_config(disable=True)
        if renderer.performance.get("cpu_offload") and renderer.device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=renderer.device)
        renderer._pass_pipes[key] = pipe
    return renderer._pass_pipes[key]


def _refiner_pipe(renderer, refiner, dtype: str):
    """The refiner's img2img pipeline: the base's own components when the refiner is the base model
    (no second copy); otherwise the refiner model, loaded once: a built-in through
    `load_base_pipeline`, a single-file checkpoint or diffusers folder through
    `load_refiner_pipeline` (a single file's kind and config come from its header, so an
    `sd_xl_refiner_1.0.safetensors` loads like a base model does)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from renderer.models import load_base_pipeline, load_refiner_pipeline
    from schemas.job import ResolvedModel

    if refiner.model_digest == renderer._pipe_key[0]:
        return pass_pipe(renderer, "img2img", dtype)
    key = ("refiner", refiner.model_digest, dtype)
    if key not in renderer._pass_pipes:
        model = ResolvedModel(ref=refiner.model_ref, kind=refiner.model_kind, digest=refiner.model_digest)
        if model.kind == "builtin":
            loaded = load_base_pipeline(model, renderer.root, renderer.device, dtype)
        else:
            loaded = load_refiner_pipeline(model, renderer.root, renderer.device, dtype)
        base_vae, ref_vae = renderer.pipe.vae.config, loaded.vae.config
        if (len(base_vae.block_out_channels), base_vae.latent_channels) != (len(ref_vae.block_out_channels),
                                                                          ref_vae.latent_channels):
            raise JobError(f"refiner {refiner.model_ref} has another latent space than the base model (its VAE "
                           "downsamples or encodes differently), so it cannot continue the base's latents; "
                           "use a refiner made for this base model")
        aesthetics = bool(getattr(loaded.config, "requires_aesthetics_score", False))
        pipe = StableDiffusionXLImg2ImgPipeline(**loaded.components, requires_aesthetics_score=aesthetics)
        pipe.set_progress_bar_config(disable=True)
        renderer._pass_pipes[key] = pipe
        renderer.stats["model_loads"] += 1
    return renderer._pass_pipes[key]


# --- calls ---------------------------------------------------------------------------------------


def _generator(job):
    import torch

    return torch.Generator("cpu").manual_seed(job.seed)


def _to_pil(job, arr):
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    if np.isnan(arr).any():
        raise JobError(f"{job.name}: a finishing pass produced NaN values (numerical overflow, often fp16); "
                       "try dtype: bf16 or fp32")
    return VaeImageProcessor.numpy_to_pil(arr)[0]


def _img2img_call(renderer, pipe, job, args: dict, extra: dict, latents: bool = False,
                  scheduler_config=None, prompt: str | None = None):
    from renderer.models import make_scheduler

    pipe.scheduler = make_scheduler(job.scheduler, scheduler_config or renderer._base_scheduler_config)

    def call():
        if renderer._inject_oom > 0:  # test hook (renderer/test_hooks.py), as in the first pass
            renderer._inject_oom -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by CASTBOOK_INJECT_OOM for testing)")
        out = pipe(prompt=prompt if prompt is not None else job.prompt, negative_prompt=job.negative_prompt,
                   guidance_scale=job.guidance_scale, generator=_generator(job),
                   output_type="latent" if latents else "np", **args, **extra)
        return out.images if latents else _to_pil(job, out.images)

    import torch

    # The larger passes (hires) need more memory than the first: one retry with the first pass's
    # fallback (VAE tiling, and model offload on CUDA), which stays on for the next jobs.
    try:
        return call()
    except torch.cuda.OutOfMemoryError as first:
        applied = renderer.oom_fallback(pipe)
        try:
            return call()
        except torch.cuda.OutOfMemoryError as e:
            raise JobError(f"{job.name}: out of GPU memory in a finishing pass even with {applied} ({e}); "
                           "use a smaller hires scale or a GPU with more memory") from first


def load_image(renderer, job, rel: str, what: str):
    """An init image or plate at the job's size: resized with Lanczos when only the size differs;
    a different aspect ratio is refused (cropping would move the composition silently)."""
    from PIL import Image

    path = Path(renderer.root) / rel
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise JobError(f"{job.name}: {what} {rel} cannot be read as an image ({e})") from e
    if image.size == (job.width, job.height):
        return image
    if abs(image.width / image.height - job.width / job.height) > ASPECT_TOLERANCE * job.width / job.height:
        raise JobError(f"{job.name}: {what} {rel} is {image.width}x{image.height} but the job renders "
                       f"{job.width}x{job.height} (another aspect ratio); crop it to {job.width}:{job.height} "
                       "or set the scene's width and height to match it")
    return image.resize((job.width, job.height), Image.Resampling.LANCZOS)


def plate_mask(renderer, job):
    """The binary inpainting mask (PIL "L", 255 = repaint) of a plate job at the job's size."""
    from PIL import Image, ImageDraw

    mask_ref = job.passes.init.mask
    if mask_ref == "auto":
        mask = Image.new("L", (job.width, job.height), 0)
        mx, my = (1 - AUTO_MASK_FRACTION) / 2 * job.width, (1 - AUTO_MASK_FRACTION) / 2 * job.height
        ImageDraw.Draw(mask).ellipse([mx, my, job.width - mx, job.height - my], fill=255)
        return mask
    mask = load_image(renderer, job, mask_ref, "mask").convert("L")
    return mask.point(lambda v: 255 if v >= 128 else 0)


def _init_pass(renderer, job, extra: dict, dtype: str):
    from PIL import ImageChops, ImageFilter

    init = job.passes.init
    image = load_image(renderer, job, init.image, "background plate" if init.mask else "init image")
    if init.mask is None:
        if init.strength == 0:  # diffusers refuses 0 denoising steps: the image itself
            return image
        pipe = pass_pipe(renderer, "img2img", dtype)
        return _img2img_call(renderer, pipe, job, dict(image=image, strength=init.strength,
                                                       num_inference_steps=job.num_inference_steps), extra)
    mask = plate_mask(renderer, job)
    if init.strength == 0:
        return image
    pipe = pass_pipe(renderer, "inpaint", dtype)
    from renderer.models import make_scheduler

    pipe.scheduler = make_scheduler(job.scheduler, renderer._base_scheduler_config)
    out = pipe(prompt=job.prompt, negative_prompt=job.negative_prompt, image=image, mask_image=mask,
               strength=init.strength, num_inference_steps=job.num_inference_steps,
               guidance_scale=job.guidance_scale, width=job.width, height=job.height,
               generator=_generator(job), output_type="np", **extra)
    painted = _to_pil(job, out.images)
    # Feather inwards only: the blurred mask times the mask is 0 wherever the mask is 0, so the
    # plate's own pixels are pasted back there, exactly.
    soft = ImageChops.multiply(mask.filter(ImageFilter.GaussianBlur(PLATE_FEATHER)), mask)
    return pipe.image_processor.apply_overlay(soft, image, painted)


def _decode(pipe, latents):
    import torch

    with torch.no_grad():
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def _encode(pipe, image):
    import torch

    x = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


def _hires(renderer, job, result, extra: dict, dtype: str):
    import torch
    from PIL import Image

    h = job.passes.hires
    pipe = pass_pipe(renderer, "img2img", dtype)
    if h.upscaler == "latent":
        latents = result if isinstance(result, torch.Tensor) else _encode(pipe, result)
        f = pipe.vae_scale_factor
        upscaled = torch.nn.functional.interpolate(latents, size=(h.height // f, h.width // f), mode="bilinear",
                                                   align_corners=False)
        if h.strength == 0:
            return _decode(pipe, upscaled)
    else:
        image = _decode(pipe, result) if isinstance(result, torch.Tensor) else result
        upscaled = image.resize((h.width, h.height), Image.Resampling.LANCZOS)
        if h.strength == 0:
            return upscaled
    return _img2img_call(renderer, pipe, job, dict(image=upscaled, strength=h.strength, num_inference_steps=h.steps),
                         extra)


def _detail(renderer, job, image, extra: dict, dtype: str, stats: dict):
    import numpy as np
    from PIL import Image, ImageFilter

    from renderer.detect import box_with_padding, detect

    d = job.passes.detail
    mask = detect(d, image, renderer.root)
    if mask is None or d.strength == 0:
        _count(stats, "detail_skipped")
        return image
    left, top, right, bottom = box_with_padding(mask, d.padding)
    cw, ch = right - left, bottom - top
    # Re-render the crop with its longer side at the image's longer side (a multiple of 8).
    side = max(image.width, image.height)
    k = side / max(cw, ch)
    tw, th = max(8, int(round(cw * k / 8)) * 8), max(8, int(round(ch * k / 8)) * 8)
    crop = image.crop((left, top, right, bottom)).resize((tw, th), Image.Resampling.LANCZOS)
    pipe = pass_pipe(renderer, "img2img", dtype)
    redone = _img2img_call(renderer, pipe, job, dict(image=crop, strength=d.strength, num_inference_steps=d.steps),
                           extra, prompt=d.prompt)
    back = redone.resize((cw, ch), Image.Resampling.LANCZOS)
    # Paste mask: the body grown by half the padding, blurred, limited to the crop box.
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask, iterations=max(1, d.padding // 2)) if d.padding else mask
    paste = Image.fromarray((grown * 255).astype(np.uint8), "L")
    radius = max(1.0, d.padding * DETAIL_FEATHER_FRACTION)
    paste = paste.filter(ImageFilter.GaussianBlur(radius)).crop((left, top, right, bottom))
    out = image.copy()
    out.paste(back, (left, top), paste)
    _count(stats, "detail")
    return out


def _count(stats: dict, name: str) -> None:
    stats[name] = stats.get(name, 0) + 1
