"""JobRenderer: determinism, parity with plain diffusers, schedulers, OOM fallback, NaN detection."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _render_helpers import job

from core.errors import JobError
from renderer import model_export
from renderer.pipeline import JobRenderer
from schemas.job import ResolvedModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("piperoot")
    model_export.export_builtin("builtin:tiny-sdxl", root / "tiny")
    return root


@pytest.fixture(scope="module")
def renderer(exported):
    return JobRenderer(exported)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_other_seed_differs(renderer):
    a = renderer.render(job(seed=7))
    b = renderer.render(job(seed=7))
    c = renderer.render(job(seed=8))
    assert png_bytes(a.image) == png_bytes(b.image)
    assert png_bytes(a.image) != png_bytes(c.image)
    assert a.image.size == (64, 64) and a.device == "cpu" and a.dtype == "fp32" and a.fallback is None
    assert a.peak_memory_bytes > 50_000_000
    assert set(a.timings) >= {"model_load_s", "lora_load_s", "lora_switch_s", "control_s", "denoise_s", "total_s"}
    assert renderer.stats["model_loads"] == 1


def test_parity_with_plain_diffusers_on_the_exported_folder(renderer, exported):
    from diffusers import StableDiffusionXLPipeline

    j = job(seed=3, prompt="luca running on the pier", negative_prompt="", guidance_scale=6.5, num_inference_steps=3,
            width=64, height=48)
    ours = np.array(renderer.render(j).image)
    plain = StableDiffusionXLPipeline.from_pretrained(exported / "tiny")
    theirs = plain(prompt=j.prompt, negative_prompt=j.negative_prompt, num_inference_steps=j.num_inference_steps,
                   guidance_scale=j.guidance_scale, width=j.width, height=j.height,
                   generator=torch.Generator("cpu").manual_seed(j.seed)).images[0]
    assert np.array_equal(ours, np.array(theirs))
    # the same weights as a local diffusers folder render the same pixels
    folder = ResolvedModel(ref="tiny", kind="diffusers", digest="sha256:tiny-folder")
    other = JobRenderer(exported)
    assert np.array_equal(np.array(other.render(j.model_copy(update={"base_model": folder})).image), ours)


def test_every_scheduler_runs_and_options_do_not_leak(renderer):
    from schemas.schedulers import SCHEDULERS

    images = {}
    for name in SCHEDULERS:
        images[name] = np.array(renderer.render(job(scheduler=name)).image)
        assert images[name].std() > 1.0, name
    assert not np.array_equal(images["euler"], images["euler_a"])
    assert not np.array_equal(images["dpmpp_2m"], images["dpmpp_2m_karras"])
    # after karras, plain euler is the same as before (options come from the base config each time)
    assert np.array_equal(np.array(renderer.render(job(scheduler="euler")).image), images["euler"])
    from renderer.png_metadata import A1111_SAMPLERS

    assert set(A1111_SAMPLERS) == set(SCHEDULERS)
    # Trailing spacing is a different sampler schedule: same class as euler, other pixels.
    assert not np.array_equal(images["euler"], images["euler_trailing"])
    assert not np.array_equal(images["lcm"], images["tcd"])
    renderer.render(job(scheduler="lcm"))
    assert type(renderer.pipe.scheduler).__name__ == "LCMScheduler"  # the name builds what it promises
    renderer.render(job(scheduler="euler_trailing"))
    assert renderer.pipe.scheduler.config.timestep_spacing == "trailing"


def test_oom_retries_once_with_the_fallback(exported, renderer, monkeypatch):
    normal = np.array(renderer.render(job()).image)
    r = JobRenderer(exported, inject_oom=1)
    out = r.render(job())
    assert out.fallback == "vae_tiling" and r.stats["oom_fallbacks"] == 1
    assert np.array_equal(np.array(out.image), normal)  # 64 px is below the VAE tile size: same pixels
    monkeypatch.setenv("CASTBOOK_INJECT_OOM", "2")
    r2 = JobRenderer(exported)
    with pytest.raises(JobError, match="out of GPU memory even with vae_tiling"):
        r2.render(job())


def test_nan_image_is_a_job_error(exported, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    shutil.copytree(exported / "tiny", tmp_path / "nan")
    vae = AutoencoderKL.from_pretrained(tmp_path / "nan" / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    vae.save_pretrained(tmp_path / "nan" / "vae")
    r = JobRenderer(tmp_path)
    j = job(base_model=ResolvedModel(ref="nan", kind="diffusers", digest="sha256:nan"))
    with pytest.raises(JobError, match="NaN"):
        r.render(j)


def test_base_model_switch_unloads_the_previous_one(renderer):
    other = ResolvedModel(ref="tiny", kind="diffusers", digest="sha256:other")
    before = renderer.stats["model_loads"]
    renderer.render(job(base_model=other))
    renderer.render(job())
    assert renderer.stats["model_loads"] == before + 2
    assert renderer._pipe_key[0] == "builtin:tiny-sdxl@1"


def test_bad_size_and_fp16_on_cpu_fail_before_loading(exported):
    r = JobRenderer(exported)
    with pytest.raises(JobError, match="multiples of 8"):
        r.render(job(width=60))
    with pytest.raises(JobError, match="fp16"):
        r.render(job(dtype="fp16"))
    assert r.stats["model_loads"] == 0


def test_load_base_model_up_front_is_reused_by_render(exported):
    r = JobRenderer(exported)
    r.load_base_model(job().base_model, "auto")
    out = r.render(job())
    assert r.stats["model_loads"] == 1 and out.image.size == (64, 64)


def test_a_vae_override_replaces_the_decoder(exported):
    """performance.vae: the base model's own VAE folder gives the same pixels; other weights differ."""
    from diffusers import AutoencoderKL

    from renderer.png_metadata import format_parameters

    other = AutoencoderKL.from_pretrained(exported / "tiny" / "vae")
    with torch.no_grad():
        other.decoder.conv_out.weight.mul_(0.5)
    other.save_pretrained(exported / "vae-other", safe_serialization=True)
    r = JobRenderer(exported)
    plain = np.array(r.render(job(seed=5)).image)
    same = ResolvedModel(ref="tiny/vae", kind="diffusers", digest="sha256:same")
    swapped = ResolvedModel(ref="vae-other", kind="diffusers", digest="sha256:other")
    assert np.array_equal(np.array(r.render(job(seed=5, vae=same)).image), plain)
    changed = r.render(job(seed=5, vae=swapped))
    assert not np.array_equal(np.array(changed.image), plain)
    assert r.stats["model_loads"] == 3  # a different VAE is a different pipeline
    assert "VAE: vae-other" in format_parameters(job(seed=5, vae=swapped))
    with pytest.raises(JobError, match="no model_index.json or config.json"):
        r.render(job(seed=5, vae=ResolvedModel(ref=".", kind="diffusers", digest="sha256:x")))


def test_in_process_actor_returns_a_typed_result_and_leaves_process_settings_alone(exported):
    """`--executor local`, `castbook reproduce` and `castbook bench` run the actor in the caller's
    process: it must not change torch threads or the libraries' progress bars there."""
    import diffusers.utils.logging as dl

    from renderer.actor import RenderActor, quiet_loading_bars
    from renderer.png_metadata import read_castbook_chunk

    before = (torch.get_num_threads(), dl.is_progress_bar_enabled())
    j = job(seed=3)
    actor = RenderActor(root=exported, base_model=j.base_model)
    result = actor.render(job=j)
    assert result.ok and result.key == j.key and result.device == "cpu" and result.seconds > 0
    assert read_castbook_chunk(result.png)["key"] == j.key
    failed = actor.render(job=job(width=60))  # not a multiple of 8: an error in the result, not a raise
    assert not failed.ok and failed.png is None and "60" in failed.error
    assert (torch.get_num_threads(), dl.is_progress_bar_enabled()) == before
    with quiet_loading_bars():
        assert not dl.is_progress_bar_enabled()
    assert dl.is_progress_bar_enabled() == before[1]
