"""IP-Adapter Plus / Plus-Face through castbook, with a small Plus file this module writes itself.

No Plus file small enough to ship exists, so the module builds one in the key layout people download
(`ip-adapter-plus_sdxl_vit-h.safetensors`: a Resampler under `image_proj.*` with `latents`,
`proj_in`, `proj_out`, `norm_out` and four `layers.N.{0,1}` blocks, plus `ip_adapter.K.to_{k,v}_ip`)
sized for builtin:tiny-sdxl and the tiny image encoder of builtin:tiny-ip-adapter. It proves, with
diffusers' own loader and pipeline (no mocks):

- the layout is the one diffusers' converter (`_convert_ip_adapter_image_proj_to_diffusers`) reads:
  its strict `load_state_dict` accepts it, the UNet gets an `IPAdapterPlusImageProjection` holding
  the file's tensors, and `renderer.ip_adapter.is_plus` tells it from the plain built-in;
- castbook's embeddings are diffusers' own: `encode_images(..., plus=True)` and `negative_embeds`
  equal what `StableDiffusionXLPipeline.encode_image(..., output_hidden_states=True)` gives (the
  penultimate hidden states, N x T x D, and those of an all-zero input), and the kwargs castbook
  passes are `[(2, 1, T, D)]` = [negative; positive];
- through a spec (`characters.NAME.ip_adapter: {model: FILE, image_encoder: FOLDER}`, `load_plan`,
  `JobRenderer`): Plus and Plus-Face render and change the pixels, `scale: 0` gives exactly the
  pixels without the adapter, and a job without the adapter after them is untouched (unloaded).

Plus-Face: diffusers does not tell it apart by keys. `ip-adapter-plus-face_sdxl_vit-h` has exactly
the Plus key layout and goes through the same converter branch (the `else:` after the FaceID
checks; only FaceID / FaceID-Plus, `perceiver_resampler.*` or `proj.0` + `norm`, differ). So the
"face" file here is the same layout with other sizes (heads, number of queries, hidden width).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from renderer.builtins import builtin_dir
from renderer.ip_adapter import (
    ENCODER_DIR,
    check_adapter_file,
    encode_images,
    is_plus,
    load_image_encoder,
    negative_embeds,
    new_adapter_state,
    save_tiny_ip_adapter,
)
from renderer.pipeline import JobRenderer

DIM_HEAD = 64  # fixed in diffusers' IPAdapterPlusImageProjection; heads = to_q rows // 64 in the converter
DEPTH = 4  # the converter builds the default depth (4 blocks) and loads strictly: all four must be there
# (hidden width, heads, queries): hidden != the encoder's width (32) so `proj_in` really maps between them.
PLUS = (48, 1, 8)
FACE = (32, 2, 4)


def resampler_state(embed_dims: int, output_dims: int, hidden: int, heads: int, queries: int, seed: int) -> dict:
    """The Resampler of an original Plus file, seeded random, as `image_proj.*` keys (the layout of
    IP-Adapter's `resampler.py`: blocks are (PerceiverAttention, FeedForward = LN, Linear, GELU, Linear))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    inner = heads * DIM_HEAD

    def lin(rows, cols):
        return torch.randn(rows, cols, generator=g) / cols**0.5

    def norm(n):  # LayerNorm weights near 1, so the random values still matter without blowing up
        return 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)

    s = {
        "latents": torch.randn(1, queries, hidden, generator=g) / hidden**0.5,
        "proj_in.weight": lin(hidden, embed_dims),
        "proj_in.bias": 0.1 * torch.randn(hidden, generator=g),
        "proj_out.weight": lin(output_dims, hidden),
        "proj_out.bias": 0.1 * torch.randn(output_dims, generator=g),
    }
    s["norm_out.weight"], s["norm_out.bias"] = norm(output_dims)
    for n in range(DEPTH):
        a, f = f"layers.{n}.0", f"layers.{n}.1"
        s[f"{a}.norm1.weight"], s[f"{a}.norm1.bias"] = norm(hidden)
        s[f"{a}.norm2.weight"], s[f"{a}.norm2.bias"] = norm(hidden)
        s[f"{a}.to_q.weight"] = lin(inner, hidden)
        s[f"{a}.to_kv.weight"] = lin(2 * inner, hidden)  # k and v stacked; diffusers chunks it in two
        s[f"{a}.to_out.weight"] = lin(hidden, inner)
        s[f"{f}.0.weight"], s[f"{f}.0.bias"] = norm(hidden)
        s[f"{f}.1.weight"] = lin(4 * hidden, hidden)
        s[f"{f}.3.weight"] = lin(hidden, 4 * hidden)
    return {f"image_proj.{k}": v.contiguous() for k, v in s.items()}


