"""Control images and ControlNets (builtin:tiny-controlnet) on builtin:tiny-sdxl."""

from __future__ import annotations

import numpy as np
import pytest
from _render_helpers import control, job
from PIL import Image, ImageDraw

from core.errors import JobError
from renderer.pipeline import JobRenderer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("ctlroot")
    # a figure-like drawing (edges for canny) and a blocky "depth" map, at a size != the job's
    im = Image.new("RGB", (96, 96), "black")
    ImageDraw.Draw(im).ellipse((30, 10, 66, 46), outline="white", width=3)
    ImageDraw.Draw(im).rectangle((36, 46, 60, 90), outline="white", width=3)
    im.save(d / "pose.png")
    depth = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(depth).rectangle((16, 16, 48, 48), fill=(220, 220, 220))
    depth.save(d / "depth.png")
    (d / "annotators").mkdir()
    return d


@pytest.fixture(scope="module")
def renderer(root):
    return JobRenderer(root)


@pytest.fixture(scope="module")
def base(renderer):
    return np.array(renderer.render(job()).image)


def px(renderer, j):
    return np.array(renderer.render(j).image)


def test_control_changes_the_image_and_depends_on_the_map(renderer, root, base):
    a = px(renderer, job(controls=(control(root, "pose.png", "canny"),)))
    b = px(renderer, job(controls=(control(root, "depth.png", "depth"),)))
    assert np.abs(a.astype(int) - base).mean() > 1.0
    assert not np.array_equal(a, b)
    # without controls again: exactly the base image
    assert np.array_equal(px(renderer, job()), base)


def test_two_controls_use_multicontrolnet_with_per_control_scales(renderer, root):
    one = px(renderer, job(controls=(control(root, "pose.png", "canny"),)))
    two = px(renderer, job(controls=(control(root, "pose.png", "canny"), control(root, "depth.png", "depth", scale=0.7))))
    two_weaker = px(renderer, job(controls=(control(root, "pose.png", "canny"), control(root, "depth.png", "depth", scale=0.2))))
    assert not np.array_equal(one, two)
    assert not np.array_equal(two, two_weaker)
    assert renderer.stats["controlnet_loads"] == 1  # the same ControlNet model is loaded once


def test_canny_preprocess_returns_a_cached_map_with_a_stable_name(renderer, root):
    c = control(root, "pose.png", "canny", preprocess=True, params={"low_threshold": 50, "high_threshold": 150})
    out1 = renderer.render(job(controls=(c,)))
    runs = renderer.stats["control"]["preprocess_runs"]
    out2 = renderer.render(job(seed=2, controls=(c,)))
    assert renderer.stats["control"]["preprocess_runs"] == runs  # second job reused the map
    [(name, cmap)] = out1.control_maps
    assert name == out2.control_maps[0][0] and name.endswith("-canny-" + name.split("-")[2] + "-64x64.png")
    assert name.startswith(c.image_digest[:16])
    assert cmap.size == (64, 64)
    arr = np.array(cmap)
    assert set(np.unique(arr)) - {0, 255} or (arr > 0).any()  # edges were found
    raw = px(renderer, job(controls=(control(root, "pose.png", "canny"),)))
    assert not np.array_equal(np.array(out1.image), raw)  # the detector output, not the raw image, was used


def test_missing_annotator_weights_name_the_file_and_the_folder(renderer, root):
    c = control(root, "pose.png", "pose", preprocess=True, detector="openpose", annotator_dir="annotators")
    with pytest.raises(JobError) as err:
        renderer.render(job(controls=(c,)))
    msg = str(err.value)
    assert "body_pose_model.pth" in msg and str(root / "annotators") in msg and "annotator: DIR" in msg
    c2 = control(root, "depth.png", "depth", preprocess=True, detector="midas")
    with pytest.raises(JobError, match="dpt_hybrid-midas-501f0c75.pt.*none is configured"):
        renderer.render(job(controls=(c2,)))


def test_missing_control_image_is_a_job_error(renderer, root):
    c = control(root, "pose.png", "canny").model_copy(update={"image": "nope.png"})
    with pytest.raises(JobError, match="nope.png"):
        renderer.render(job(controls=(c,)))
