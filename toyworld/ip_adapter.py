"""Train `builtin:toy-ip-adapter`: an IP-Adapter (and its small image encoder) on the frozen toy base model.

1. data: toy images (`toyworld.world.generate_one`, hold-outs excluded, so luca, alberto and
   giulia are never seen), grouped by character (colour, shape, eye colour), their latents, and
   per picture its caption and the caption without colour and shape ("a character with green
   eyes on the beach").
2. encoder (`toyworld.ip_encoder`): the toy CLIP's vision tower converted to a
   `CLIPVisionModelWithProjection` whose `image_embeds` are colour / shape / eye-colour logits
   (a linear probe, then the tower fine-tuned with shape learnt on recoloured bodies); frozen.
3. adapter: a plain IP-Adapter loaded into the frozen UNet by diffusers' own `load_ip_adapter`;
   the image projection and every `to_k_ip` / `to_v_ip` (initialised from `to_k` / `to_v`) learn
   by distillation (`train_adapter`): the UNet with the adapter, the caption without identity and
   the mean embedding of OTHER pictures of the same character must predict the noise the same
   UNet predicts with the adapter off and the full caption. `token_slices` and `attribute_mix`
   make colour and shape recombine for pairs never seen together.
4. export: `<output>/ip-adapter_toy-sdxl.safetensors` (the downloaded key layout, fp16) and
   `<output>/image_encoder/` (config, fp16 safetensors, preprocessor config), swapped in
   atomically, and `<output>.training.json`.
5. eval: the held-out characters rendered from their own reference images (generator seed
   `eval.seed`) with and without the adapter, read by `toyworld.checker`.

Runs through `toyworld.loop.train_loop` inside `loop.deterministic` (one thread, seeded).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from schemas.toy import ToyIpAdapterSpec
from toyworld.export import atomic_save_safetensors, load_frozen_base, resolve, write_record
from toyworld.ip_encoder import (
    build_encoder,
    convert_toy_clip_vision,
    encoder_processor_for,
    finetune_encoder,
    hue_rotated,
    pretrain_encoder,
    train_probe,
)
from toyworld.loop import Ema, deterministic, noise_scheduler, train_loop
from toyworld.unet import caption_embeddings
from toyworld.vae import encode_latents

ADAPTER_FILE = "ip-adapter_toy-sdxl.safetensors"


def no_identity_caption(caption: str, colour: str, shape: str) -> str:
    """The caption without its colour and shape: "a character with green eyes ... on the beach"."""
    return caption.replace(f"a {colour} {shape} character", "a character", 1)


# ----------------------------------------------------------------------------- data


@dataclass
class IpData:
    latents: object  # N x 4 x 16 x 16 (scaled)
    pixels: object  # N x 3 x S x S: the encoder's preprocessed input
    hue_pixels: object  # the same images with their hue rotated at random (shape labels only)
    attrs: object  # N x 3: colour, shape, eyes indices (the auxiliary heads' targets)
    groups: list  # per image: indices of the other images of the same character
    caption_index: object  # N x len(CAPTION_KINDS): rows of embeds
    embeds: object
    pooled: object
    empty_embeds: object
    empty_pooled: object


def toy_examples(count: int, seed: int, size: int):
    from toyworld import world as tw

    images, labels = [], []
    for i in range(count):
        img, label = tw.generate_one(seed, i, size)
        images.append(img)
        labels.append(label)
    return images, labels


def build_data(pipe, processor, images, labels, seed: int) -> IpData:
    import torch

    from toyworld import world as tw

    colours, shapes, eyes = list(tw.COLOURS), list(tw.SHAPES), list(tw.EYE_COLOURS)
    u8 = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
    latents = encode_latents(pipe.vae, u8) * pipe.vae.config.scaling_factor
    pixels = processor(images, return_tensors="pt").pixel_values
    hue_pixels = processor(hue_rotated(images, seed), return_tensors="pt").pixel_values
    attrs = torch.tensor([[colours.index(lb.colour), shapes.index(lb.shape), eyes.index(lb.eyes)] for lb in labels])
    by_char: dict[tuple, list[int]] = {}
    for i, lb in enumerate(labels):
        by_char.setdefault((lb.colour, lb.shape, lb.eyes), []).append(i)
    groups = [[j for j in by_char[(lb.colour, lb.shape, lb.eyes)] if j != i] for i, lb in enumerate(labels)]
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in colours for s in shapes if not tw.is_held_out(c, s, "green")]
    captions = []
    for lb in labels:
        others = [p for p in pairs if p != (lb.colour, lb.shape)]
        wc, ws = others[int(rng.integers(len(others)))]
        captions += [lb.caption, no_identity_caption(lb.caption, lb.colour, lb.shape),
                     tw.caption_for(wc, ws, lb.eyes, lb.expression, lb.background)]
    index, embeds, pooled = caption_embeddings(pipe, captions)
    with torch.no_grad():
        empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    return IpData(latents, pixels, hue_pixels, attrs, groups, index.view(-1, len(CAPTION_KINDS)), embeds, pooled,
                  empty_e[0], empty_p[0])


# Columns of `IpData.caption_index` (wrong_identity: the first recipe's, kept for benchmarks/toy_ip_text_anchor.py).
CAPTION_KINDS = ("full", "no_identity", "wrong_identity")


# ----------------------------------------------------------------------------- model


def attach_adapter(pipe, image_embed_dim: int, seed: int, state: dict | None = None):
    """Load a fresh (or given) plain adapter into `pipe.unet` with diffusers' loader; returns its trainable modules."""
    from renderer.ip_adapter import new_adapter_state

    state = state or new_adapter_state(pipe.unet, image_embed_dim, seed)
    sd = {"image_proj": {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")},
          "ip_adapter": {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    pipe.load_ip_adapter(sd, subfolder="", weight_name="", image_encoder_folder=None)
    return adapter_modules(pipe.unet)


def adapter_modules(unet) -> list:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    mods = [unet.encoder_hid_proj]
    mods += [p for p in unet.attn_processors.values() if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))]
    return mods


def with_image(unet, image_embeds):
    """A callable with the UNet's signature that adds `image_embeds` (B x D) the way the pipeline does."""

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs):
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs={**added_cond_kwargs, "image_embeds": [image_embeds[:, None, :]]})

    return forward


