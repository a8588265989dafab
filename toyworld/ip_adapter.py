"""Train `builtin:toy-ip-adapter`: an IP-Adapter (and its small image encoder) on the frozen toy base model.

1. data: toy images (`toyworld.world.generate_one`, hold-outs excluded, so luca, alberto and
   giulia are never seen), grouped by character (colour, shape, eye colour). Each training
   target is conditioned on the **mean embedding of other images of the same character**
   (other pose, background, expression), never on itself, so the adapter learns identity,
   not a copy of the picture. Three caption kinds (`captions:` in the recipe): the target's
   caption; the caption without colour and shape ("a character with green eyes on the beach"),
   which only the reference can complete; and a caption naming another colour and shape, where
   the reference must win. The rest is caption dropout (zeros or the encoded "", as the base).
   Some image embeddings are zeroed (the pipeline's negative), so guidance works.
2. model: a small `CLIPVisionModelWithProjection` trained alongside (`encoder:`; an auxiliary
   colour / shape / eye-colour classification of each reference embedding speeds that up; the
   heads are not shipped), and a plain IP-Adapter loaded into the frozen UNet by diffusers'
   own `load_ip_adapter`: the image projection and the `to_k_ip` / `to_v_ip` of every
   cross-attention (initialised from `to_k` / `to_v`) learn, everything else is frozen.
   Loss: `toyworld.unet.unet_loss` (epsilon MSE, offset noise, Min-SNR) through the UNet with
   `image_embeds` in its added conditioning, exactly as the pipeline passes them.
3. export: `<output>/ip-adapter_toy-sdxl.safetensors` (the downloaded key layout, fp16) and
   `<output>/image_encoder/` (config, fp16 safetensors, preprocessor config), swapped in
   atomically, and `<output>.training.json`.
4. eval: the held-out characters rendered from their own reference images (generator seed
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
    hue_rotated,
    pretrain_encoder,
    train_probe,
)
from toyworld.loop import deterministic, noise_scheduler, seeded, train_loop
from toyworld.unet import caption_embeddings, unet_loss
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
    caption_index: object  # N x 3: rows of embeds for (full, no identity, wrong identity)
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
    return IpData(latents, pixels, hue_pixels, attrs, groups, index.view(-1, 3), embeds, pooled, empty_e[0], empty_p[0])


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


def train_adapter(pipe, data: IpData, spec: ToyIpAdapterSpec, log: Callable[[str], None] = print,
                  steps: int | None = None, checkpoint: Callable[[int, object], None] | None = None,
                  root: Path = Path(".")):
    """Train encoder + adapter on the frozen pipeline; returns (encoder, losses, steps_done, seconds)."""
    import torch
    import torch.nn.functional as F

    from toyworld import world as tw
    from toyworld.ip_adapter_eval import encoder_accuracy

    unet = pipe.unet
    unet.eval().requires_grad_(False)
    if spec.encoder.source == "toy-clip":
        encoder = convert_toy_clip_vision(resolve(root, spec.encoder.clip))
        pre = {"source": "toy-clip", "frozen": True}
        if spec.encoder.objective == "attributes":
            pre.update(train_probe(encoder, data, spec, log))
            log(f"image encoder: toy CLIP + attribute projection {pre}; held-out reads " + json.dumps(
                encoder_accuracy(encoder, encoder_processor_for(spec.encoder), spec.eval.characters, 16,
                                 spec.eval.seed)))
    else:
        encoder = build_encoder(spec.encoder, spec.seed)
        pre = pretrain_encoder(encoder, data, spec, log)
    if pre.get("steps"):
        log(f"image encoder pretrained: {pre}; held-out reads "
            + json.dumps(encoder_accuracy(encoder.eval(), encoder_processor_for(spec.encoder), spec.eval.characters,
                                          16, spec.eval.seed)))
    encoder.train()
    modules = attach_adapter(pipe, encoder.config.projection_dim, spec.seed + 1)
    for m in modules:
        m.requires_grad_(True)
    d = encoder.config.projection_dim
    sizes = (len(tw.COLOURS), len(tw.SHAPES), len(tw.EYE_COLOURS))
    joint = spec.encoder.objective == "joint"
    with seeded(spec.seed + 2):  # joint: auxiliary heads (not shipped); attributes: the embedding's own slices
        heads = torch.nn.ModuleList([torch.nn.Linear(d, n) for n in sizes] if joint else [])
    bounds = np.cumsum((0,) + sizes)

    def attribute_logits(emb):
        if joint:
            return [h(emb) for h in heads]
        return [emb[:, bounds[n]:bounds[n + 1]] for n in range(3)]
    frozen = bool(pre)  # a pretrained attribute encoder stays fixed: its embeddings are computed once
    if frozen:
        encoder.eval().requires_grad_(False)
        with torch.no_grad():
            cached = torch.cat([encoder(data.pixels[i:i + 256]).image_embeds for i in range(0, len(data.pixels), 256)])
    params = [q for m in modules for q in m.parameters()] + list(heads.parameters())
    if not frozen:
        params = list(encoder.parameters()) + params
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.0)  # lr: train_loop sets it from lr_at
    scheduler = noise_scheduler(pipe.scheduler.config)
    g = torch.Generator().manual_seed(spec.seed + 3)
    eligible = torch.tensor([i for i, grp in enumerate(data.groups) if grp])
    k = spec.references_per_sample
    mix = spec.captions
    total = spec.steps if steps is None else steps

    def lr_at(step: int) -> float:
        return spec.learning_rate * min(1.0, (step + 1) / max(1, spec.warmup_steps))

    def step_loss(step: int):
        b = spec.batch_size
        idx = eligible[torch.randint(0, len(eligible), (b,), generator=g)]
        # references: k other images of the same character per target
        refs = torch.tensor([data.groups[int(i)][int(j)] for i in idx
                             for j in torch.randint(0, len(data.groups[int(i)]), (k,), generator=g)])
        if frozen:
            img = cached[refs].view(b, k, d).mean(dim=1)
            aux = 0.0
        else:
            emb = encoder(data.pixels[refs]).image_embeds  # (b*k) x d
            aux = sum(F.cross_entropy(z, data.attrs[refs, n], label_smoothing=spec.encoder.label_smoothing)
                      for n, z in enumerate(attribute_logits(emb))) / 3
            # attributes: the encoder learns only from its labels (the adapter sees a detached embedding)
            img = (emb if joint else emb.detach()).view(b, k, d).mean(dim=1)
        img = img * (torch.rand(b, generator=g) >= spec.image_dropout).to(img.dtype)[:, None]
        e, p = sample_captions(data, idx, mix, g)
        loss = unet_loss(with_image(unet, img), data.latents[idx], e, p, scheduler, spec, 64, g)
        return loss + spec.attribute_loss * aux

    run = train_loop(step_loss, opt, lr_at, total, clip_params=params, name="ip-adapter", log=log, log_every=25,
                     batch_size=spec.batch_size,
                     checkpoint=(lambda done: checkpoint(done, encoder)) if checkpoint else None,
                     checkpoint_every=spec.checkpoint_every, max_minutes=spec.max_minutes)
    encoder.eval()
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


def sample_captions(data, idx, mix, g):
    """Caption embeddings of the targets `idx`: full / no identity / wrong identity / dropped (half
    zeros, half the encoded ""), drawn with `mix`'s probabilities from generator `g`."""
    import torch

    b = len(idx)
    r = torch.rand(b, generator=g)
    kind = (r >= mix.full).long() + (r >= mix.full + mix.no_identity).long() \
        + (r >= mix.full + mix.no_identity + mix.wrong_identity).long()
    rows = data.caption_index[idx, kind.clamp(max=2)]
    e, p = data.embeds[rows].clone(), data.pooled[rows].clone()
    dropped = kind == 3
    zero = dropped & (torch.rand(b, generator=g) < 0.5)
    e[zero], p[zero] = 0, 0
    e[dropped & ~zero], p[dropped & ~zero] = data.empty_embeds, data.empty_pooled
    return e, p


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

    encoder, losses, done, t_train, pre = train_adapter(pipe, data, spec, log, checkpoint=checkpoint, root=root)
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


