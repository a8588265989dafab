"""The real controlnet-aux detectors end to end: every control type through its real detector class.

No annotator weights can be downloaded, so tests/annotator_fixtures.py builds each detector's own
network (controlnet-aux 0.0.10) at random weights and saves it where a user puts the real file,
under the name `from_pretrained(local_dir)` opens. The renders use builtin:tiny-sdxl with
builtin:tiny-controlnet on 64x64 images.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import annotator_fixtures as af
import numpy as np
import pytest
from _render_helpers import control, job
from PIL import Image, ImageDraw

from castbook.cli import main
from core.errors import JobError
from renderer.pipeline import JobRenderer
from schemas.annotators import weights_digest
from schemas.loader import SpecErrors
from schemas.plan import load_plan

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]




TYPES = {"canny": "canny", "pose": "openpose", "depth": "midas", "normal": "normalbae", "seg": "sam"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("annroot")
    (d / ".git").mkdir()
    im = Image.new("RGB", (96, 96), "black")
    ImageDraw.Draw(im).ellipse((30, 10, 66, 46), fill="white")
    ImageDraw.Draw(im).rectangle((36, 46, 60, 90), fill=(120, 60, 200))
    im.save(d / "figure.png")
    ann = d / "annotators"
    for write in (af.write_openpose, af.write_midas, af.write_normalbae, af.write_mobile_sam):
        write(ann)
    return d


@pytest.fixture(scope="module")
def renderer(root):
    return JobRenderer(root)


def ctl(root, type_, folder="annotators", **kw):
    detector = TYPES[type_]
    params = {"points_per_side": 2} if type_ == "seg" else {}  # SAM's grid: 4 points, not 1024
    if type_ == "canny":
        params, folder = {"low_threshold": 100, "high_threshold": 200}, None
    return control(root, "figure.png", type_, preprocess=True, detector=detector, annotator_dir=folder,
                   params=params, **kw)


@pytest.mark.parametrize("type_", list(TYPES))
def test_each_control_type_renders_through_its_real_detector(renderer, root, type_):
    c = ctl(root, type_)
    stats = renderer.stats["control"]
    runs, loads, hits = stats["preprocess_runs"], stats["detector_loads"], stats["map_cache_hits"]
    out = renderer.render(job(controls=(c,)))
    [(name, cmap)] = out.control_maps
    assert cmap.size == (64, 64) and cmap.mode == "RGB" and out.image.size == (64, 64)
    assert name.startswith(c.image_digest[:16] + f"-{c.detector}-") and name.endswith("-64x64.png")
    assert (stats["preprocess_runs"], stats["detector_loads"]) == (runs + 1, loads + 1)
    arr = np.asarray(cmap)
    if type_ in ("depth", "normal", "canny"):
        assert arr.std() > 1  # a real map with structure, not a constant
    if type_ == "seg":
        colours = np.unique(arr.reshape(-1, 3), axis=0)
        assert len(colours) == 1 and colours[0].any()  # one full-image mask, coloured (seeded per image)
    # the second job with the same control reuses the map and the loaded detector
    again = renderer.render(job(seed=5, controls=(c,)))
    assert (stats["preprocess_runs"], stats["detector_loads"], stats["map_cache_hits"]) == (runs + 1, loads + 1, hits + 1)
    assert np.array_equal(np.asarray(again.control_maps[0][1]), arr)


def test_map_cache_is_keyed_by_the_annotator_weights(renderer, root):
    other = root / "annotators-v2"
    af.write_normalbae(other, seed=1)  # the same file name, other weights
    a, b = ctl(root, "normal"), ctl(root, "normal", folder="annotators-v2")
    out_a = renderer.render(job(controls=(a,)))
    runs = renderer.stats["control"]["preprocess_runs"]
    out_b = renderer.render(job(controls=(b,)))
    assert renderer.stats["control"]["preprocess_runs"] == runs + 1  # not served from a's cache entry
    (name_a, map_a), (name_b, map_b) = out_a.control_maps[0], out_b.control_maps[0]
    assert name_a != name_b and not np.array_equal(np.asarray(map_a), np.asarray(map_b))
    # the digest the plan computed (at the edge) is the one used in the cache key
    given = a.model_copy(update={"annotator_digest": weights_digest("normalbae", root / "annotators")})
    renderer.render(job(controls=(given,)))
    assert renderer.stats["control"]["preprocess_runs"] == runs + 1


def _files_digest(folder: Path, detector: str, names: list[str]) -> str:
    sha = hashlib.sha256(detector.encode() + b"\n")
    for n in names:
        sha.update(n.encode() + b"\0" + hashlib.sha256((folder / n).read_bytes()).hexdigest().encode() + b"\n")
    return sha.hexdigest()


SPEC = """\
defaults:
  annotators: {ann}
