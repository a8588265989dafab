"""Train the toy-world base model (`builtin:toy-sdxl`) from scratch on a CPU: the whole run.

Three stages, one spec (`specs/toy/toy-base.yaml`, `schemas.toy.ToyBaseSpec`):

1. VAE (`toyworld.vae`): a small 3-level `AutoencoderKL`, 64x64 images -> 16x16x4 latents;
2. UNet (`toyworld.unet`): the tiny SDXL UNet from random init on the cached latents, EMA weights;
3. optionally the VAE's decoder sharpened on the frozen encoder's latents (`toyworld.vae`),
   beside the UNet on a second core (`castbook toymodel train-decoder`).

All three run through `toyworld.loop.train_loop`. The result is a normal diffusers folder
(`StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)`), all weights as
fp16 safetensors, then the fixed prompt grid is rendered and read back by `toyworld.checker`.

Determinism: inside `loop.deterministic` (fixed thread count, deterministic algorithms, seeded
generators); the same spec on the same machine gives the same files (when the run stops at
`steps`, not at the `max_minutes` safety cap).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from schemas.toy import EvalSpec, ToyBaseSpec
from toyworld.data import to_unit, toy_images
from toyworld.export import atomic_save_safetensors, load_pipeline, resolve, save_pipeline, write_record
from toyworld.loop import deterministic
from toyworld.unet import (
    TEXT_ENCODERS,
    UnetData,
    build_unet,
    caption_embeddings,
    frozen_text_parts,
    make_pipeline,
    train_unet,
)
from toyworld.vae import encode_latents, finetune_decoder, train_vae

# ----------------------------------------------------------------------------- the whole run


def run_base(spec: ToyBaseSpec, root: Path, log: Callable[[str], None] = print,
             skip_vae_if_cached: bool = True, do_eval: bool = True) -> dict:
    """VAE, latents, UNet, export to `root/spec.output`, eval. Returns the training record."""
    with deterministic(spec.seed, spec.threads):
        return _run_base(spec, root, log, skip_vae_if_cached, do_eval)


def _run_base(spec: ToyBaseSpec, root: Path, log: Callable[[str], None], skip_vae_if_cached: bool,
              do_eval: bool) -> dict:
    import torch
    from diffusers import AutoencoderKL

    # 1. data
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"generating {spec.data.count} toy images (seed {spec.data.seed}, {spec.data.size}px)")
    images, captions = toy_images(spec.data.count, spec.data.seed, spec.data.size, spec.data.holdout)
    t_data = time.time() - t_start

    # 2. the VAE (reused from work_dir when its spec is unchanged)
    vae_dir = work / "vae"
    t0 = time.time()
    if skip_vae_if_cached and (vae_dir / "diffusion_pytorch_model.safetensors").exists() \
            and _same_key(work / "vae.spec.json", _vae_key(spec)):
        log(f"reusing the trained VAE in {vae_dir} (same spec)")
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, use_safetensors=True)
    else:
        vae, _ = train_vae(images, spec.vae, spec.seed, log)
        vae.save_pretrained(vae_dir, safe_serialization=True)
        (work / "vae.spec.json").write_text(json.dumps(_vae_key(spec)))
        # Reload from files so the UNet trains on exactly the latents the saved VAE gives.
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, use_safetensors=True)
    vae.eval().requires_grad_(False)
    t_vae = time.time() - t0
    vae_mse = _reconstruction_mse(vae, images[:256])
    log(f"vae: reconstruction MSE {vae_mse:.5f} on 256 training images; scaling_factor {vae.config.scaling_factor:.4f}")

    # 3. latents and caption embeddings
    t0 = time.time()
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    text = frozen_text_parts()
    pipe = make_pipeline(build_unet(latents.shape[-1], latents.shape[1]), vae, text)
    texts = sorted(set(captions))
    if spec.unet.train_text_encoders:  # nothing to cache: every batch is encoded as it comes
        position = {c: i for i, c in enumerate(texts)}
        index = torch.tensor([position[c] for c in captions], dtype=torch.long)
        data = UnetData(latents, index, None, None, None, None, texts=texts)
        what = "caption index (the text encoders train: no embedding cache)"
    else:
        index, embeds, pooled = caption_embeddings(pipe, captions)
        empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        data = UnetData(latents, index, embeds, pooled, empty_e[0], empty_p[0], texts=texts)
        what = f"{len(embeds)} caption embeddings"
    t_cache = time.time() - t0
    log(f"cached {len(latents)} latents {tuple(latents.shape[1:])} and {what} in {t_cache:.0f}s")

    # 4. the UNet, with EMA checkpoints in work_dir
    def checkpoint(step: int, ema) -> None:
        if spec.unet.train_text_encoders:  # first, so an export never pairs a UNet with older encoders
            atomic_save_safetensors(text_encoder_state(text), work / "text-encoders-ema.safetensors", {"step": str(step)})
        atomic_save_safetensors(dict(ema.state_dict()), work / "unet-ema.safetensors", {"step": str(step)})
        log(f"checkpoint: EMA UNet{' and text encoders' if spec.unet.train_text_encoders else ''} at step {step} -> {work}")

    ema, losses, done, t_unet = train_unet(data, spec.unet, spec.seed, spec.data.size, text["scheduler"].config,
                                           log, checkpoint=checkpoint, checkpoint_every=spec.checkpoint_every,
                                           text_parts=text)
    checkpoint(done, ema)

    # 5. the decoder stage, export
    t0 = time.time()
    if spec.vae.decoder_steps:
        vae = _decoder_stage(spec, log, images=images, vae=vae)
    t_decoder = time.time() - t0
    out = resolve(root, spec.output)
    save_pipeline(make_pipeline(ema, vae, text), out)
    record = {
        "spec": spec.model_dump(mode="json"),
        "unet_steps_done": done,
        "seconds": {"data": round(t_data, 1), "vae": round(t_vae, 1), "cache": round(t_cache, 1),
                    "unet": round(t_unet, 1),
                    "decoder": round(t_decoder, 1), "total": round(time.time() - t_start, 1)},
        "unet_images_per_second": round(done * spec.unet.batch_size / max(t_unet, 1e-9), 1),
        "vae_reconstruction_mse": vae_mse,
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "threads": spec.threads,
        "torch": torch.__version__,
    }
    # 6. eval
    if do_eval:
        record["eval"] = _eval_record(spec, out, work, log)
    write_record(out, record)
    return record


def run_decoder_stage(spec: ToyBaseSpec, log: Callable[[str], None] = print, images=None, vae=None):
    """Stage 3 on its own (cached in work_dir/vae-decoder by spec): needs the stage-1 VAE in work_dir.

    Independent of the UNet, so `castbook toymodel train-decoder` can run it on a second core
    while the UNet trains; `run_base` then finds the result and reuses it.
    """
    with deterministic(spec.seed, spec.threads):
        return _decoder_stage(spec, log, images, vae)


def _decoder_stage(spec: ToyBaseSpec, log: Callable[[str], None], images=None, vae=None):
    from diffusers import AutoencoderKL

    work = Path(spec.work_dir)
    out = work / "vae-decoder"
    key = _vae_key(spec) | {"decoder_steps": spec.vae.decoder_steps, "decoder_images": spec.vae.decoder_images,
                            "decoder_learning_rate": spec.vae.decoder_learning_rate}
    if (out / "diffusion_pytorch_model.safetensors").exists() and _same_key(work / "vae-decoder.spec.json", key):
        log(f"reusing the fine-tuned decoder in {out} (same spec)")
        return AutoencoderKL.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()
    n = min(spec.vae.decoder_images or spec.data.count, spec.data.count)
    if images is None:  # the first n images: toy_images(n) is a prefix of toy_images(count)
        images, _ = toy_images(n, spec.data.seed, spec.data.size, spec.data.holdout)
    images = images[:n]
    if vae is None:
        if not _same_key(work / "vae.spec.json", _vae_key(spec)):
            raise FileNotFoundError(f"no stage-1 VAE for this spec in {work / 'vae'}; run train-base first")
        vae = AutoencoderKL.from_pretrained(work / "vae", local_files_only=True, use_safetensors=True)
    vae, _ = finetune_decoder(vae, images, spec.vae, spec.seed, log)
    vae.save_pretrained(out, safe_serialization=True)
    (work / "vae-decoder.spec.json").write_text(json.dumps(key))
    return AutoencoderKL.from_pretrained(out, local_files_only=True, use_safetensors=True).eval()


def export_from_checkpoint(spec: ToyBaseSpec, root: Path, log: Callable[[str], None] = print,
                           do_eval: bool = True, note: str = "") -> dict:
    """Assemble the latest EMA UNet checkpoint in work_dir with the VAE (fine-tuned decoder when its
    stage finished) into `spec.output`, evaluate, and write the record. For a run that was stopped."""
    with deterministic(spec.seed, spec.threads):
        return _export_from_checkpoint(spec, root, log, do_eval, note)


def _export_from_checkpoint(spec: ToyBaseSpec, root: Path, log: Callable[[str], None], do_eval: bool,
                            note: str) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from safetensors.torch import load_file

    work = Path(spec.work_dir)
    ckpt = work / "unet-ema.safetensors"
    if not ckpt.exists():
        raise FileNotFoundError(f"no UNet checkpoint {ckpt}; run `castbook toymodel train-base` first")
    with safe_open(str(ckpt), "pt") as f:
        step = int(f.metadata().get("step", "0"))
    use_decoder = bool(spec.vae.decoder_steps) and (work / "vae-decoder.spec.json").exists() \
        and (work / "vae-decoder").exists()
    vae = AutoencoderKL.from_pretrained(work / ("vae-decoder" if use_decoder else "vae"), local_files_only=True,
                                        use_safetensors=True).eval()
    images, _ = toy_images(256, spec.data.seed, spec.data.size, spec.data.holdout)
    vae_mse = _reconstruction_mse(vae, images)
    unet = build_unet(spec.data.size // 4, vae.config.latent_channels)
    unet.load_state_dict(load_file(ckpt))
    unet.eval()
    text = frozen_text_parts()
    if spec.unet.train_text_encoders:
        te_ckpt = work / "text-encoders-ema.safetensors"
        with safe_open(str(te_ckpt), "pt") as f:
            te_step = int(f.metadata().get("step", "0"))
        if te_step != step:
            raise ValueError(f"{te_ckpt} is from step {te_step} but {ckpt} from step {step}; they must match")
        load_text_encoder_state(text, load_file(te_ckpt))
    out = resolve(root, spec.output)
    save_pipeline(make_pipeline(unet, vae, text), out)
    log(f"exported EMA UNet step {step} + {'fine-tuned decoder' if use_decoder else 'stage-1 VAE'} -> {out}")
    record = {"spec": spec.model_dump(mode="json"), "unet_steps_done": step, "decoder_finetuned": use_decoder,
              "vae_reconstruction_mse": vae_mse, "threads": spec.threads, "torch": torch.__version__, "note": note}
    if do_eval:
        record["eval"] = _eval_record(spec, out, work, log)
    write_record(out, record)
    return record


# ----------------------------------------------------------------------------- helpers of the run


def text_encoder_state(text_parts: dict) -> dict:
    """Both text encoders' tensors in one flat dict (`text_encoder.<name>`, `text_encoder_2.<name>`)."""
    return {f"{k}.{name}": t for k in TEXT_ENCODERS for name, t in text_parts[k].state_dict().items()}


