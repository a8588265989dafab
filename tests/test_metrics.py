"""reports.metrics: CLIP-I / CLIP-T on the real open_clip tiny model, ceiling, embedding cache."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest

from reports import metrics
from reports.metrics import ClipScorer, ScoringError, ceiling, clip_i, cosine
from tests.reports_fixtures import castbook_home, draw, save_png  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("castbook_home")


@pytest.fixture
def pics(tmp_path):
    return {
        "circle": save_png(draw("circle", 0), tmp_path / "circle.png"),
        "circle_copy": save_png(draw("circle", 0), tmp_path / "copy" / "circle.png"),
        "circle_b": save_png(draw("circle", 2), tmp_path / "circle_b.png"),
        "stripes": save_png(draw("stripes", 0), tmp_path / "stripes.png"),
        "checker": save_png(draw("checker", 0), tmp_path / "checker.png"),
    }


def test_tiny_clip_is_built_once_and_loaded_from_its_file():
    config, weights = metrics.ensure_tiny_clip()
    assert weights.suffix == ".safetensors" and weights.is_file() and config.is_file()
    mtime = weights.stat().st_mtime_ns
    assert metrics.ensure_tiny_clip() == (config, weights)
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt
    from safetensors.numpy import load_file

    n_params = sum(v.size for k, v in load_file(str(weights)).items())
    assert 1_000_000 < n_params < 2_500_000
    s = ClipScorer("builtin:tiny-clip")
    assert s.weights == weights
    assert s.identity.startswith("builtin:tiny-clip@1:")


def test_image_vs_itself_scores_one_and_a_different_image_lower(pics, tmp_path):
    s = ClipScorer("builtin:tiny-clip", cache_dir=tmp_path / "cache")
    e = s.embed_images([pics["circle"], pics["circle_copy"], pics["stripes"], pics["checker"]])
    assert e.shape[0] == 4
    assert cosine(e[0], e[0]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(e[0], e[1]) == pytest.approx(1.0, abs=1e-6)  # same pixels, other file
    assert cosine(e[0], e[2]) < 0.999
    assert cosine(e[0], e[3]) < 0.999
    mean, best = clip_i(e[0], np.stack([e[1], e[2]]))
    assert best == pytest.approx(1.0, abs=1e-6)
    assert mean == pytest.approx((1.0 + cosine(e[0], e[2])) / 2, abs=1e-6)
    assert mean < best


def test_clip_t_is_cosine_of_image_and_prompt(pics, tmp_path):
    s = ClipScorer("builtin:tiny-clip", cache_dir=tmp_path / "cache")
    img = s.embed_images([pics["circle"]])[0]
    txt = s.embed_texts(["a red disc", "blue stripes"])
    assert txt.shape[0] == 2
    assert np.linalg.norm(txt[0]) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(txt[0], txt[1])
    assert -1.0 <= cosine(img, txt[0]) <= 1.0


def test_ceiling_is_mean_pairwise_reference_similarity(pics, tmp_path):
    s = ClipScorer("builtin:tiny-clip", cache_dir=tmp_path / "cache")
    refs = s.embed_images([pics["circle"], pics["circle_b"], pics["stripes"]])
    pairs = [float(np.dot(refs[i], refs[j]) / np.linalg.norm(refs[i]) / np.linalg.norm(refs[j]))
             for i, j in itertools.combinations(range(3), 2)]
    assert ceiling(refs) == pytest.approx(sum(pairs) / 3, abs=1e-6)
    assert ceiling(refs[:1]) is None  # one reference has no pairs


def test_cache_returns_identical_vectors_and_skips_the_model(pics, tmp_path):
    cache = tmp_path / "cache"
    first = ClipScorer("builtin:tiny-clip", cache_dir=cache)
    a = first.embed_images([pics["circle"], pics["stripes"]])
    ta = first.embed_texts(["a red disc"])
    assert first.stats.image_model_calls == 2 and first.stats.text_model_calls == 1
    assert first.stats.model_loads == 1

    second = ClipScorer("builtin:tiny-clip", cache_dir=cache)  # a new process would look like this
    b = second.embed_images([pics["circle"], pics["stripes"]])
    tb = second.embed_texts(["a red disc"])
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    assert second.stats.image_model_calls == 0 and second.stats.text_model_calls == 0
    assert second.stats.image_cache_hits == 2 and second.stats.text_cache_hits == 1
    assert second.stats.model_loads == 0  # re-scoring costs no model load at all

    # Same pixels under another path hit the cache too: the key is the file digest.
    c = second.embed_images([pics["circle_copy"]])
    assert np.array_equal(c[0], a[0]) and second.stats.image_model_calls == 0


def test_cache_is_per_model_identity(pics, tmp_path):
    cache = tmp_path / "cache"
    ClipScorer("builtin:tiny-clip", cache_dir=cache).embed_images([pics["circle"]])
    # A "real" open_clip model loaded from a local safetensors file (the tiny weights under
    # another path): different identity, so the cache must not be shared.
    _, weights = metrics.ensure_tiny_clip()
    other_weights = tmp_path / "copy.safetensors"
    shutil.copy(weights, other_weights)
    other = ClipScorer(metrics.TINY_CLIP_NAME, weights=other_weights, cache_dir=cache)
    assert other.identity != ClipScorer("builtin:tiny-clip").identity
    e = other.embed_images([pics["circle"]])
    assert other.stats.image_model_calls == 1 and other.stats.model_loads == 1
    assert np.linalg.norm(e[0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("model, weights, match", [
    ("ViT-L-14", None, "needs scoring.weights"),
    ("ViT-L-14", "model.pt", "not a .safetensors file"),
    ("ViT-L-14", "missing.safetensors", "does not exist"),
    ("hf-hub:laion/CLIP", None, "not supported"),
    ("builtin:tiny-clip", "x.safetensors", "need no weights"),
])
def test_bad_scoring_config_is_a_clear_error(model, weights, match, tmp_path):
    with pytest.raises(ScoringError, match=match):
        ClipScorer(model, weights=None if weights is None else tmp_path / weights)


def test_dino_scores_from_a_local_folder(pics, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    folder = tmp_path / "dino"
    transformers.Dinov2Model(cfg).save_pretrained(folder, safe_serialization=True)
    d = metrics.DinoScorer(folder, cache_dir=tmp_path / "cache")
    e = d.embed_images([pics["circle"], pics["circle_copy"], pics["stripes"]])
    assert cosine(e[0], e[1]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(e[0], e[2]) < 0.9999
    again = metrics.DinoScorer(folder, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.embed_images([pics["stripes"]])[0], e[2])
    assert again.stats.image_model_calls == 0 and again.stats.model_loads == 0