def write_plus_file(path: Path, unet, embed_dims: int, sizes: tuple, seed: int) -> dict:
    from safetensors.torch import save_file

    hidden, heads, queries = sizes
    state = resampler_state(embed_dims, unet.config.cross_attention_dim, hidden, heads, queries, seed)
    # `ip_adapter.K.to_{k,v}_ip` (K = 1, 3, 5, ...) from castbook's own plain-adapter builder: they do not
    # depend on the image projection (their input is the projection's output, cross_attention_dim wide).
    state |= {k: v for k, v in new_adapter_state(unet, embed_dims, seed).items() if k.startswith("ip_adapter.")}
    save_file(state, str(path))
    return state


SPEC = """\
defaults: {preset: draft, scheduler: euler}
presets:
  draft: {width: 64, height: 64, num_inference_steps: 2, guidance_scale: 5.0}
characters:
  hero:
    description: a hero
    references: ["refs/*.png"]
    ip_adapter: {model: adapters/ip-adapter-plus_tiny.safetensors, image_encoder: adapters/image_encoder}
  face:
    description: a hero
    references: ["refs/*.png"]
    ip_adapter: {model: adapters/ip-adapter-plus-face_tiny.safetensors, image_encoder: adapters/image_encoder,
                 scale: 1.0}
scenes:
  park: {prompt: "a hero in a park"}
jobs:
  plus: {characters: [hero, face], scenes: [park], seeds: [1]}
  base: {characters: [hero], scenes: [park], seeds: [1], use_ip_adapter: false}
  zero: {characters: [hero], scenes: [park], seeds: [1], sweep: {ip_adapter.scale: [0.0]}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("plusroot")
    (root / ".git").mkdir()
    (root / "refs").mkdir()
    for i, (colour, box) in enumerate([("red", (8, 8, 40, 40)), ("blue", (20, 16, 56, 52))]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse(box, fill=colour)
        im.save(root / "refs" / f"ref{i}.png")
    adapters = root / "adapters"
    unet_dir = builtin_dir("tiny-sdxl") / "unet"
    # The image encoder: builtin:tiny-ip-adapter's own builder (seeded random CLIPVisionModelWithProjection,
    # safetensors + preprocessor_config.json); it also writes the plain adapter, used below as the contrast.
    save_tiny_ip_adapter(unet_dir, adapters)
    unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    embed_dims = load_image_encoder(adapters / ENCODER_DIR)[0].config.hidden_size
    write_plus_file(adapters / "ip-adapter-plus_tiny.safetensors", unet, embed_dims, PLUS, seed=1)
    write_plus_file(adapters / "ip-adapter-plus-face_tiny.safetensors", unet, embed_dims, FACE, seed=2)
    (root / "spec.yaml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def jobs(root):
    from schemas.plan import load_plan

    return {j.name: j for j in load_plan([root / "spec.yaml"]).jobs}


@pytest.fixture(scope="module")
def renderer(root):
    return JobRenderer(root)


def px(renderer, j):
    return np.array(renderer.render(j).image).astype(int)


def test_the_file_has_the_downloaded_plus_layout_and_diffusers_loads_it(root):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import load_file

    path = root / "adapters" / "ip-adapter-plus_tiny.safetensors"
    saved = load_file(str(path))
    proj_keys = {k for k in saved if k.startswith("image_proj.")}
    # latents, proj_in / proj_out / norm_out (w, b) + per block: norm1, norm2 (w, b), to_q, to_kv, to_out,
    # the FF's LayerNorm (w, b) and two Linears: 7 + 4 x 11 = 51, as in ip-adapter-plus_sdxl_vit-h
    assert len(proj_keys) == 7 + DEPTH * 11
    assert {"image_proj.latents", "image_proj.layers.3.0.to_kv.weight", "image_proj.layers.3.1.3.weight"} <= proj_keys
    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_dir("tiny-sdxl"), local_files_only=True)
    cross = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert sorted(int(k.split(".")[1]) for k in saved if k.endswith("to_k_ip.weight")) == list(
        range(1, 2 * len(cross), 2)
    )
    # castbook's recognition, from the file's keys as the renderer reads them
    assert is_plus(check_adapter_file(path, "plus"))
    assert not is_plus(check_adapter_file(root / "adapters" / "ip-adapter_tiny-sdxl.safetensors", "plain"))
    # diffusers' converter loads strictly: a wrong or missing key or shape raises here
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection)
    hidden, heads, queries = PLUS
    assert proj.latents.shape == (1, queries, hidden) and proj.layers[0].attn.heads == heads
    assert np.array_equal(proj.latents.detach().numpy(), saved["image_proj.latents"].numpy())
    k, v = saved["image_proj.layers.2.0.to_kv.weight"].chunk(2)  # the file's k/v reached the right block
    assert np.array_equal(proj.layers[2].attn.to_k.weight.detach().numpy(), k.numpy())
    assert np.array_equal(proj.layers[2].attn.to_v.weight.detach().numpy(), v.numpy())
    assert np.array_equal(
        proj.layers[1].ff[1].net[2].weight.detach().numpy(), saved["image_proj.layers.1.1.3.weight"].numpy()
    )
    # each cross-attention reads as many image tokens as the Resampler has queries
    procs = [pipe.unet.attn_processors[n] for n in cross]
    assert all(p.num_tokens == [queries] for p in procs)


def test_castbook_embeddings_are_diffusers_own(root):
    """`encode_images(plus=True)` / `negative_embeds` against diffusers' `encode_image` for Plus."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    encoder, processor = load_image_encoder(root / "adapters" / ENCODER_DIR)
    image = Image.open(root / "refs" / "ref0.png").convert("RGB")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        builtin_dir("tiny-sdxl"), image_encoder=encoder, feature_extractor=processor, local_files_only=True
    )
    pos, neg = pipe.encode_image(image, "cpu", 1, output_hidden_states=True)
    mine = encode_images(encoder, processor, [image], plus=True)
    cfg = encoder.config
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + CLS
    assert mine.shape == (1, tokens, cfg.hidden_size)  # hidden states (N x T x D), not image_embeds (N x D)
    assert torch.equal(mine, pos)
    assert torch.equal(negative_embeds(encoder, processor, mine[0], plus=True), neg)
    # the plain path is different on purpose: projected image_embeds and a zero negative
    plain = encode_images(encoder, processor, [image], plus=False)
    assert plain.shape == (1, cfg.projection_dim)


