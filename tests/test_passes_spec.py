"""Finishing passes in the spec (schemas/passes.py): layering, job keys, file digests, refusals.
No rendering: these run in milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.loader import SpecErrors
from schemas.plan import load_plan

SPEC = """\
defaults:
  base_model: builtin:toy-sdxl
  preset: toy
presets:
  toy: {extends: standard, width: 64, height: 64, num_inference_steps: 4}
  toyhires: {extends: toy, hires: {scale: 2, strength: 0.25}, detail: {padding: 6}}
  toyref: {extends: toy, refiner: {model: builtin:toy-sdxl, switch_at: 0.7}}
scenes:
  beach:
    prompt: "a red star character on the beach"
  plate:
    prompt: "a red star character on the beach"
    background_plate: plate.png
  init:
    prompt: "a red star character on the beach"
    init_image: init.png
    strength: 0.3
jobs:
  plain: {scenes: [beach]}
  big: {scenes: [beach], presets: [high, toyhires, toyref]}
  nohires: {scenes: [beach], presets: [toyhires], hires: null}
  plates: {scenes: [plate, init]}
  override: {scenes: [init], init_image: other.png, strength: 0.05}
"""


def project(tmp_path: Path, spec: str = SPEC) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True, exist_ok=True)
    for name in ("plate.png", "init.png", "other.png", "mask.png"):
        (root / name).write_bytes(name.encode())
    (root / "spec.yaml").write_text(spec)
    return root


def jobs_by_name(root: Path) -> dict:
    return {j.name: j for j in load_plan(root / "spec.yaml").jobs}


def test_passes_resolve_and_enter_the_key_only_when_set(tmp_path):
    root = project(tmp_path)
    jobs = jobs_by_name(root)
    plain = jobs["plain/nocharacter/beach/toy/seed-0"]
    assert plain.passes is None and "passes" not in plain.pixel_fields()
    high = jobs["big/nocharacter/beach/high/seed-0"].passes.hires
    assert (high.scale, high.upscaler, high.strength, high.steps, high.width, high.height) == (1.5, "lanczos", 0.35, 15, 1536, 1536)
    toyhires = jobs["big/nocharacter/beach/toyhires/seed-0"].passes
    assert (toyhires.hires.width, toyhires.hires.strength, toyhires.detail.padding, toyhires.detail.detector) == (128, 0.25, 6, "toy")
    assert jobs["big/nocharacter/beach/toyref/seed-0"].passes.refiner.switch_at == 0.7
    # `hires: null` on the job switches the preset's hires off, keeps its detail pass
    off = jobs["nohires/nocharacter/beach/toyhires/seed-0"].passes
    assert off.hires is None and off.detail is not None
    plate = jobs["plates/nocharacter/plate/toy/seed-0"].passes.init
    assert (plate.image, plate.mask, plate.strength, plate.mask_digest) == ("plate.png", "auto", 1.0, None)
    init = jobs["plates/nocharacter/init/toy/seed-0"].passes.init
    assert (init.image, init.mask, init.strength) == ("init.png", None, 0.3)
    over = jobs["override/nocharacter/init/toy/seed-0"].passes.init
    assert (over.image, over.strength) == ("other.png", 0.05)
    keys = {name: j.key for name, j in jobs.items()}
    assert len(set(keys.values())) == len(keys)


def test_pass_files_change_keys_and_settings_change_keys(tmp_path):
    root = project(tmp_path)
    before = {n: j.key for n, j in jobs_by_name(root).items()}
    (root / "plate.png").write_bytes(b"another plate")
    after = {n: j.key for n, j in jobs_by_name(root).items()}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {"plates/nocharacter/plate/toy/seed-0"}
    (root / "spec.yaml").write_text(SPEC.replace("hires: {scale: 2, strength: 0.25}", "hires: {scale: 2, strength: 0.3}"))
    again = {n: j.key for n, j in jobs_by_name(root).items()}
    assert {n for n in after if after[n] != again[n]} == {"big/nocharacter/beach/toyhires/seed-0"}


@pytest.mark.parametrize("edit, message", [
    (("detail: {padding: 6}", "detail: {detector: models/face.safetensors}"), "is a single file; give `toy` or the folder"),
    (("background_plate: plate.png", "background_plate: plate.png\n    controls: [{type: canny, image: init.png}]"),
     "cannot be combined with controls yet"),
    (("init_image: init.png", "init_image: init.png\n    mask: mask.png"), "`mask` needs `background_plate`"),
    (("init_image: init.png", "init_image: gone.png"), "scenes.init.init_image: file 'gone.png' not found"),
    (("model: builtin:toy-sdxl, switch_at", "model: refiner.ckpt, switch_at"), "pickle"),
    (("background_plate: plate.png", "background_plate: plate.txt"), "is not an image"),
])
def test_bad_pass_settings_are_refused_clearly(tmp_path, edit, message):
    root = project(tmp_path, SPEC.replace(*edit))
    with pytest.raises(SpecErrors) as caught:
        load_plan(root / "spec.yaml")
    assert message in str(caught.value)


def test_plan_table_shows_the_size_after_the_hires_pass(repo_root, capsys, monkeypatch):
    from castbook.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", str(repo_root / "specs" / "examples" / "luca.yaml"), "--only", "hires/*"]) == 0
    assert capsys.readouterr().out.count("64x64→128x128") == 2
