"""The detail pass with a detector model from a local folder (renderer/detect.py `model_box_mask`).

The detector is a real transformers `YolosForObjectDetection`, built tiny from config and saved with
`save_pretrained` as a user would keep a downloaded face detector. Its prediction heads are set so
that every detection token says "face" at a known box: random weights would find random boxes, and
the test must know where the pass may paint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _render_helpers import job
from PIL import Image

from core.digests import folder_digest
from core.errors import JobError
from renderer.detect import model_box_mask
from renderer.pipeline import JobRenderer
from schemas.job import ResolvedModel
from schemas.loader import SpecErrors
from schemas.passes import ResolvedDetail, ResolvedPasses
from schemas.plan import load_plan

TOY = ResolvedModel(ref="builtin:toy-sdxl", kind="builtin", digest="builtin:toy-sdxl@r2")
# The face box every detection token reports: centre (0.5, 0.625), size (0.5, 0.375) of the image,
# so (16, 28) - (48, 52) on a 64 x 64 image.
BOX = (0.5, 0.625, 0.5, 0.375)
BOX_PIXELS = (16, 28, 48, 52)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    root = tmp_path_factory.mktemp("detector")
    (root / "pyproject.toml").write_text("")
    torch.manual_seed(0)
    config = YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         image_size=[64, 64], patch_size=16, num_detection_tokens=3, num_labels=2,
                         id2label={0: "person", 1: "face"}, label2id={"person": 0, "face": 1})
    model = YolosForObjectDetection(config).eval()
    with torch.no_grad():
        classes, boxes = model.class_labels_classifier.layers[-1], model.bbox_predictor.layers[-1]
        classes.weight.zero_()
        classes.bias.copy_(torch.tensor([-6.0, 6.0, -6.0]))  # person, face, no object
        boxes.weight.zero_()
        boxes.bias.copy_(torch.logit(torch.tensor(BOX)))  # the head ends in a sigmoid
    model.save_pretrained(root / "detectors" / "face", safe_serialization=True)
    YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "detectors" / "face")
    return root


def test_the_best_box_of_the_asked_label_becomes_the_mask(project):
    image = Image.new("RGB", (64, 64), (200, 180, 150))
    mask = model_box_mask(project / "detectors" / "face", image, "face", 0.3)
    left, top, right, bottom = BOX_PIXELS
    assert mask.shape == (64, 64) and mask[top:bottom, left:right].all() and mask.sum() == (right - left) * (bottom - top)
    assert model_box_mask(project / "detectors" / "face", image, None, 0.3) is not None  # any label
    assert model_box_mask(project / "detectors" / "face", image, "person", 0.3) is None  # none above confidence
    with pytest.raises(JobError, match="no class 'dog'; its classes: face, person"):
        model_box_mask(project / "detectors" / "face", image, "dog", 0.3)


def test_detail_pass_repaints_only_around_the_detected_box(project):
    renderer = JobRenderer(project)
    detail = ResolvedDetail(target="character", detector="detectors/face", detector_digest="x", label="face",
                            confidence=0.3, padding=4, strength=0.5, steps=10, prompt=None)
    plain = job(base_model=TOY, prompt="a red star character with blue eyes on the beach", negative_prompt="",
                num_inference_steps=10, seed=5)
    first = np.asarray(renderer.render(plain).image, dtype=int)
    detailed = np.asarray(renderer.render(plain.model_copy(update={"passes": ResolvedPasses(detail=detail)})).image,
                          dtype=int)
    left, top, right, bottom = BOX_PIXELS
    pad = detail.padding
    outside = np.ones((64, 64), dtype=bool)
    outside[top - pad:bottom + pad, left - pad:right + pad] = False
    assert np.array_equal(detailed[outside], first[outside])  # untouched beyond the padded box
    assert np.abs(detailed - first)[top:bottom, left:right].max() > 10  # the box was re-rendered
    # nothing detected (a label the detector never reports confidently): the image is kept
    kept = detail.model_copy(update={"label": "person"})
    same = np.asarray(renderer.render(plain.model_copy(update={"passes": ResolvedPasses(detail=kept)})).image, dtype=int)
    assert np.array_equal(same, first)


SPEC = """
defaults: {base_model: builtin:toy-sdxl, preset: p}
presets:
  p: {extends: standard, width: 64, height: 64, num_inference_steps: 4}
scenes:
  beach: {prompt: "a red star character on the beach"}
jobs:
  main:
    scenes: [beach]
    detail: {detector: %s, label: face, strength: 0.3}
"""


def test_a_spec_names_the_detector_folder_and_its_digest_keys_the_job(project):
    (project / "spec.yaml").write_text(SPEC % "detectors/face")
    detail = load_plan([project / "spec.yaml"]).jobs[0].passes.detail
    assert detail.detector == "detectors/face" and detail.detector_digest == folder_digest(project / "detectors" / "face")
    for bad, message in (("detectors/yolov8n-face.pt", "Ultralytics .pt detectors are pickles"),
                         ("detectors/missing", "missing")):
        (project / "spec.yaml").write_text(SPEC % bad)
        with pytest.raises(SpecErrors, match=message):
            load_plan([project / "spec.yaml"])
