"""Built-in models: built from config with a fixed seed, saved once, then always loaded from files.

The registry (names, recipe versions, digests) is `schemas/builtins.py`; this module builds the
weights. Random built-ins (`builtin:tiny-sdxl`, `builtin:tiny-controlnet`) are saved ONCE to a cache
folder (`$CASTBOOK_HOME/builtins/<name>-r<recipe>`, default `~/.cache/castbook/builtins/...`) and
from then on always loaded from those files: in-memory weights and reloaded weights differ by up
to 1/255 on some CPUs, and loading from files exercises the real loading code. The toy-world
models (`builtin:toy-sdxl`, `builtin:toy-controlnet`) are trained by castbook and shipped in
`renderer/weights/toy/`. `builtin:sdxl-random` (full SDXL-base architecture) is built in memory
for GPU benchmarks and never saved.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from core.errors import JobError
from core.files import new_temp_folder, publish_folder
from core.home import builtins_dir
from schemas.builtins import BASE_MODELS, BUILTIN_RECIPES, CONTROLNET_MODELS, IP_ADAPTER_MODELS
from schemas.builtins import builtin_digest as _recipe_digest

BUILTIN_SEED = 0
TOY_SDXL_DIR = Path(__file__).resolve().parent / "weights" / "toy" / "sdxl"
# Trained by `castbook toymodel train-controlnet specs/toy/toy-controlnet.yaml` (toyworld/controlnet.py).
TOY_CONTROLNET_DIR = Path(__file__).resolve().parent / "weights" / "toy" / "controlnet"
# Trained by castbook (specs/toy/toy-ip-adapter.yaml): the adapter file + image_encoder/ (renderer/ip_adapter.py).
TOY_IP_ADAPTER_DIR = Path(__file__).resolve().parent / "weights" / "toy" / "ip-adapter"


# --------------------------------------------------------------------------- paths


def builtin_name(ref: str) -> str:
    """`builtin:tiny-sdxl` -> `tiny-sdxl`, refusing unknown names."""
    name = ref.split(":", 1)[1] if ref.startswith("builtin:") else ref
    if name not in BASE_MODELS + CONTROLNET_MODELS + IP_ADAPTER_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BASE_MODELS + CONTROLNET_MODELS + IP_ADAPTER_MODELS)
        raise JobError(f"unknown built-in model {ref!r}; known built-ins: {known}")
    return name


def builtin_digest(name: str) -> str:
    """The digest a job records for a built-in: `builtin:NAME@rRECIPE` (one definition, in schemas)."""
    return _recipe_digest(builtin_name(name))


# --------------------------------------------------------------------------- configs


def sdxl_base_unet_config() -> dict:
    """The UNet config of stabilityai/stable-diffusion-xl-base-1.0 (≈2.57 B parameters)."""
    return {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }


def _sdxl_scheduler_config() -> dict:
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def clip_tokenizer(allow_byte_fallback: bool = False):
    """The real 49,408-token CLIP BPE tokenizer, built offline from open_clip's vocabulary file.

    Token ids match `open_clip.tokenize`. Padding follows SDXL's first tokenizer
    (`<|endoftext|>`); the second tokenizer pads with `!` (id 0) like SDXL's.
    `allow_byte_fallback`: without open_clip installed (e.g. a bare GPU benchmark box),
    build a byte-level tokenizer instead (no merges; fine for random-weight models).
    """
    from transformers import CLIPTokenizer

    try:
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
    except ImportError:
        if not allow_byte_fallback:
            raise
        byte_tokens = list(_bytes_to_unicode().values())
        tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["<|startoftext|>", "<|endoftext|>"]
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77,
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", pad_token="<|endoftext|>")

    # Same construction as open_clip.tokenizer.SimpleTokenizer, with HF's special-token spelling.
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (same as open_clip's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _text_encoder_config(**kw):
    from transformers import CLIPTextConfig

    # eos/bos ids of the real vocabulary, so the pooled output is taken at <|endoftext|>.
    base = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    base.update(kw)
    return CLIPTextConfig(**base)


def tiny_unet_config(sample_size: int = 32, latent_channels: int = 4) -> dict:
    """The tiny SDXL UNet of STACK.md (~2 M params): tiny-sdxl's, and toy-sdxl's at 16x16 latents."""
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text
        cross_attention_dim=64,
    )


def build_tiny_sdxl_components(seed: int = BUILTIN_SEED) -> dict:
    """SDXL-architecture components, tiny, from config with a fixed seed (STACK.md).

    The caller's global torch RNG state is the same after the call as before.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        return _build_tiny_sdxl_components(seed)


def _build_tiny_sdxl_components(seed: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Seed before each component so each one's init does not depend on the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    te_kw = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                 projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_encoder_config(**te_kw))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(**te_kw))
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"
    scheduler = EulerDiscreteScheduler(**_sdxl_scheduler_config())
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def build_tiny_controlnet(unet, seed: int = BUILTIN_SEED, conditioning_channels: tuple[int, ...] = (16, 32)):
    """A ControlNet copied from the tiny UNet, its zero-initialised layers perturbed.

    A fresh ControlNet's output convs and conditioning-embedding output start at zero,
    so it would change nothing; the perturbation makes control images visibly matter.
    """
    import torch
    from diffusers import ControlNetModel

    # The conditioning embedding must downsample like the VAE: 2x for tiny-sdxl (two stages),
    # 4x for toy-sdxl (three stages).
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels)
    gen = torch.Generator("cpu").manual_seed(seed)
    zero_init = [cn.controlnet_cond_embedding.conv_out, cn.controlnet_mid_block, *cn.controlnet_down_blocks]
    with torch.no_grad():
        for module in zero_init:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return cn