def test_plus_and_face_render_scale_zero_is_exact_and_nothing_leaks(renderer, jobs):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    base = px(renderer, jobs["base/hero/park/draft/seed-1"])
    plus_job = jobs["plus/hero/park/draft/seed-1"]
    plus = px(renderer, plus_job)
    assert renderer.ip_adapters.plus  # recognised at load from the file's keys
    proj = renderer.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(proj, IPAdapterPlusImageProjection) and proj.latents.shape[1] == PLUS[2]
    # What castbook hands the pipeline for this job: [negative; positive] hidden states, (2, 1, T, D)
    kwargs = renderer.ip_adapters.apply(renderer.pipe, plus_job, "fp32", guidance=True)
    (embeds,) = kwargs["ip_adapter_image_embeds"]
    encoder = next(iter(renderer.ip_adapters.encoders.values()))[0]
    tokens = (encoder.config.image_size // encoder.config.patch_size) ** 2 + 1
    assert embeds.shape == (2, 1, tokens, encoder.config.hidden_size)
    assert not np.array_equal(embeds[0].numpy(), embeds[1].numpy())  # the negative is not the references

    face = px(renderer, jobs["plus/face/park/draft/seed-1"])
    proj = renderer.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert proj.latents.shape[1] == FACE[2] and proj.layers[0].attn.heads == FACE[1]  # the face file replaced it
    zero = px(renderer, jobs["zero/hero/park/draft/seed-1-ip=0"])
    after = px(renderer, jobs["base/hero/park/draft/seed-1"])

    assert np.abs(plus - base).mean() > 1.0
    assert np.abs(face - base).mean() > 1.0
    assert not np.array_equal(plus, face)
    assert np.array_equal(zero, base)  # scale 0: the Plus adapter adds exactly nothing
    assert np.array_equal(after, base)  # unloaded (Resampler and processors): no leak into later jobs
    assert renderer.ip_adapters.stats["loads"] >= 3 and renderer.ip_adapters.stats["unloads"] >= 1
