"""IP-Adapter: identity from reference images, through diffusers' own loader and attention processors.

Files are the layout people download (h94/IP-Adapter `sdxl_models/`): one `.safetensors` whose
keys are `image_proj.*` (the image projection: `proj` + `norm` for the plain adapter, a
Resampler with `latents` for Plus and Plus-Face) and `ip_adapter.N.to_k_ip.weight` /
`ip_adapter.N.to_v_ip.weight` (N = 1, 3, 5, ...: one pair per cross-attention layer, in the
order of `unet.attn_processors`), plus an image-encoder folder holding a
`CLIPVisionModelWithProjection` (`config.json` + `model.safetensors`).

- The adapter is loaded with `pipe.load_ip_adapter(folder, subfolder="", weight_name=FILE,
  image_encoder_folder=None, local_files_only=True)`: no hub access, and the pipeline gets no
  image encoder, because castbook computes the image embeddings itself (below) and passes
  `ip_adapter_image_embeds`.
- Embeddings: each reference image goes through the encoder's preprocessing
  (`preprocessor_config.json` if the folder has one, else `CLIPImageProcessor` at the
  encoder's `image_size`, which is what diffusers builds) and the encoder: `image_embeds` for
  the plain adapter, the penultimate hidden states for Plus/Plus-Face (as diffusers'
  `encode_image` does). **Several reference images are averaged**: the mean of their
  embeddings is one embedding, so the adapter sees "what the references have in common"
  (identity) more than any one picture's pose or background. The negative (classifier-free
  guidance) is what diffusers uses: zeros for the plain adapter, the hidden states of an all-zero
  (normalised) pixel tensor for Plus. Embeddings are cached per (encoder digest, image digest).
- Scale: `pipe.set_ip_adapter_scale(scale)`, a number or a scale per UNet block in diffusers' own
  form (InstantStyle; blocks not named get 0). Every job sets it, so no job inherits another's. A
  job without an adapter runs on a UNet whose adapter is unloaded (`unload_ip_adapter`), so
  nothing leaks into it.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

from core.errors import JobError

ENCODER_DIR = "image_encoder"  # the downloaded layout's encoder folder name (next to the adapter file)


# ----------------------------------------------------------------------------- file format


def is_plus(state: dict) -> bool:
    """Plus / Plus-Face adapters (a Resampler with learnt `latents`) take hidden states, not image_embeds."""
    return any(k.startswith("image_proj.latents") for k in state)


def adapter_state_from_unet(unet) -> dict:
    """The loaded (plain) adapter of `unet` back in the downloaded key layout (inverse of diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` / `_convert_ip_adapter_attn_to_diffusers`)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
           "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    key_id = 1
    for proc in unet.attn_processors.values():
        if isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
            out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
            key_id += 2
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def new_adapter_state(unet, image_embed_dim: int, seed: int, tokens: int = 4) -> dict:
    """A fresh plain adapter in the downloaded layout: random image projection (seeded), `to_k_ip` /
    `to_v_ip` copied from each cross-attention's `to_k` / `to_v` (how IP-Adapter training starts)."""
    import torch

    cross = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(image_embed_dim, cross * tokens)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) / image_embed_dim ** 0.5)
        proj.bias.zero_()
    state = {"image_proj.proj.weight": proj.weight.detach().clone(), "image_proj.proj.bias": proj.bias.detach().clone(),
             "image_proj.norm.weight": torch.ones(cross), "image_proj.norm.bias": torch.zeros(cross)}
    key_id = 1
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            state[f"ip_adapter.{key_id}.to_k_ip.weight"] = module.to_k.weight.detach().clone()
            state[f"ip_adapter.{key_id}.to_v_ip.weight"] = module.to_v.weight.detach().clone()
            key_id += 2
    return state


def check_adapter_file(path: Path, what: str) -> dict:
    """Read the keys of an adapter file; a clear error if it is not an IP-Adapter safetensors file."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise JobError(f"{what}: {path} is not a .safetensors file; castbook loads IP-Adapters only as safetensors "
                       f"(the `ip-adapter_sdxl.safetensors` of the download, never .bin pickles)")
    if not path.is_file():
        raise JobError(f"{what}: {path} does not exist (paths are relative to the project root)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise JobError(f"{what}: {path} is not a readable safetensors file ({exc})") from exc
    if not any(k.startswith("image_proj.") for k in keys) or not any(k.startswith("ip_adapter.") for k in keys):
        raise JobError(f"{what}: {path} has no `image_proj.*` and `ip_adapter.*` keys; it is not an IP-Adapter file")
    return {k: None for k in keys}


# ----------------------------------------------------------------------------- image encoder


def encoder_processor(folder: Path, encoder):
    """The encoder's preprocessing: its `preprocessor_config.json`, else what diffusers builds
    (`CLIPImageProcessor(size=image_size, crop_size=image_size)`)."""
    from transformers import CLIPImageProcessor

    if (Path(folder) / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    size = encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


def load_image_encoder(folder: Path, device: str = "cpu", dtype=None):
    """(CLIPVisionModelWithProjection, processor) from a local folder, safetensors only."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise JobError(f"IP-Adapter image encoder {folder} has no config.json; it must be a "
                       f"CLIPVisionModelWithProjection folder (the `image_encoder/` of the download)")
    if not any(folder.glob("*.safetensors")):
        raise JobError(f"IP-Adapter image encoder {folder} has no .safetensors weights (pickled .bin files are "
                       f"never loaded); convert it to safetensors")
    enc = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                                        dtype=dtype or torch.float32)
    return enc.to(device).eval(), encoder_processor(folder, enc)


def encode_images(encoder, processor, images, plus: bool):
    """Per-image embeddings: `image_embeds` (N x D) or, for Plus, penultimate hidden states (N x T x D)."""
    import torch

    pixels = processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    pixels = pixels.to(device=encoder.device, dtype=encoder.dtype)
    with torch.no_grad():
        if plus:
            return encoder(pixels, output_hidden_states=True).hidden_states[-2]
        return encoder(pixels).image_embeds


def negative_embeds(encoder, processor, like, plus: bool):
    """The classifier-free-guidance negative diffusers uses: zeros, or (Plus) the hidden states of an
    all-zero pixel tensor (already normalised, so mid-grey rather than black), as `encode_image` does."""
    import torch

    if not plus:
        return torch.zeros_like(like)
    size = processor.crop_size["height"]
    black = torch.zeros((1, 3, size, size), device=encoder.device, dtype=encoder.dtype)
    with torch.no_grad():
        return encoder(black, output_hidden_states=True).hidden_states[-2]


def pipeline_embeds(mean, negative, guidance: bool):
    """`ip_adapter_image_embeds` for one adapter from one (averaged) embedding `mean` (D, or T x D for
    Plus): [(2, 1, ...)] = [negative; positive] with guidance, else [(1, 1, ...)]."""
    import torch

    pos = mean.reshape((1, 1) + tuple(mean.shape[-(mean.dim()):]))
    if not guidance:
        return [pos]
    return [torch.cat([negative.reshape(pos.shape), pos], dim=0)]


def set_scale(pipe, scale: float | dict, job_name: str) -> None:
    """`set_ip_adapter_scale` with the job's scale. A per-block dict that names a block this UNet has
    no attention in (or the wrong number of layers) is the job's error, with diffusers' reason."""
    if not isinstance(scale, dict):
        pipe.set_ip_adapter_scale(float(scale))
        return
    layout = {part: [f"block_{i}" for i, b in enumerate(getattr(pipe.unet, f"{part}_blocks")) if hasattr(b, "attentions")]
              for part in ("down", "up")}
    where = f"(this UNet has attention in down {layout['down']}, mid, up {layout['up']})"
    # diffusers skips a block name it does not know, which would turn a typo into a silent 0
    unknown = [f"{part}.{name}" for part in layout if isinstance(scale[part], dict)
               for name in scale[part] if name not in layout[part]]
    if unknown:
        raise JobError(f"{job_name}: ip_adapter.scale names {', '.join(unknown)}, which has no attention layers {where}")
    try:
        pipe.set_ip_adapter_scale(copy.deepcopy(scale))  # a copy: diffusers expands it in place
    except ValueError as exc:
        raise JobError(f"{job_name}: ip_adapter.scale {json.dumps(scale)}: {exc} {where}") from exc


class EmbedCache:
    """Image embeddings per (encoder digest, image digest, plus), LRU-bounded."""

    def __init__(self, max_items: int = 256):
        self.items: OrderedDict[tuple, object] = OrderedDict()
        self.max_items = max_items
        self.stats = {"encoded": 0, "hits": 0}

    def get(self, key: tuple, compute):
        if key in self.items:
            self.items.move_to_end(key)
            self.stats["hits"] += 1
            return self.items[key]
        value = compute()
        self.stats["encoded"] += 1
        self.items[key] = value
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return value


def describe(folder: Path) -> dict:
    """A short description of an encoder folder (for errors and `inspect`)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return {k: cfg.get(k) for k in ("hidden_size", "projection_dim", "image_size", "patch_size", "num_hidden_layers")}


# ----------------------------------------------------------------------------- built-ins

BUILTIN_FILES = {"tiny-ip-adapter": "ip-adapter_tiny-sdxl.safetensors", "toy-ip-adapter": "ip-adapter_toy-sdxl.safetensors"}


def save_tiny_ip_adapter(unet_dir: Path, out: Path) -> None:
    """`builtin:tiny-ip-adapter`: a plain adapter for the saved tiny-sdxl UNet (seeded random projection,
    `to_k_ip`/`to_v_ip` copied from the UNet) and a tiny random CLIPVisionModelWithProjection, in the
    downloaded layout."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CLIPVisionModelWithProjection(cfg)
    out = Path(out)
    encoder.save_pretrained(out / ENCODER_DIR, safe_serialization=True)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(out / ENCODER_DIR)
    state = new_adapter_state(unet, cfg.projection_dim, seed=0)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / BUILTIN_FILES["tiny-ip-adapter"]))


# ----------------------------------------------------------------------------- at render time


class IpAdapterManager:
    """Keeps at most one IP-Adapter in the base pipeline's UNet (shared by every pipeline variant)
    and the image encoders and embeddings it needs; `apply(pipe, job, dtype)` gives the pipeline
    kwargs of a job (`ip_adapter_image_embeds`), or {} after unloading any adapter."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.loaded: tuple | None = None  # (adapter digest, dtype) in the UNet
        self.plus = False
        self.encoders: dict[tuple, tuple] = {}  # (encoder digest, dtype) -> (encoder, processor)
        self.embeds = EmbedCache()
        self.stats = {"loads": 0, "unloads": 0, "embeds": self.embeds.stats}

    def reset(self) -> None:
        """The pipeline was dropped (JobRenderer.unload): nothing is loaded any more."""
        self.loaded = None

    def files(self, ip) -> tuple[Path, Path]:
        """(adapter file, encoder folder) of a `ResolvedIpAdapter`."""
        if ip.model.startswith("builtin:"):
            from renderer.builtins import builtin_dir

            name = ip.model.removeprefix("builtin:")
            folder = builtin_dir(name)
            return folder / BUILTIN_FILES[name], folder / ENCODER_DIR
        return self.root / ip.model, self.root / ip.image_encoder

    def apply(self, pipe, job, dtype_label: str, guidance: bool) -> dict:
        from renderer.models import torch_dtype

        ip = job.ip_adapter
        if ip is None:
            if self.loaded is not None:  # nothing of the last job's adapter may reach this one
                pipe.unload_ip_adapter()
                self.loaded = None
                self.stats["unloads"] += 1
            return {}
        adapter_file, encoder_dir = self.files(ip)
        if self.loaded != (ip.digest, dtype_label):
            keys = check_adapter_file(adapter_file, f"{job.name}: ip_adapter.model")
            if self.loaded is not None:
                pipe.unload_ip_adapter()
            try:
                pipe.load_ip_adapter(str(adapter_file.parent), subfolder="", weight_name=adapter_file.name,
                                     image_encoder_folder=None, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a mismatched file
                self.loaded = None
                raise JobError(f"{job.name}: could not load IP-Adapter {ip.model} into {job.base_model.ref}: "
                               f"{type(exc).__name__}: {exc} (an SDXL adapter needs an SDXL base model)") from exc
            self.loaded, self.plus = (ip.digest, dtype_label), is_plus(keys)
            self.stats["loads"] += 1
        set_scale(pipe, ip.scale, job.name)
        ekey = (ip.encoder_digest, dtype_label)
        if ekey not in self.encoders:
            self.encoders[ekey] = load_image_encoder(encoder_dir, str(pipe.unet.device), torch_dtype(dtype_label))
        encoder, processor = self.encoders[ekey]
        per_image = [self.embeds.get((ip.encoder_digest, d, self.plus, dtype_label),
                                     lambda p=p: encode_images(encoder, processor, [self._open(p, job)], self.plus)[0])
                     for p, d in zip(ip.images, ip.image_digests)]
        import torch

        # The references' embeddings, averaged (float32 mean, then the UNet's dtype).
        mean = torch.stack([e.float() for e in per_image]).mean(dim=0).to(pipe.unet.dtype)
        neg = negative_embeds(encoder, processor, mean, self.plus).to(pipe.unet.dtype)
        return {"ip_adapter_image_embeds": pipeline_embeds(mean, neg, guidance)}

    def _open(self, rel: str, job):
        from PIL import Image

        path = self.root / rel
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise JobError(f"{job.name}: IP-Adapter image {rel} cannot be read ({exc})") from exc
