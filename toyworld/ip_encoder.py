"""The image encoder of the toy IP-Adapter (toyworld/ip_adapter.py): the toy CLIP's vision tower
converted to a `CLIPVisionModelWithProjection` (with an attribute projection trained as a linear
probe, then the whole tower fine-tuned with shape learnt on recoloured bodies), or a small one trained
from random init (`encoder.source: trained`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from schemas.toy import IpEncoderSpec, ToyIpAdapterSpec
from toyworld.loop import seeded, train_loop

if TYPE_CHECKING:
    from toyworld.ip_adapter import IpData


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


def pretrain_encoder(encoder, data: "IpData", spec: ToyIpAdapterSpec, log: Callable[[str], None] = print) -> dict:
    """`attributes` encoders: colour / shape / eye-colour cross-entropy on single images, no UNet."""
    import torch

    from toyworld import world as tw

    enc = spec.encoder
    if not enc.pretrain_steps:
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


def train_probe(encoder, data: "IpData", spec: ToyIpAdapterSpec, log: Callable[[str], None] = print) -> dict:
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


def encoder_loss(encoder, data: "IpData", n: int, smoothing: float, bounds, g):
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


def recoloured(labels, seed: int):
    """Each toy picture redrawn with a random body colour (hue uniform, saturation 0.4-1, value 0.3-1),
    background, pose and face unchanged. The shape logits learn on these only: on the plain pictures a
    shape head learns "brown never comes as a heart" from the hold-outs' absence (measured: the frozen
    toy CLIP's probe read 12 % of luca's hearts as hearts; fine-tuned on recoloured bodies, 88-100 %)."""
    import colorsys

    from toyworld import world as tw

    rng = np.random.default_rng([seed, 29])
    out = []
    for lb in labels:
        label, draw_rng = tw.sample_label(lb.seed, lb.index, lb.size)
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0))
        out.append(tw.render(label.colour, label.shape, label.eyes, label.expression, label.background, label.pose,
                             lb.size, draw_rng, body_rgb=tuple(int(round(x * 255)) for x in rgb)))
    return out


def finetune_encoder(encoder, data: "IpData", labels, spec: ToyIpAdapterSpec,
                     log: Callable[[str], None] = print) -> dict:
    """The whole converted tower and its attribute projection, `finetune_steps` x `finetune_batch_size`:
    half the batch plain pictures (colour and eye-colour cross-entropy), half recoloured ones (shape)."""
    import torch
    import torch.nn.functional as F

    from toyworld import world as tw

    enc = spec.encoder
    processor = encoder_processor_for(enc)
    attrs, plain = data.attrs, data.pixels
    copies = [processor(recoloured(labels, spec.seed + c), return_tensors="pt").pixel_values
              for c in range(enc.recoloured_copies)]
    b = np.cumsum((0, len(tw.COLOURS), len(tw.SHAPES), len(tw.EYE_COLOURS)))
    encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(encoder.parameters(), lr=1.0, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed + 6)
    half = enc.finetune_batch_size // 2

    def step_loss(step: int):
        idx = torch.randint(0, len(plain), (2 * half,), generator=g)
        copy = copies[int(torch.randint(0, len(copies), (1,), generator=g))]
        z = encoder(torch.cat([plain[idx[:half]], copy[idx[half:]]])).image_embeds

        def ce(logits, target):
            return F.cross_entropy(logits, target, label_smoothing=enc.label_smoothing)
        return (ce(z[:half, b[0]:b[1]], attrs[idx[:half], 0]) + ce(z[:half, b[2]:b[3]], attrs[idx[:half], 2])) / 2 \
            + ce(z[half:, b[1]:b[2]], attrs[idx[half:], 1])

    def lr_at(step: int) -> float:
        return enc.finetune_learning_rate * min(1.0, (step + 1) / 50)

    run = train_loop(step_loss, opt, lr_at, enc.finetune_steps, clip_params=list(encoder.parameters()),
                     name="image-encoder-finetune", log=log, log_every=250, batch_size=2 * half)
    encoder.eval().requires_grad_(False)
    return {"finetune_steps": run.done, "finetune_seconds": round(run.seconds, 1),
            "finetune_loss_avg100": sum(run.losses[-100:]) / max(1, len(run.losses[-100:]))}