def set_ip_scale(unet, scale: float) -> None:
    """`pipe.set_ip_adapter_scale` for a bare UNet (the teacher is the same UNet at scale 0)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    for p in unet.attn_processors.values():
        if isinstance(p, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            p.scale = [scale] * len(p.scale)


def restrict_tokens(unet, slices) -> None:
    """Token t of the image projection reads only embedding dims `slices[t]`: the other weights are
    zeroed (rescaled to keep the init variance) and their gradients masked, so they stay zero and
    the file keeps the plain layout. A colour token and shape tokens recombine for pairs never seen
    together (measured: the same recipe without slices drew alberto's star 0/12)."""
    import torch

    proj = unet.encoder_hid_proj.image_projection_layers[0].image_embeds
    tokens = unet.encoder_hid_proj.image_projection_layers[0].num_image_text_embeds
    cross = proj.weight.shape[0] // tokens
    mask = torch.zeros_like(proj.weight)
    for t, (lo, hi) in enumerate(slices):
        mask[t * cross:(t + 1) * cross, lo:hi] = 1
    with torch.no_grad():
        proj.weight.mul_(mask * (proj.weight.shape[1] / mask.sum(dim=1, keepdim=True).clamp(min=1)) ** 0.5)
    proj.weight.register_hook(lambda grad: grad * mask)


def image_encoder_for(data: IpData, labels, spec: ToyIpAdapterSpec, log: Callable[[str], None], root: Path):
    """The frozen attribute encoder: the converted toy CLIP + probe (+ fine-tune), or a trained one."""
    from toyworld.ip_adapter_eval import encoder_accuracy

    if spec.encoder.source == "toy-clip":
        encoder = convert_toy_clip_vision(resolve(root, spec.encoder.clip))
        pre = {"source": "toy-clip", **train_probe(encoder, data, spec, log)}
        if spec.encoder.finetune_steps:
            pre.update(finetune_encoder(encoder, data, labels, spec, log))
    else:
        encoder = build_encoder(spec.encoder, spec.seed)
        pre = {"source": "trained", **pretrain_encoder(encoder, data, spec, log)}
    encoder.eval().requires_grad_(False)
    pre["held_out_reads"] = encoder_accuracy(encoder, encoder_processor_for(spec.encoder), spec.eval.characters, 16,
                                             spec.eval.seed)
    log(f"image encoder: {json.dumps(pre)}")
    return encoder, pre


def train_adapter(pipe, data: IpData, labels, spec: ToyIpAdapterSpec, log: Callable[[str], None] = print,
                  steps: int | None = None, checkpoint: Callable[[int, object], None] | None = None,
                  root: Path = Path(".")):
    """Encoder, then the adapter distilled from the text path; returns (encoder, losses, steps_done, seconds, pre).

    Each sample: a noisy latent of a toy picture; teacher = the frozen UNet, adapter at scale 0, with
    the picture's full caption; student = the same UNet with the adapter and (mostly) the caption
    without colour and shape, given the mean embedding of other pictures of that character. MSE
    between the two noise predictions. Measured against the denoising loss on pictures (the first
    recipe): identity 8-25 % -> see docs/TOYWORLD.md; the teacher's prediction carries the outline
    at high noise, where the pictures' own noise target carries almost none of it.
    """
    import torch

    from toyworld.unet import time_ids

    unet = pipe.unet
    unet.eval().requires_grad_(False)
    encoder, pre = image_encoder_for(data, labels, spec, log, root)
    with torch.no_grad():
        cached = torch.cat([encoder(data.pixels[i:i + 256]).image_embeds for i in range(0, len(data.pixels), 256)])
    d = cached.shape[1]
    modules = attach_adapter(pipe, d, spec.seed + 1)
    params = [q for m in modules for q in m.parameters()]
    for q in params:
        q.requires_grad_(True)
    if spec.token_slices:
        restrict_tokens(unet, spec.token_slices)
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)  # lr: train_loop sets it from lr_at
    scheduler = noise_scheduler(pipe.scheduler.config)
    g = torch.Generator().manual_seed(spec.seed + 3)
    eligible = torch.tensor([i for i, grp in enumerate(data.groups) if grp])
    by_attr = [{int(v): torch.nonzero(data.attrs[:, a] == v).view(-1) for v in data.attrs[:, a].unique()}
                for a in range(3)]
    from toyworld import world as tw

    bounds = np.cumsum((0, len(tw.COLOURS), len(tw.SHAPES), len(tw.EYE_COLOURS)))
    mix = spec.distill
    kinds = torch.tensor([mix.no_identity, mix.full, mix.empty_prompt, mix.negative])
    k, b = spec.references_per_sample, spec.batch_size
    total = spec.steps if steps is None else steps

    def lr_at(step: int) -> float:
        return spec.learning_rate * min(1.0, (step + 1) / max(1, spec.warmup_steps))

    def unet_eps(noisy, t, e, p, img):
        return unet(noisy, t, encoder_hidden_states=e, added_cond_kwargs={
            "text_embeds": p, "time_ids": time_ids(spec.data.size, len(t)), "image_embeds": [img[:, None, :]]}).sample

    def step_loss(step: int):
        idx = eligible[torch.randint(0, len(eligible), (b,), generator=g)]
        refs = torch.tensor([data.groups[int(i)][int(j)] for i in idx
                             for j in torch.randint(0, len(data.groups[int(i)]), (k,), generator=g)])
        img = cached[refs].view(b, k, d).mean(dim=1)
        for n in torch.nonzero(torch.rand(b, generator=g) < mix.attribute_mix).view(-1).tolist():
            img[n] = torch.cat([cached[pool[torch.randint(0, len(pool), (k,), generator=g)], bounds[a]:bounds[a + 1]].mean(0)
                                for a in range(3) for pool in [by_attr[a][int(data.attrs[idx[n], a])]]])
        kind = torch.multinomial(kinds, b, replacement=True, generator=g)
        full = data.caption_index[idx, CAPTION_KINDS.index("full")]
        col = CAPTION_KINDS.index
        rows = data.caption_index[idx, torch.where(kind == 1, col("full"), col("no_identity"))]
        t_e, t_p = data.embeds[full].clone(), data.pooled[full].clone()
        s_e, s_p = data.embeds[rows].clone(), data.pooled[rows].clone()
        s_e[kind >= 2], s_p[kind >= 2] = data.empty_embeds, data.empty_pooled
        t_e[kind == 3], t_p[kind == 3] = data.empty_embeds, data.empty_pooled
        img[kind == 3] = 0
        noise = torch.randn(data.latents[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
        noisy = scheduler.add_noise(data.latents[idx], noise, t)
        with torch.no_grad():
            set_ip_scale(unet, 0.0)
            target = unet_eps(noisy, t, t_e, t_p, torch.zeros_like(img))
            set_ip_scale(unet, 1.0)
        return torch.nn.functional.mse_loss(unet_eps(noisy, t, s_e, s_p, img), target)

    ema = Ema([q.detach().clone() for q in params], params, spec.ema_decay) if spec.ema_decay else None
    run = train_loop(step_loss, opt, lr_at, total, clip_params=params, name="ip-adapter", log=log, log_every=25,
                     batch_size=b, ema=ema, checkpoint=(lambda done: checkpoint(done, encoder)) if checkpoint else None,
                     checkpoint_every=spec.checkpoint_every, max_minutes=spec.max_minutes)
    with torch.no_grad():
        for q, avg in zip(params, ema.shadow if ema else params):
            q.requires_grad_(False).copy_(avg)
    return encoder, run.losses, run.done, run.seconds, pre


# ----------------------------------------------------------------------------- export


def export(pipe, encoder, processor, out: Path) -> None:
    """Adapter file + image_encoder/ folder (fp16), swapped in atomically."""
    import copy
    import shutil

    import torch

    from core.files import new_temp_folder, swap_in_folder
    from renderer.ip_adapter import ENCODER_DIR, adapter_state_from_unet

    out = Path(out)
    tmp = new_temp_folder(out)
    try:
        state = {k: v.to(torch.float16) for k, v in adapter_state_from_unet(pipe.unet).items()}
        atomic_save_safetensors(state, tmp / ADAPTER_FILE, {"format": "pt"})
        copy.deepcopy(encoder).to(torch.float16).save_pretrained(tmp / ENCODER_DIR, safe_serialization=True)
        processor.save_pretrained(tmp / ENCODER_DIR)
        swap_in_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_ip_adapter(spec: ToyIpAdapterSpec, root: Path, log: Callable[[str], None] = print,
                   do_eval: bool = True) -> dict:
    with deterministic(spec.seed, spec.threads):
        return _run(spec, root, log, do_eval)


def _run(spec: ToyIpAdapterSpec, root: Path, log: Callable[[str], None], do_eval: bool) -> dict:
    import torch

    from renderer.ip_adapter import adapter_state_from_unet

    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    pipe = load_frozen_base(root, spec.base)
    pipe.set_progress_bar_config(disable=True)
    processor = encoder_processor_for(spec.encoder)
    log(f"generating {spec.data.count} toy images (seed {spec.data.seed}, hold-outs excluded)")
    images, labels = toy_examples(spec.data.count, spec.data.seed, spec.data.size)
    data = build_data(pipe, processor, images, labels, spec.seed)
    del images
    t_data = time.time() - t_start
    log(f"data: {len(data.latents)} latents, {len(data.embeds)} caption embeddings in {t_data:.0f}s")
    from toyworld.ip_adapter_eval import evaluate_adapter

    curve = []
    quick = spec.eval.model_copy(update={"per_character": min(6, spec.eval.per_character)})

    def checkpoint(step: int, encoder) -> None:
        atomic_save_safetensors({**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
                                 **adapter_state_from_unet(pipe.unet)}, work / "ip-adapter.safetensors",
                                {"step": str(step)})
        encoder.eval()
        res = evaluate_adapter(pipe, encoder, processor, quick, spec.data.size, with_baseline=False)
        encoder.train()
        curve.append({"step": step, **{n: r["adapter"] for n, r in res.items()}})
        log(f"checkpoint {step}: held-out identity hit rate " + json.dumps(curve[-1]))

    encoder, losses, done, t_train, pre = train_adapter(pipe, data, labels, spec, log, checkpoint=checkpoint, root=root)
    out = resolve(root, spec.output)
    export(pipe, encoder, processor, out)
    record = {
        "spec": spec.model_dump(mode="json"),
        "steps_done": done,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.time() - t_start, 1)},
        "images_per_second": round(done * spec.batch_size / max(t_train, 1e-9), 1),
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "held_out_identity_curve": curve,
        "encoder_pretraining": pre,
        "threads": spec.threads,
        "torch": torch.__version__,
    }
    if do_eval:
        from renderer.ip_adapter import load_image_encoder
        from toyworld.ip_adapter_eval import evaluate_adapter

        t0 = time.time()
        pipe.unload_ip_adapter()
        pipe.load_ip_adapter(str(out), subfolder="", weight_name=ADAPTER_FILE, image_encoder_folder=None,
                             local_files_only=True)
        enc, proc = load_image_encoder(out / "image_encoder")
        record["eval"] = evaluate_adapter(pipe, enc, proc, spec.eval, spec.data.size)
        record["eval_seconds"] = round(time.time() - t0, 1)
        log("eval: " + json.dumps(record["eval"]))
    write_record(out, record)
    return record


