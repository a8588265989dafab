"""IP-Adapter on builtin:tiny-sdxl with builtin:tiny-ip-adapter (random, in the downloaded layout):
diffusers' loader from local files, scale 0, no leak between jobs, LoRA + ControlNet, the spec side."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from _render_helpers import control, job, lora
from PIL import Image, ImageDraw

from core.errors import JobError
from renderer.builtins import builtin_dir
from renderer.ip_adapter import BUILTIN_FILES, ENCODER_DIR, adapter_state_from_unet
from renderer.pipeline import JobRenderer
from schemas.job import ResolvedIpAdapter

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("iproot")
    for i, (colour, box) in enumerate([("red", (8, 8, 40, 40)), ("red", (20, 16, 56, 52)), ("blue", (10, 20, 50, 60))]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse(box, fill=colour)
        im.save(d / f"ref{i}.png")
    Image.new("RGB", (64, 64), "black").save(d / "pose.png")
    ImageDraw.Draw(im := Image.open(d / "pose.png").copy()).ellipse((10, 10, 50, 50), outline="white", width=2)
    im.save(d / "pose.png")
    shutil.copytree(REPO / "specs" / "examples" / "loras", d / "specs" / "examples" / "loras")
    return d


def ip(root: Path, images=("ref0.png", "ref1.png"), scale: float = 1.0) -> ResolvedIpAdapter:
    return ResolvedIpAdapter(model="builtin:tiny-ip-adapter", digest="builtin:tiny-ip-adapter@r1",
                             image_encoder="builtin:tiny-ip-adapter", encoder_digest="builtin:tiny-ip-adapter@r1",
                             images=tuple(images), image_digests=tuple(_digest(root / p) for p in images), scale=scale)


@pytest.fixture(scope="module")
def renderer(root):
    return JobRenderer(root)


def px(renderer, j):
    return np.array(renderer.render(j).image).astype(int)


def test_the_builtin_has_the_downloaded_layout_and_loads_through_diffusers():
    from safetensors import safe_open

    folder = builtin_dir("tiny-ip-adapter")
    with safe_open(str(folder / BUILTIN_FILES["tiny-ip-adapter"]), framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
    assert (folder / ENCODER_DIR / "config.json").is_file() and (folder / ENCODER_DIR / "model.safetensors").is_file()
    # diffusers' own loader reads it back; the inverse conversion gives the file's tensors
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_dir("tiny-sdxl"), local_files_only=True)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=BUILTIN_FILES["tiny-ip-adapter"],
                         image_encoder_folder=ENCODER_DIR, local_files_only=True)
    assert pipe.image_encoder is not None  # the encoder folder is a CLIPVisionModelWithProjection
    saved = load_file(str(folder / BUILTIN_FILES["tiny-ip-adapter"]))
    back = adapter_state_from_unet(pipe.unet)
    assert set(back) == set(saved)
    assert all(np.array_equal(back[k].numpy(), saved[k].numpy()) for k in saved)


def test_adapter_changes_pixels_scale_zero_is_exact_and_nothing_leaks(root, renderer):
    base = px(renderer, job())
    with_ip = px(renderer, job(ip_adapter=ip(root)))
    other_refs = px(renderer, job(ip_adapter=ip(root, images=("ref2.png",))))
    zero = px(renderer, job(ip_adapter=ip(root, scale=0.0)))
    after = px(renderer, job())
    assert np.abs(with_ip - base).mean() > 1.0
    assert not np.array_equal(with_ip, other_refs)  # the references matter
    assert np.array_equal(zero, base)  # scale 0: exactly the no-adapter pixels
    assert np.array_equal(after, base)  # unloaded: a later job without the adapter is untouched
    fresh = px(JobRenderer(root), job())
    assert np.array_equal(fresh, base)
    # embeddings are computed once per (encoder, image)
    hits = renderer.ip_adapters.embeds.stats["hits"]
    px(renderer, job(ip_adapter=ip(root)))
    assert renderer.ip_adapters.embeds.stats["hits"] >= hits + 2


def test_reference_order_and_average(root, renderer):
    a = px(renderer, job(ip_adapter=ip(root, images=("ref0.png", "ref1.png"))))
    b = px(renderer, job(ip_adapter=ip(root, images=("ref1.png", "ref0.png"))))
    one = px(renderer, job(ip_adapter=ip(root, images=("ref0.png",))))
    assert np.abs(a - b).max() <= 1  # an average: order changes at most float rounding
    assert not np.array_equal(a, one)


def test_with_lora_and_controlnet(root, renderer):
    lo = (lora(root, "luca_character", 0.8),)
    ctl = (control(root, "pose.png", "canny"),)
    lora_only = px(renderer, job(loras=lo))
    both = px(renderer, job(loras=lo, ip_adapter=ip(root)))
    assert np.abs(both - lora_only).mean() > 1.0
    ctl_only = px(renderer, job(controls=ctl))
    ctl_ip = px(renderer, job(controls=ctl, ip_adapter=ip(root)))
    assert np.abs(ctl_ip - ctl_only).mean() > 1.0
    assert np.array_equal(px(renderer, job(controls=ctl)), ctl_only)  # unloaded for the ControlNet pipe too


def test_bad_adapter_file_is_a_clear_error(root, renderer, tmp_path):
    bad = ip(root).model_copy(update={"model": "missing.safetensors", "digest": "x"})
    with pytest.raises(JobError, match="does not exist"):
        renderer.render(job(ip_adapter=bad))
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(root / "not_ip.safetensors"))
    with pytest.raises(JobError, match="not an IP-Adapter"):
        renderer.render(job(ip_adapter=ip(root).model_copy(update={"model": "not_ip.safetensors", "digest": "y"})))
