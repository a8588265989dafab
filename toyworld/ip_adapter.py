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

from schemas.toy import IpEncoderSpec, IpEvalSpec, ToyIpAdapterSpec
from toyworld.export import atomic_save_safetensors, load_pipeline, resolve, write_record
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


def hue_rotated(images, seed: int):
    """Colour jitter (a random hue rotation per image, PIL's HSV): the shape stays, the colours move, so
    an encoder trained on shapes of these cannot use "this colour never comes in this shape"."""
    from PIL import Image

    rng = np.random.default_rng([seed, 17])
    out = []
    for im in images:
        h, s, v = im.convert("HSV").split()
        shift = int(rng.integers(20, 236))
        h = Image.fromarray(((np.asarray(h).astype(np.int32) + shift) % 256).astype(np.uint8), "L")
        out.append(Image.merge("HSV", (h, s, v)).convert("RGB"))
    return out


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


def build_encoder(spec: IpEncoderSpec, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                           num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                           image_size=spec.image_size, patch_size=spec.patch_size,
                           projection_dim=spec.projection_dim)
    with seeded(seed):
        return CLIPVisionModelWithProjection(cfg)


def convert_toy_clip_vision(folder: Path):
    """The toy CLIP's vision tower (open_clip ViT, toyworld/clip.py) as a `CLIPVisionModelWithProjection`
    with identical outputs: same patch embedding, class token, positions, pre/post layer norms, blocks
    (the packed in_proj split into q/k/v), GELU MLPs, and `proj` as the visual projection."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from toyworld.clip import load_toy_clip

    model, _, _ = load_toy_clip(Path(folder))
    v = model.visual
    width = v.conv1.out_channels
    blocks = v.transformer.resblocks
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
                           num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
                           image_size=v.image_size[0] if isinstance(v.image_size, tuple) else v.image_size,
                           patch_size=v.conv1.kernel_size[0], projection_dim=v.proj.shape[1], hidden_act="gelu",
                           layer_norm_eps=blocks[0].ln_1.eps)
    hf = CLIPVisionModelWithProjection(cfg)
    sd = {"vision_model.embeddings.patch_embedding.weight": v.conv1.weight,
          "vision_model.embeddings.class_embedding": v.class_embedding,
          "vision_model.embeddings.position_embedding.weight": v.positional_embedding,
          "vision_model.pre_layrnorm.weight": v.ln_pre.weight, "vision_model.pre_layrnorm.bias": v.ln_pre.bias,
          "vision_model.post_layernorm.weight": v.ln_post.weight, "vision_model.post_layernorm.bias": v.ln_post.bias,
          "visual_projection.weight": v.proj.T}
    for i, blk in enumerate(blocks):
        pre = f"vision_model.encoder.layers.{i}."
        q, k_, val = blk.attn.in_proj_weight.chunk(3)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3)
        sd.update({pre + "self_attn.q_proj.weight": q, pre + "self_attn.q_proj.bias": qb,
                   pre + "self_attn.k_proj.weight": k_, pre + "self_attn.k_proj.bias": kb,
                   pre + "self_attn.v_proj.weight": val, pre + "self_attn.v_proj.bias": vb,
                   pre + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                   pre + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                   pre + "layer_norm1.weight": blk.ln_1.weight, pre + "layer_norm1.bias": blk.ln_1.bias,
                   pre + "layer_norm2.weight": blk.ln_2.weight, pre + "layer_norm2.bias": blk.ln_2.bias,
                   pre + "mlp.fc1.weight": blk.mlp.c_fc.weight, pre + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                   pre + "mlp.fc2.weight": blk.mlp.c_proj.weight, pre + "mlp.fc2.bias": blk.mlp.c_proj.bias})
    missing, unexpected = hf.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected:
        raise ValueError(f"toy CLIP conversion: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        ref, got = model.encode_image(x), hf(pixel_values=x).image_embeds
    if not torch.allclose(ref, got, atol=1e-4):
        raise ValueError(f"toy CLIP conversion differs from open_clip by {float((ref - got).abs().max()):.2e}")
    return hf.eval()


def encoder_processor_for(spec: IpEncoderSpec):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size=spec.image_size, crop_size=spec.image_size)


def pretrain_encoder(encoder, data: IpData, spec: ToyIpAdapterSpec, log: Callable[[str], None] = print) -> dict:
    """`attributes` encoders: colour / shape / eye-colour cross-entropy on single images, no UNet."""
    import torch
    import torch.nn.functional as F

    from toyworld import world as tw

    enc = spec.encoder
    if enc.objective != "attributes" or not enc.pretrain_steps:
        return {}
    bounds = np.cumsum((0, len(tw.COLOURS), len(tw.SHAPES), len(tw.EYE_COLOURS)))
    opt = torch.optim.AdamW(encoder.parameters(), lr=1.0, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed + 5)
    encoder.train()

    def step_loss(step: int):
        return encoder_loss(encoder, data, enc.pretrain_batch_size, enc.label_smoothing, bounds, g)

    def lr_at(step: int) -> float:
        return enc.learning_rate * min(1.0, (step + 1) / 50)

    run = train_loop(step_loss, opt, lr_at, enc.pretrain_steps, clip_params=list(encoder.parameters()),
                     name="image-encoder", log=log, log_every=100, batch_size=enc.pretrain_batch_size)
    return {"steps": run.done, "seconds": round(run.seconds, 1),
            "final_loss_avg100": sum(run.losses[-100:]) / max(1, len(run.losses[-100:]))}


def train_probe(encoder, data: IpData, spec: ToyIpAdapterSpec, log: Callable[[str], None] = print) -> dict:
    """Replace the frozen toy CLIP's `visual_projection` with colour / shape / eye-colour logits
    (a linear probe on its pooled features, cross-entropy, `pretrain_steps` x `pretrain_batch_size`)."""
    import torch
    import torch.nn.functional as F

    from toyworld import world as tw

    enc = spec.encoder
    sizes = (len(tw.COLOURS), len(tw.SHAPES), len(tw.EYE_COLOURS))
    bounds = np.cumsum((0,) + sizes)
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        feats = torch.cat([encoder.vision_model(pixel_values=data.pixels[i:i + 256]).pooler_output
                           for i in range(0, len(data.pixels), 256)])
    with seeded(spec.seed + 4):
        probe = torch.nn.Linear(feats.shape[1], int(bounds[-1]), bias=False)
    opt = torch.optim.AdamW(probe.parameters(), lr=1.0, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed + 5)

    def step_loss(step: int):
        idx = torch.randint(0, len(feats), (enc.pretrain_batch_size,), generator=g)
        z = probe(feats[idx])
        return sum(F.cross_entropy(z[:, bounds[k]:bounds[k + 1]], data.attrs[idx, k], label_smoothing=enc.label_smoothing)
                   for k in range(3)) / 3

    run = train_loop(step_loss, opt, lambda step: enc.learning_rate, enc.pretrain_steps,
                     clip_params=list(probe.parameters()), name="attribute-projection", log=log, log_every=500)
    encoder.visual_projection = probe.requires_grad_(False)
    encoder.config.projection_dim = int(bounds[-1])
    return {"probe_steps": run.done, "probe_loss_avg100": sum(run.losses[-100:]) / max(1, len(run.losses[-100:]))}


def encoder_loss(encoder, data: IpData, n: int, smoothing: float, bounds, g):
    """Half plain images (colour, shape and eye-colour labels), half hue-rotated ones (shape only)."""
    import torch
    import torch.nn.functional as F

    idx = torch.randint(0, len(data.pixels), (n,), generator=g)
    half = n // 2
    emb = encoder(torch.cat([data.pixels[idx[:half]], data.hue_pixels[idx[half:]]])).image_embeds

    def ce(z, target):
        return F.cross_entropy(z, target, label_smoothing=smoothing)

    plain = sum(ce(emb[:half, bounds[k]:bounds[k + 1]], data.attrs[idx[:half], k]) for k in range(3)) / 3
    return plain + ce(emb[half:, bounds[1]:bounds[2]], data.attrs[idx[half:], 1])


def encoder_accuracy(encoder, processor, names, count: int, seed: int) -> dict:
    """How often an `attributes` encoder reads colour and shape of held-out characters' images right."""
    import torch

    from renderer.ip_adapter import encode_images
    from toyworld import world as tw

    colours, shapes = list(tw.COLOURS), list(tw.SHAPES)
    out = {}
    with torch.no_grad():
        for name in names:
            c, s, _ = tw.CHARACTERS[name]
            z = encode_images(encoder, processor, reference_images(name, count, seed), plus=False)
            out[name] = {"colour": float(np.mean([colours[int(r[:8].argmax())] == c for r in z])),
                         "shape": float(np.mean([shapes[int(r[8:14].argmax())] == s for r in z]))}
    return out


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
        # captions: full / no identity / wrong identity / dropped (half zeros, half "")
        r = torch.rand(b, generator=g)
        kind = (r >= mix.full).long() + (r >= mix.full + mix.no_identity).long() \
            + (r >= mix.full + mix.no_identity + mix.wrong_identity).long()
        rows = data.caption_index[idx, kind.clamp(max=2)]
        e, p = data.embeds[rows].clone(), data.pooled[rows].clone()
        dropped = kind == 3
        zero = dropped & (torch.rand(b, generator=g) < 0.5)
        e[zero], p[zero] = 0, 0
        e[dropped & ~zero], p[dropped & ~zero] = data.empty_embeds, data.empty_pooled
        loss = unet_loss(with_image(unet, img), data.latents[idx], e, p, scheduler, spec, 64, g)
        return loss + spec.attribute_loss * aux

    run = train_loop(step_loss, opt, lr_at, total, clip_params=params, name="ip-adapter", log=log, log_every=25,
                     batch_size=spec.batch_size,
                     checkpoint=(lambda done: checkpoint(done, encoder)) if checkpoint else None,
                     checkpoint_every=spec.checkpoint_every, max_minutes=spec.max_minutes)
    encoder.eval()
    return encoder, run.losses, run.done, run.seconds, pre


