"""The kohya (`ss_*`, `sshs_model_hash`) and ModelSpec (`modelspec.*`) metadata on the LoRAs castbook
trains, read back with safetensors, and the files still loading in diffusers."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from test_trainer import _job, make_dataset, make_spec

from core.digests import file_digest
from core.model_hashes import lora_hash
from schemas.job import ResolvedLora

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]




@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    from trainer.train import train_lora

    root = tmp_path_factory.mktemp("meta")
    make_dataset(root / "data")
    (root / "data" / "img3.txt").write_text("zqx, A Yellow Circle,  , outdoors")  # case and blanks as kohya
    spec = make_spec(train={"steps": 2}, checkpoints={"every": 2, "keep_last": 1},
                     output={"registry": None, "name": "toy-luca"}, lora={"alpha": 2})
    result = train_lora(spec, root, progress=False, render=False)
    return root, spec, result


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def kohya_sshs(path: Path) -> str:
    """kohya's sshs_model_hash recomputed: the file without that key in its header, then sha256 of
    the bytes after the header (train_util.precalculate_safetensors_hashes)."""
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sshs_model_hash"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data = save(tensors, metadata=meta)
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.mark.parametrize("which,impl", [("lora_file", "diffusers"),
                                        ("kohya_file", "https://github.com/Stability-AI/generative-models")])
def test_trained_lora_carries_kohya_and_modelspec_metadata(trained, which, impl):
    root, spec, result = trained
    path = getattr(result, which)
    meta = header(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("4", 2.0)
    assert meta["ss_output_name"] == "toy-luca"
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq == {"data": {"zqx": 4, "a red circle": 1, "a blue circle": 1, "a green circle": 1,
                             "a yellow circle": 1, "outdoors": 1}}
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == impl
    assert (meta["modelspec.title"], meta["modelspec.trigger_phrase"], meta["modelspec.resolution"]) == (
        "toy-luca", "zqx", "32x32")
    assert "modelspec.date" not in meta  # no clock values: the same training writes the same bytes
    assert meta["sshs_model_hash"] == kohya_sshs(path) == lora_hash(path)
    assert meta["castbook.rank"] == "4"  # castbook's own keys stay


def test_both_exports_still_load_in_diffusers_and_change_the_image(trained):
    from renderer.pipeline import JobRenderer

    root, _, result = trained
    renderer = JobRenderer(root, device="cpu")
    base = np.asarray(renderer.render(_job(root)).image, dtype=np.int16)
    images = []
    for name, path in (("toy", result.lora_file), ("toy_kohya", result.kohya_file)):
        lora = ResolvedLora(name=name, path=path.relative_to(root).as_posix(), digest=file_digest(path), weight=8.0,
                            kind="character")
        images.append(np.asarray(renderer.render(_job(root, [lora])).image, dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 2  # the same weights in both layouts
    assert not np.array_equal(images[0], base)