presets:
  draft: {{width: 64, height: 64, num_inference_steps: 2}}
jobs:
  main: {{scenes: [seg, edges], presets: [draft]}}
scenes:
  seg:
    prompt: a figure
    controls: [{{type: seg, image: figure.png, points_per_side: 2}}]
  edges:
    prompt: a figure
    controls: [{{type: canny, image: figure.png}}]
"""


def _plan(root: Path, ann: str = "annotators", extra: str = ""):
    (root / "spec.yaml").write_text(SPEC.format(ann=ann) + extra)
    return {j.scene: j for j in load_plan([root / "spec.yaml"]).jobs}


def test_job_key_has_the_annotator_digest_only_when_an_annotator_is_used(root, tmp_path):
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    shutil.copy(root / "figure.png", proj)
    af.write_mobile_sam(proj / "ann", seed=0)
    jobs = _plan(proj, "ann")
    seg, edges = jobs["seg"], jobs["edges"]
    assert seg.controls[0].annotator_digest == _files_digest(proj / "ann", "sam", ["mobile_sam.pt"])
    assert seg.pixel_fields()["controls"][0]["annotator"] == seg.controls[0].annotator_digest
    assert "annotator" not in edges.pixel_fields()["controls"][0] and edges.controls[0].annotator_digest is None
    # other weights under the same name: the seg key changes, the canny key does not
    af.write_mobile_sam(proj / "ann", seed=1)
    jobs2 = _plan(proj, "ann")
    assert jobs2["seg"].key != seg.key and jobs2["edges"].key == edges.key


def test_missing_annotator_file_is_a_located_plan_error_naming_the_file(root, tmp_path):
    proj = tmp_path / "proj"
    (proj / "ann").mkdir(parents=True)
    (proj / ".git").mkdir()
    shutil.copy(root / "figure.png", proj)
    with pytest.raises(SpecErrors) as err:
        _plan(proj, "ann", "  pose:\n    prompt: p\n    controls: [{type: pose, image: figure.png}]\n")
    msg = str(err.value)
    lines = msg.splitlines()
    assert len(lines) == 2, msg  # one located error per control
    assert lines[0].startswith("spec.yaml:") and "mobile_sam.pt" in lines[1] + lines[0]
    assert "sam_vit_h_4b8939.pth" in msg and "body_pose_model.pth" in msg
    assert "pickle" in msg and "ann" in msg


@pytest.mark.parametrize("type_,detector,why", [("pose", "dwpose", "mmpose.*use detector: openpose"),
                                                ("depth", "zoe", "not test.*use detector: midas"),
                                                ("depth", "leres", "command line.*use detector: midas")])
def test_unsupported_detectors_are_refused_at_validation(root, tmp_path, type_, detector, why):
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    shutil.copy(root / "figure.png", proj)
    (proj / "spec.yaml").write_text(
        f"scenes:\n  s:\n    prompt: p\n    controls: [{{type: {type_}, image: figure.png, detector: {detector}}}]\n"
        "jobs:\n  j: {scenes: [s]}\n")
    with pytest.raises(SpecErrors, match=f"spec.yaml:4:.*detector '{detector}' is not supported.*{why}"):
        load_plan([proj / "spec.yaml"])


@pytest.mark.parametrize("bad", ["garbage", "other-network"])
def test_a_wrong_annotator_file_names_the_file_expected(renderer, root, tmp_path, bad):
    wrong = root / f"wrong-{bad}"
    wrong.mkdir()
    if bad == "garbage":
        (wrong / "scannet.pt").write_bytes(b"not a checkpoint")
    else:  # a real annotator file of another detector under scannet.pt's name
        shutil.copy(root / "annotators" / "mobile_sam.pt", wrong / "scannet.pt")
    with pytest.raises(JobError) as err:
        renderer.render(job(controls=(ctl(root, "normal", folder=wrong.name),)))
    msg = str(err.value)
    assert "scannet.pt" in msg and "normalbae" in msg and str(wrong) in msg and "lllyasviel/Annotators" in msg


def test_dataset_prepare_poses_runs_the_real_openpose(root, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((128, 128), Image.Resampling.NEAREST).save(raw / f"img{i}.png")
    out = tmp_path / "out"
    rc = main(["dataset", "prepare", str(raw), "--out", str(out), "--min-size", "64", "--resolution", "128",
               "--poses", "--annotator", str(root / "annotators"), "--min-confidence", "0"])
    assert rc == 0, capsys.readouterr().err
    poses = json.loads((out / "poses.json").read_text())
    assert poses["counts"]["images"] == 3 and (out / "poses.html").is_file()
    assert poses["options"]["annotator"] == str(root / "annotators")
    for rec in poses["files"]:  # each image went through the detector: a cluster or a reason
        assert (rec["cluster"] is None) != (rec["reason"] is None)