def build_sdxl_random_pipeline(device: str = "cpu", torch_dtype=None, seed: int = BUILTIN_SEED):
    """The full SDXL-base architecture with random weights, built directly on `device`.

    For GPU benchmarks without weights; never saved (≈ 7 GB in fp16). The caller's default dtype
    and global RNG state are the same after the call as before.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch_dtype = torch_dtype or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    dev = torch.device(device)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.device(device):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**sdxl_base_unet_config())
            vae = AutoencoderKL(
                block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=1024,
                scaling_factor=0.13025,
                force_upcast=True,
            )
            te1 = CLIPTextModel(_text_encoder_config(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                     num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
            te2 = CLIPTextModelWithProjection(_text_encoder_config(hidden_size=1280, intermediate_size=5120,
                                                                   num_attention_heads=20, num_hidden_layers=32,
                                                                   projection_dim=1280, hidden_act="gelu"))
    finally:
        torch.set_default_dtype(previous)
    tok2 = clip_tokenizer(allow_byte_fallback=True)
    tok2.pad_token = "!"
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(allow_byte_fallback=True), tokenizer_2=tok2,
        unet=unet, scheduler=EulerDiscreteScheduler(**_sdxl_scheduler_config()),
    )


def build_sdxl_random_unet(device: str = "meta"):
    """Just the SDXL-base UNet, random init, on `device` (`meta` allocates nothing)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**sdxl_base_unet_config())


# --------------------------------------------------------------------------- built-in cache


def builtin_dir(name: str) -> Path:
    """The saved built-in's folder, building and saving it first if needed (safe across processes:
    each builder writes its own temporary folder and the first to finish publishes it)."""
    name = builtin_name(name)
    if name == "sdxl-random":
        raise JobError("builtin:sdxl-random is built in memory, not saved; it has no folder")
    if name == "toy-sdxl":  # trained by castbook, shipped in the repo rather than built
        return TOY_SDXL_DIR
    if name == "toy-controlnet":  # trained on drawn pose maps, shipped like toy-sdxl (fp16; loaded as asked)
        if not (TOY_CONTROLNET_DIR / "config.json").is_file():
            raise JobError(
                f"builtin:toy-controlnet has no trained weights: {TOY_CONTROLNET_DIR} is missing or has no "
                f"config.json. Train it once with `castbook toymodel train-controlnet specs/toy/toy-controlnet.yaml` "
                f"(about 15 minutes on one CPU thread), or name another ControlNet in the spec's `model:`"
            )
        return TOY_CONTROLNET_DIR
    if name == "toy-ip-adapter":  # trained by castbook, shipped like toy-controlnet
        if not (TOY_IP_ADAPTER_DIR / "image_encoder" / "config.json").is_file():
            raise JobError(
                f"builtin:toy-ip-adapter has no trained weights: {TOY_IP_ADAPTER_DIR} is missing or incomplete. "
                f"Train it once with `castbook toymodel train-ip-adapter specs/toy/toy-ip-adapter.yaml`, or give "
                f"an IP-Adapter file and its image_encoder folder in the character's `ip_adapter:`")
        return TOY_IP_ADAPTER_DIR
    final = builtins_dir() / f"{name}-r{BUILTIN_RECIPES[name]}"
    if (final / "model_index.json").exists() or (final / "config.json").exists() or \
            (final / "image_encoder" / "config.json").exists():
        return final
    tmp = new_temp_folder(final)
    try:
        _save_builtin(name, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final)  # False: another process finished first; its folder is the same model
    return final


def _save_builtin(name: str, out: Path) -> None:
    if name == "tiny-sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components())
        pipe.save_pretrained(out, safe_serialization=True)
    elif name == "tiny-controlnet":
        from diffusers import UNet2DConditionModel

        # Built from the SAVED tiny UNet so it matches what renders load.
        unet = UNet2DConditionModel.from_pretrained(
            builtin_dir("tiny-sdxl") / "unet", local_files_only=True, use_safetensors=True
        )
        build_tiny_controlnet(unet).save_pretrained(out, safe_serialization=True)
    elif name == "tiny-ip-adapter":
        from renderer.ip_adapter import save_tiny_ip_adapter

        save_tiny_ip_adapter(builtin_dir("tiny-sdxl") / "unet", out)
    else:
        raise JobError(f"built-in {name!r} cannot be saved to a folder")


def check_cache_home(model_refs) -> None:
    """Raise InputError when a built-in that will be built is not saved yet and the cache home
    ($CASTBOOK_HOME, default ~/.cache/castbook) cannot be written. Saved built-ins need no writes."""
    from core.home import HOME_ENV, castbook_home
    from core.paths import ensure_writable_folder
    from schemas.builtins import SHIPPED_WEIGHTS

    built = {r.removeprefix("builtin:").split("@")[0] for r in model_refs if str(r).startswith("builtin:")}
    if "tiny-controlnet" in built or "tiny-ip-adapter" in built:
        built.add("tiny-sdxl")  # the ControlNet is built from the saved tiny UNet
    to_save = sorted(n for n in built if n in BUILTIN_RECIPES and n not in SHIPPED_WEIGHTS and n != "sdxl-random"
                     and not (builtins_dir() / f"{n}-r{BUILTIN_RECIPES[n]}").is_dir())
    if to_save:
        names = ", ".join(f"builtin:{n}" for n in to_save)
        ensure_writable_folder(
            builtins_dir(), "the model cache",
            f"castbook saves {names} there once; set {HOME_ENV} (now {castbook_home()}) to a writable folder")
