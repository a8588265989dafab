"""castbook dataset prepare: duplicates, blur, size, aspect, caption audit; input untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from trainer.prepare import PrepareError, PrepareOptions, dhash, laplacian_variance, prepare_dataset


def blocks(seed: int, size=(64, 64)) -> Image.Image:
    """Random 8x8 grey/colour blocks, upscaled with hard edges: sharp and distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


@pytest.fixture
def raw(tmp_path) -> Path:
    src = tmp_path / "raw"
    src.mkdir()
    for i in range(4):
        blocks(i).save(src / f"good{i}.png")
        (src / f"good{i}.txt").write_text(f"zqx, sample {i}")
    (src / "zcopy.png").write_bytes((src / "good0.png").read_bytes())  # exact duplicate
    (src / "zcopy.txt").write_text("zqx, copy")
    blocks(1).convert("RGB").save(src / "reencoded.jpg", quality=90)  # perceptual duplicate of good1
    blocks(9).filter(ImageFilter.GaussianBlur(4)).save(src / "blurred.png")
    (src / "blurred.txt").write_text("zqx, blurred")
    blocks(10, (16, 16)).save(src / "tiny.png")
    blocks(11, (200, 40)).save(src / "strip.png")
    (src / "strip.txt").write_text("zqx, strip")
    (src / "good3.txt").write_text("no trigger <script>alert(1)</script>")
    (src / "orphan.txt").write_text("zqx, lost")
    return src


def test_prepare_drops_planted_duplicates_and_blur_and_keeps_the_rest(raw, tmp_path):
    before = tree_digest(raw)
    out = tmp_path / "clean"
    summary = prepare_dataset(raw, out, PrepareOptions(trigger="zqx", min_size=32, blur_threshold=100.0,
                                                        resolution=64, bucket_step=16))
    assert tree_digest(raw) == before, "the input folder was modified"
    by = {f["name"]: f for f in summary["files"]}
    kept = sorted(n for n, f in by.items() if f["status"] == "kept")
    assert kept == ["good0.png", "good1.png", "good2.png", "good3.png"]
    assert "exact duplicate of good0.png" in by["zcopy.png"]["reasons"][0]
    assert "near duplicate of good1.png" in by["reencoded.jpg"]["reasons"][0]
    assert by["blurred.png"]["reasons"][0].startswith("blurred")
    assert by["tiny.png"]["reasons"][0].startswith("too small")
    assert any("aspect" in r for r in by["strip.png"]["reasons"])
    assert by["good3.png"]["warnings"] == ["caption lacks the trigger word 'zqx'"]
    assert summary["orphan_captions"] == ["orphan.txt"]
    # outputs: bucket crops + captions + summaries
    assert sorted(p.name for p in out.glob("*.png")) == kept
    assert Image.open(out / "good0.png").size == (64, 64)
    assert (out / "good0.txt").read_text().strip() == "zqx, sample 0"
    assert json.loads((out / "prepare.json").read_text())["counts"]["dropped"] == 5
    html = (out / "prepare.html").read_text()
    assert "&lt;script&gt;" in html and "<script>" not in html


def test_blur_and_hash_measures():
    sharp = blocks(3)
    assert laplacian_variance(sharp) > 10 * laplacian_variance(sharp.filter(ImageFilter.GaussianBlur(4)))
    assert bin(dhash(blocks(3)) ^ dhash(blocks(4))).count("1") > 6


def test_prepare_refuses_output_inside_input_and_poses(raw, tmp_path):
    with pytest.raises(PrepareError, match="outside the input"):
        prepare_dataset(raw, raw / "out")
    from trainer.poses import PoseOptions, prepare_poses

    with pytest.raises(PrepareError, match="body_pose_model.pth"):
        prepare_poses(raw, PoseOptions(annotator=None))


def test_a_caption_that_is_not_utf8_is_a_warning_not_a_traceback(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    blocks(0).save(src / "a.png")
    (src / "a.txt").write_bytes(b"zqx, caf\xe9")  # Latin-1
    summary = prepare_dataset(src, tmp_path / "out", PrepareOptions(min_size=32, resolution=64, bucket_step=16))
    (record,) = summary["files"]
    assert record["status"] == "kept" and record["warnings"][0].startswith("caption is not UTF-8 text")
    assert not (tmp_path / "out" / "a.txt").exists()
