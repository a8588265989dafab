"""Pose clustering on synthetic OpenPose keypoints (no annotator weights on this machine)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trainer.poses import (
    PoseOptions,
    best_detection,
    cluster_poses,
    contact_sheet,
    draw_pose_map,
    features,
    kmeans,
    normalize_keypoints,
    prepare_poses,
    silhouette,
)
from trainer.prepare import PrepareError

# Three template poses in a 100x200 frame: standing, arms up, sitting (knees forward).
BASE = np.array([[50, 20], [50, 40], [35, 40], [30, 70], [28, 100], [65, 40], [70, 70], [72, 100], [40, 110],
                 [40, 150], [40, 190], [60, 110], [60, 150], [60, 190], [45, 15], [55, 15], [40, 18], [60, 18]],
                dtype=float)


def template(kind: int) -> np.ndarray:
    p = BASE.copy()
    if kind == 1:  # arms up
        p[[3, 4, 6, 7], 1] = [15, -10, 15, -10]
    if kind == 2:  # sitting: knees and ankles forward
        p[[9, 12], 0] += 40
        p[[10, 13], 1] -= 40
        p[[9, 12], 1] -= 40
    return p


def pose(kind: int, rng, *, scale=1.0, shift=(0.0, 0.0), score=0.9) -> np.ndarray:
    xy = template(kind) * scale + np.array(shift) + rng.normal(0, 1.5, (18, 2))
    return np.column_stack([xy, np.full(18, score)])


def synthetic(n_per=6, seed=0):
    rng = np.random.default_rng(seed)
    poses, truth = [], []
    for kind in range(3):
        for _ in range(n_per):
            poses.append(pose(kind, rng, scale=rng.uniform(0.5, 2), shift=rng.uniform(-50, 50, 2)))
            truth.append(kind)
    return poses, np.array(truth)


def same_partition(a, b) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_normalize_is_scale_and_translation_invariant():
    rng = np.random.default_rng(1)
    p = pose(0, rng)
    q = p.copy()
    q[:, :2] = q[:, :2] * 3 + 17
    np.testing.assert_allclose(normalize_keypoints(p), normalize_keypoints(q), atol=1e-9)
    n = normalize_keypoints(p)
    assert np.linalg.norm(n[1] - (n[8] + n[11]) / 2) == pytest.approx(1.0)  # torso length 1
    missing = p.copy()
    missing[1] = np.nan
    assert normalize_keypoints(missing) is None


def test_kmeans_recovers_known_clusters_with_given_k():
    poses, truth = synthetic()
    x = features([normalize_keypoints(p) for p in poses])
    labels, _ = kmeans(x, 3, seed=0)
    assert same_partition(labels, truth)
    with pytest.raises(PrepareError, match="--clusters"):
        kmeans(x, len(x) + 1)


def test_silhouette_chooses_k_three():
    poses, truth = synthetic()
    x = features([normalize_keypoints(p) for p in poses])
    labels, k, scores = cluster_poses(x, None, seed=0)
    assert k == 3, scores
    assert set(scores) == set(range(2, 9))
    assert same_partition(labels, truth)
    assert silhouette(x, truth) > 0.5 > silhouette(x, np.arange(len(x)) % 3)


def test_confidence_filter():
    rng = np.random.default_rng(2)
    weak, strong = pose(0, rng, score=0.5), pose(1, rng, score=0.8)
    det, conf = best_detection([weak, strong], 0.7)
    assert det is strong and conf == pytest.approx(0.8)
    det, conf = best_detection([weak], 0.7)
    assert det is None and conf == pytest.approx(0.5)
    assert best_detection([], 0.7) == (None, 0.0)


def test_missing_annotator_error(tmp_path):
    with pytest.raises(PrepareError, match="body_pose_model.pth"):
        prepare_poses(tmp_path, PoseOptions(annotator=tmp_path / "nope"))
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "body_pose_model.pth").write_bytes(b"")
    with pytest.raises(PrepareError, match="hand_pose_model.pth, facenet.pth missing from --annotator"):
        prepare_poses(tmp_path, PoseOptions(annotator=tmp_path / "ann"))


def test_cli_checks_annotator_before_any_work(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    Image.new("RGB", (300, 300)).save(src / "a.png")
    r = subprocess.run([sys.executable, "-m", "castbook", "dataset", "prepare", str(src), "--out", str(tmp_path / "o"),
                        "--poses", "--annotator", str(tmp_path / "ann")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "body_pose_model.pth" in r.stderr and str(tmp_path / "ann") in r.stderr
    assert not (tmp_path / "o").exists()


def test_prepare_poses_pipeline_with_synthetic_detector(tmp_path):
    # Real pipeline (files, clustering, HTML) with a detector that returns known keypoints per image.
    poses, truth = synthetic(n_per=3)
    by_name = {}
    for i, p in enumerate(poses):
        Image.new("RGB", (64, 64), (i * 10, 0, 0)).save(tmp_path / f"img{i:02d}.png")
        by_name[(i * 10, 0, 0)] = [p]
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "<weak>.png")
    by_name[(1, 2, 3)] = [pose(0, np.random.default_rng(0), score=0.3)]
    summary = prepare_poses(tmp_path, PoseOptions(clusters=3), detector=lambda im: by_name[im.getpixel((0, 0))])
    assert summary["k"] == 3 and summary["counts"] == {"images": 10, "posed": 9, "no_pose": 1}
    labels = np.array([f["cluster"] for f in summary["files"] if f["cluster"] is not None])
    assert same_partition(labels, truth)
    assert (tmp_path / "poses" / "img00.txt").read_text() == f"pose cluster {labels[0]}\n"
    assert Image.open(tmp_path / "poses" / "img00.png").size == (64, 64)
    for c in range(3):
        assert Image.open(tmp_path / "poses" / f"cluster_{c}.png").size == (3 * 128, 128)
    html = (tmp_path / "poses.html").read_text()
    assert "&lt;weak&gt;.png" in html and "<weak>" not in html
    assert json.loads((tmp_path / "poses.json").read_text())["counts"]["posed"] == 9


def test_pose_map_and_contact_sheet():
    kp = np.full((18, 3), np.nan)
    kp[1], kp[8] = (10, 10, 1), (10, 50, 1)
    im = draw_pose_map(kp, (64, 64))
    assert im.getpixel((10, 30)) != (0, 0, 0) and im.getpixel((50, 30)) == (0, 0, 0)
    sheet = contact_sheet([im] * 7, thumb=32, cols=3)
    assert sheet.size == (96, 96)
