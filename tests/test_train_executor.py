"""`castbook train --executor ray`: the same training in a Ray task gives the same LoRA and loss."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trainer import REGISTRY, make_dataset, make_spec

STEPS = 3


def project(root: Path) -> Path:
    make_dataset(root / "data")
    (root / "specs").mkdir(parents=True)
    (root / "specs" / "loras.yaml").write_text(REGISTRY)
    spec = make_spec(train={"steps": STEPS}, checkpoints={"every": STEPS, "keep_last": 1})
    path = root / "spec.yaml"
    path.write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True)))  # JSON is YAML
    return path


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, capsys):
    import torch

    from castbook.cli import main
    from trainer.train import load_training_spec, train_lora

    local_root, ray_root = tmp_path / "local", tmp_path / "ray"
    spec_path = project(local_root)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray task gets one CPU, hence one torch thread: same arithmetic
    try:
        local = train_lora(load_training_spec(spec_path, local_root), local_root, progress=False, render=False)
    finally:
        torch.set_num_threads(before)
    assert local.steps == STEPS

    ray_spec = project(ray_root)
    # The real CLI in this process (saves a second torch import); Ray runs the training in a worker.
    code = main(["train", str(ray_spec), "--root", str(ray_root), "--executor", "ray", "--no-samples", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert (ray_root / "out" / "toy.safetensors").is_file(), out.out
    final = float(re.search(r"\(final ([0-9.eE+-]+)\)", out.out).group(1))
    assert final == pytest.approx(local.losses[-1], abs=1e-5)
    assert f"LoRA: {ray_root / 'out' / 'toy.safetensors'}" in out.out


def test_ray_address_without_ray_executor_is_an_error(tmp_path):
    spec_path = project(tmp_path)
    r = subprocess.run([sys.executable, "-m", "castbook", "train", str(spec_path), "--root", str(tmp_path),
                        "--ray-address", "127.0.0.1:6379"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "needs --executor ray" in r.stderr


def test_input_errors_cross_the_ray_boundary_as_problem_lists(tmp_path):
    # TrainingError does not survive pickling (its __init__ rebuilds the message), so the task returns problems.
    from trainer.train import _train_remote, load_training_spec

    spec_path = project(tmp_path)
    for p in (tmp_path / "data").iterdir():
        p.unlink()
    kind, problems = _train_remote(load_training_spec(spec_path, tmp_path), tmp_path, {"progress": False})
    assert kind == "TrainingError" and any("has no images" in p for p in problems)