# ----------------------------------------------------------------------------- export and eval


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


def reference_images(name: str, count: int, seed: int, size: int = 64):
    from toyworld import world as tw

    only = tw.character_filter(name)
    return [tw.generate_one(seed, i, size, only=only, prefix=name)[0] for i in range(count)]


def character_prompt(name: str, background: str, kind: str = "full") -> str:
    """What a spec renders for the example character (trigger word, description, scene); `no_identity`
    leaves colour and shape to the references."""
    from toyworld import world as tw

    c, s, e = tw.CHARACTERS[name]
    what = f"a {c} {s} character" if kind == "full" else "a character"
    return f"{name}, {what} with {e} eyes {tw.BACKGROUND_PHRASES[background]}"


def evaluate_adapter(pipe, encoder, processor, spec: IpEvalSpec, size: int = 64, with_baseline: bool = True) -> dict:
    """Held-out characters from their references, with the adapter (scale `spec.scale`) and without it."""
    import torch

    from renderer.ip_adapter import encode_images, pipeline_embeds
    from toyworld import checker as ev
    from toyworld import world as tw

    bgs = list(tw.BACKGROUNDS)
    out: dict = {}
    for name in spec.characters:
        c, s, e = tw.CHARACTERS[name]
        refs = reference_images(name, spec.references, spec.seed, size)
        mean = encode_images(encoder, processor, refs, plus=False).mean(dim=0)
        embeds = pipeline_embeds(mean, torch.zeros_like(mean), guidance=spec.guidance_scale > 1)
        cases = [(character_prompt(name, bgs[i % 3], spec.prompt), bgs[i % 3], spec.seed + i) for i in range(spec.per_character)]
        res = {}
        for mode in (("adapter", "baseline") if with_baseline else ("adapter",)):
            pipe.set_ip_adapter_scale(spec.scale if mode == "adapter" else 0.0)
            items = []
            for prompt, bg, seed in cases:
                with torch.no_grad():
                    img = pipe(prompt=prompt, negative_prompt="", num_inference_steps=spec.steps,
                               guidance_scale=spec.guidance_scale, width=size, height=size,
                               generator=torch.Generator("cpu").manual_seed(seed), ip_adapter_image_embeds=embeds).images[0]
                items.append((img, {"colour": c, "shape": s, "background": bg}))
            acc = ev.evaluate(items)["attributes"]
            res[mode] = {k: acc[k]["accuracy"] for k in ("identity", "colour", "shape", "background")}
        out[name] = res
    pipe.set_ip_adapter_scale(1.0)
    return out


# ----------------------------------------------------------------------------- the whole run


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
    base_dir = resolve(root, spec.base)
    if not (base_dir / "model_index.json").exists():
        raise FileNotFoundError(f"base model {base_dir} is not a diffusers folder; train it first with "
                                f"`castbook toymodel train-base specs/toy/toy-base.yaml` or fix `base:`")
    pipe = load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    processor = encoder_processor_for(spec.encoder)
    log(f"generating {spec.data.count} toy images (seed {spec.data.seed}, hold-outs excluded)")
    images, labels = toy_examples(spec.data.count, spec.data.seed, spec.data.size)
    data = build_data(pipe, processor, images, labels, spec.seed)
    del images
    t_data = time.time() - t_start
    log(f"data: {len(data.latents)} latents, {len(data.embeds)} caption embeddings in {t_data:.0f}s")
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