def load_text_encoder_state(text_parts: dict, tensors: dict) -> None:
    for k in TEXT_ENCODERS:
        part = {name[len(k) + 1:]: t for name, t in tensors.items() if name.startswith(k + ".")}
        text_parts[k].load_state_dict(part)


def _vae_key(spec: ToyBaseSpec) -> dict:
    vae = spec.vae.model_dump(mode="json", exclude={"decoder_steps", "decoder_learning_rate", "decoder_images"})
    return {"vae": vae, "data": spec.data.model_dump(mode="json"),
            "seed": spec.seed, "threads": spec.threads}


def _same_key(path: Path, key: dict) -> bool:
    return path.exists() and json.loads(path.read_text()) == key


def _reconstruction_mse(vae, images_u8) -> float:
    import torch

    with torch.no_grad():
        x = to_unit(images_u8)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        return float(((rec.clamp(-1, 1) - x) ** 2).mean())


# ----------------------------------------------------------------------------- eval


def eval_prompts() -> list[tuple[str, dict]]:
    """The fixed prompt grid: every colour x shape x background outside the hold-outs
    (135 prompts); eye colour and expression cycle so every value appears."""
    from toyworld import world as tw

    out = []
    eyes, exprs = list(tw.EYE_COLOURS), list(tw.EXPRESSIONS)
    for colour in tw.COLOURS:
        for shape in tw.SHAPES:
            if tw.is_held_out(colour, shape, "green", tw.HOLDOUT):
                continue
            for background in tw.BACKGROUNDS:
                i = len(out)
                e, x = eyes[i % len(eyes)], exprs[(i // len(eyes)) % len(exprs)]
                prompt = tw.caption_for(colour, shape, e, x, background)
                out.append((prompt, {"colour": colour, "shape": shape, "background": background,
                                     "eyes": e, "expression": x}))
    return out


def render_grid(pipe, prompts: list[str], spec: EvalSpec, size: int = 64, negative_prompt: str = ""):
    import torch

    images = []
    for i in range(0, len(prompts), spec.batch_size):
        chunk = prompts[i : i + spec.batch_size]
        gens = [torch.Generator("cpu").manual_seed(spec.seed + i + j) for j in range(len(chunk))]
        with torch.no_grad():
            out = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk), num_inference_steps=spec.steps,
                       guidance_scale=spec.guidance_scale, width=size, height=size, generator=gens)
        images.extend(out.images)
    return images


