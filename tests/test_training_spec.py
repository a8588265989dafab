"""Training spec: kind presets, validation, located errors, shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.training import KIND_PRESETS, TrainingSpec

MINIMAL = {
    "base_model": "builtin:tiny-sdxl",
    "dataset": {"folders": ["data"]},
    "output": {"name": "x"},
}


@pytest.mark.parametrize("kind,rank,lr,steps", [
    ("character", 64, 5e-5, 2500), ("background", 32, 1e-4, 1500), ("pose", 16, 1e-4, 1000),
    ("expression", 16, 5e-5, 800),
])
def test_kind_presets_fill_what_the_spec_leaves_out(kind, rank, lr, steps):
    spec = TrainingSpec.model_validate({**MINIMAL, "kind": kind})
    assert (spec.lora.rank, spec.train.learning_rate, spec.train.steps) == (rank, lr, steps)
    assert spec.lora.alpha == KIND_PRESETS[kind]["lora"]["alpha"]


def test_spec_values_win_over_the_preset_and_alpha_follows_rank():
    spec = TrainingSpec.model_validate({**MINIMAL, "kind": "character", "lora": {"rank": 8},
                                        "train": {"steps": 10}})
    assert (spec.lora.rank, spec.lora.alpha, spec.train.steps, spec.train.learning_rate) == (8, 8, 10, 5e-5)


def test_unknown_fields_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="lerning_rate"):
        TrainingSpec.model_validate({**MINIMAL, "kind": "pose", "train": {"lerning_rate": 1}})
    with pytest.raises(ValidationError, match="pivotal_tuning"):
        TrainingSpec.model_validate({**MINIMAL, "kind": "pose", "pivotal_tuning": True})
    with pytest.raises(ValidationError, match="needs `references`"):
        TrainingSpec.model_validate({**MINIMAL, "kind": "pose", "evaluation": {"select_best": "clip_i"}})


def test_spec_errors_are_located(tmp_path):
    from schemas.loader import SpecErrors
    from trainer.train import load_training_spec

    path = tmp_path / "bad.yaml"
    path.write_text("base_model: builtin:tiny-sdxl\nkind: character\ndataset:\n  folders: [data]\n"
                    "train:\n  steps: -5\noutput:\n  name: x\n")
    with pytest.raises(SpecErrors) as err:
        load_training_spec(path, tmp_path)
    text = "\n".join(str(e) for e in err.value.errors)
    assert "bad.yaml:6:" in text and "train.steps" in text


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("specs/training/*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_training_specs_validate(path, repo_root):
    if path.name == "trained_loras.yaml":
        pytest.skip("registry, not a training spec")
    from trainer.train import load_training_spec

    spec = load_training_spec(path, repo_root)
    assert spec.output.name
