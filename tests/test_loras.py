"""LoRA stacks on builtin:tiny-sdxl with the committed example LoRA files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _render_helpers import job, lora
from safetensors.torch import load_file, save_file

from core.errors import JobError
from renderer.pipeline import JobRenderer
from schemas.job import ResolvedLora


@pytest.fixture(scope="module")
def renderer(repo_root):
    return JobRenderer(repo_root)


@pytest.fixture(scope="module")
def base(renderer):
    return np.array(renderer.render(job()).image)


def px(renderer, j):
    return np.array(renderer.render(j).image)


def test_weight_zero_is_base_and_weight_08_changes_image(renderer, base, repo_root):
    zero = px(renderer, job(loras=(lora(repo_root, "luca_character", 0.0),)))
    strong = px(renderer, job(loras=(lora(repo_root, "luca_character", 0.8),)))
    assert np.array_equal(zero, base)
    assert np.abs(strong.astype(int) - base).mean() > 1.0


def test_stack_order_does_not_change_pixels(renderer, repo_root):
    a = lora(repo_root, "luca_character", 0.7)
    b = lora(repo_root, "portorosso_bg", 0.5)
    c = lora(repo_root, "luca_happy", 0.9)
    one = px(renderer, job(loras=(a, b, c)))
    two = px(renderer, job(loras=(c, a, b)))
    assert np.array_equal(one, two)
    assert not np.array_equal(one, px(renderer, job(loras=(a,))))


def test_kohya_file_renders_like_its_diffusers_twin(renderer, repo_root):
    diff = px(renderer, job(loras=(lora(repo_root, "luca_character", 0.8),)))
    kohya = px(renderer, job(loras=(lora(repo_root, "luca_kohya", 0.8, file="luca_character_kohya"),)))
    assert np.array_equal(diff, kohya)


def test_no_lora_job_after_lora_job_is_the_base_image(renderer, base, repo_root):
    px(renderer, job(loras=(lora(repo_root, "luca_happy", 1.0),)))
    assert np.array_equal(px(renderer, job()), base)


def test_each_file_is_loaded_once_however_many_jobs(repo_root):
    r = JobRenderer(repo_root)
    stacks = [("luca_character",), ("portorosso_bg", "luca_character"), (), ("luca_happy",), ("luca_character",)]
    for seed, names in enumerate(stacks):
        r.render(job(seed=seed, num_inference_steps=1, loras=tuple(lora(repo_root, n) for n in names)))
    assert r.stats["lora_loads"] == {"luca_character": 1, "portorosso_bg": 1, "luca_happy": 1}
    assert r.stats["model_loads"] == 1


def test_lru_cap_deletes_unused_adapters_and_reloads_them(repo_root):
    r = JobRenderer(repo_root, max_loras=2)
    for n in ("luca_character", "portorosso_bg", "luca_happy", "luca_character"):
        r.render(job(num_inference_steps=1, loras=(lora(repo_root, n),)))
    adapters = {a for names in r.pipe.get_list_adapters().values() for a in names}
    assert len(adapters) <= 2
    assert r.stats["lora_loads"]["luca_character"] == 2  # evicted by luca_happy, then loaded again


def test_text_encoder_only_lora_changes_the_image(renderer, base, repo_root, tmp_path):
    sd = load_file(str(repo_root / "specs/examples/loras/luca_character.safetensors"))
    te = {k: v for k, v in sd.items() if k.startswith("text_encoder")}
    assert te and len(te) < len(sd)
    save_file(te, str(tmp_path / "te_only.safetensors"))
    l = ResolvedLora(name="te_only", path=str(tmp_path / "te_only.safetensors"), digest="x", weight=1.0, kind="style")
    assert np.abs(px(renderer, job(loras=(l,))).astype(int) - base).mean() > 0.5


def test_lora_matching_nothing_is_a_job_error_naming_the_file(renderer, base, tmp_path):
    path = tmp_path / "other_model.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(32, 4)}, str(path))
    l = ResolvedLora(name="other_model", path=str(path), digest="x", weight=1.0, kind="style")
    with pytest.raises(JobError, match="other_model.safetensors") as err:
        renderer.render(job(loras=(l,)))
    assert "base model" in str(err.value)
    # the failed adapter left nothing behind
    assert np.array_equal(px(renderer, job()), base)


def test_lora_with_unknown_keys_only_is_a_job_error(renderer, tmp_path):
    path = tmp_path / "junk.safetensors"
    save_file({"foo.bar.lora_A.weight": torch.zeros(4, 32), "foo.bar.lora_B.weight": torch.zeros(32, 4)}, str(path))
    l = ResolvedLora(name="junk", path=str(path), digest="x", weight=1.0, kind="style")
    with pytest.raises(JobError, match="junk.safetensors"):
        renderer.render(job(loras=(l,)))


def test_pickle_lora_is_refused_before_opening(renderer, tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(_evil_pickle(sentinel))
    l = ResolvedLora(name="evil", path=str(path), digest="x", weight=1.0, kind="style")
    with pytest.raises(JobError, match="pickle"):
        renderer.render(job(loras=(l,)))
    assert not sentinel.exists()


def _evil_pickle(sentinel) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    return pickle.dumps(Evil())