def evaluate_pipeline(pipe, spec: EvalSpec, size: int = 64, limit: int | None = None, save_dir: Path | None = None):
    """Render the prompt grid and read it back with `toyworld.checker`; returns the result dict."""
    from toyworld import checker as ev

    grid = eval_prompts()[:limit] if limit else eval_prompts()
    images = render_grid(pipe, [p for p, _ in grid], spec, size)
    if save_dir:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for k, (img, (prompt, _)) in enumerate(zip(images, grid)):
            img.save(save_dir / f"grid-{k:03d}.png")
            (save_dir / f"grid-{k:03d}.txt").write_text(prompt + "\n")
    return ev.evaluate([(img, {"name": f"grid-{k:03d}", **exp}) for k, (img, (_, exp)) in enumerate(zip(images, grid))])


def _eval_record(spec: ToyBaseSpec, out: Path, work: Path, log: Callable[[str], None]) -> dict:
    from toyworld import checker as ev

    t0 = time.time()
    result = evaluate_pipeline(load_pipeline(out), spec.eval, spec.data.size, limit=spec.eval.limit,
                               save_dir=work / "grid")
    row = {"accuracy": ev.accuracy_row(result), "count": result["count"], "steps": spec.eval.steps,
           "guidance_scale": spec.eval.guidance_scale, "seconds": round(time.time() - t0, 1)}
    log("eval: " + json.dumps(row["accuracy"]))
    return row
