"""FLOP counts of the SDXL UNet / ControlNet / VAE decoder, and device peaks, for `castbook bench`.

Counts are measured, not hard-coded: the model is rebuilt from its config on the `meta`
device (no memory, no weights) and one forward runs under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention
with the usual 2·M·N·K rule (one multiply-add = 2 FLOPs). Elementwise ops, norms and
softmax are not counted (they are memory-bound and < 1 % of SDXL's FLOPs), so the
"achieved TFLOP/s" is the conventional model-FLOPs figure.

Per image: UNet forward × steps × (2 with classifier-free guidance, the batch doubles)
+ ControlNet forward × the same + one VAE decode. Text encoders are left out (< 0.1 %).
"""

from __future__ import annotations

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity). Matched on
# the lower-cased `torch.cuda.get_device_name()`; the first matching entry wins, so the
# more specific names come first. Unknown devices give None (no % of peak is printed).
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM / HBM3
    ("gh200", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a10g", 125.0),  # AWS A10G: same GA102 tensor cores as the A10
    ("a10", 125.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("rtx 4090", 165.0),
    ("rtx 3090", 71.0),
    ("rtx 6000 ada", 364.0),
    ("v100", None),  # no bf16 tensor cores
    ("t4", None),
)


def bf16_peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None when unknown (or on CPU)."""
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, peak in BF16_PEAK_TFLOPS:
        if pattern in name:
            return peak
    return None


def count_flops(module, *args, **kwargs) -> int:
    """FLOPs of one `module(*args, **kwargs)` call (run it on `meta` tensors to count for free)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def _meta_copy(model):
    """The same architecture as `model` (a diffusers ModelMixin), rebuilt on `meta` from its config."""
    import torch

    with torch.device("meta"):
        return type(model).from_config(model.config)


def _unet_inputs(config: dict, batch: int, latent_h: int, latent_w: int, text_len: int = 77) -> tuple[tuple, dict]:
    import torch

    with torch.device("meta"):
        sample = torch.empty(batch, config["in_channels"], latent_h, latent_w)
        timestep = torch.empty(batch)
        text = torch.empty(batch, text_len, config["cross_attention_dim"])
        kwargs = {"encoder_hidden_states": text}
        if config.get("addition_embed_type") == "text_time":
            n_time = 6 * config["addition_time_embed_dim"]
            pooled = config["projection_class_embeddings_input_dim"] - n_time
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
    return (sample, timestep), kwargs


def unet_forward_flops(unet, batch: int, latent_h: int, latent_w: int) -> int:
    """FLOPs of one UNet forward on a `batch` of latents (counted on a meta copy of `unet`)."""
    meta = _meta_copy(unet)
    args, kwargs = _unet_inputs(dict(meta.config), batch, latent_h, latent_w)
    return count_flops(meta, *args, **kwargs)


def controlnet_forward_flops(controlnet, batch: int, latent_h: int, latent_w: int, vae_scale: int) -> int:
    """FLOPs of one ControlNet forward (its conditioning image is at pixel resolution)."""
    import torch

    meta = _meta_copy(controlnet)
    args, kwargs = _unet_inputs(dict(meta.config), batch, latent_h, latent_w)
    with torch.device("meta"):
        cond = torch.empty(batch, meta.config["conditioning_channels"], latent_h * vae_scale, latent_w * vae_scale)
    return count_flops(meta, *args, controlnet_cond=cond, **kwargs)


def vae_decode_flops(vae, latent_h: int, latent_w: int) -> int:
    """FLOPs of decoding one latent to an image."""
    import torch

    meta = _meta_copy(vae)
    with torch.device("meta"):
        z = torch.empty(1, meta.config["latent_channels"], latent_h, latent_w)
    return count_flops(meta.decode, z)


def image_flops(pipe, width: int, height: int, steps: int, cfg: bool, controlnet=None) -> dict:
    """FLOPs to render one image with `pipe` (a loaded SDXL pipeline): parts and total."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    lh, lw = height // vae_scale, width // vae_scale
    batch = 2 if cfg else 1
    unet = unet_forward_flops(pipe.unet, batch, lh, lw)
    cn = controlnet_forward_flops(controlnet, batch, lh, lw, vae_scale) if controlnet is not None else 0
    vae = vae_decode_flops(pipe.vae, lh, lw)
    total = (unet + cn) * steps + vae
    return {"unet_forward": unet, "controlnet_forward": cn, "vae_decode": vae, "steps": steps,
            "cfg_batch": batch, "per_image": total}
