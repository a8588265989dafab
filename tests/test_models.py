"""renderer.models and renderer.builtins: loading, built-ins, export, file-format safety (never unpickle),
sdxl-random on meta."""

from __future__ import annotations

import argparse
import json
import pickle
import struct

import pytest
import torch

from core.errors import JobError
from renderer import builtins, model_export, models
from schemas.job import ResolvedModel


def _evil_pickle(sentinel) -> bytes:
    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    return pickle.dumps(Evil())


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl"])
def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, suffix):
    sentinel = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(_evil_pickle(sentinel))
    # the sentinel proves the payload works when unpickled... in a throwaway copy
    pickle.loads(_evil_pickle(tmp_path / "control")).close()  # noqa: S301 - our own payload, on purpose
    assert (tmp_path / "control").exists()
    model = ResolvedModel(ref=path.name, kind="single_file", digest="x", config="cfg")
    with pytest.raises(JobError, match="pickle") as err:
        models.load_base_pipeline(model, tmp_path, "cpu", "fp32")
    assert path.name in str(err.value) and ".safetensors" in str(err.value)
    assert not sentinel.exists()


def test_diffusers_folder_with_only_bin_weights_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(_evil_pickle(sentinel))
    model = ResolvedModel(ref="m", kind="diffusers", digest="x")
    with pytest.raises(JobError, match="only pickle weights.*diffusion_pytorch_model.bin"):
        models.load_base_pipeline(model, tmp_path, "cpu", "fp32")
    assert not sentinel.exists()


def _write_safetensors(path, n_floats=1000):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(n_floats)}, str(path))


def test_truncated_safetensors_is_a_clear_job_error(tmp_path):
    path = tmp_path / "model.safetensors"
    _write_safetensors(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JobError, match="not a valid safetensors file.*truncated"):
        models.check_safetensors_file(path)
    model = ResolvedModel(ref="model.safetensors", kind="single_file", digest="x", config="cfg")
    with pytest.raises(JobError, match="model.safetensors"):
        models.load_base_pipeline(model, tmp_path, "cpu", "fp32")


def test_garbage_safetensors_header_is_a_clear_job_error(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json at" + b"\0")
    with pytest.raises(JobError, match="junk.safetensors is not a valid safetensors file"):
        models.check_safetensors_file(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(JobError, match="shorter than"):
        models.check_safetensors_file(tmp_path / "tiny.safetensors")


def test_valid_safetensors_passes_the_check(tmp_path):
    _write_safetensors(tmp_path / "ok.safetensors")
    models.check_safetensors_file(tmp_path / "ok.safetensors")


def test_single_file_that_is_no_checkpoint_says_what_it_is(tmp_path):
    _write_safetensors(tmp_path / "ok.safetensors")
    model = ResolvedModel(ref="ok.safetensors", kind="single_file", digest="x")
    with pytest.raises(JobError, match="ok.safetensors is not a model layout castbook recognises, not an SDXL checkpoint"):
        models.load_base_pipeline(model, tmp_path, "cpu", "fp32")


def test_sdxl_random_unet_has_the_sdxl_base_architecture_on_meta():
    unet = builtins.build_sdxl_random_unet("meta")
    n = sum(p.numel() for p in unet.parameters())
    assert 2_560_000_000 < n < 2_570_000_000  # SDXL-base UNet: 2,567,463,684 parameters
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert unet.config.cross_attention_dim == 2048
    assert list(unet.config.transformer_layers_per_block) == [1, 2, 10]


def test_tokenizer_ids_match_open_clip():
    import open_clip

    tok = builtins.clip_tokenizer()
    for text in ["a photo of Luca, a boy with brown hair!", "Porto Rosso harbour at dawn, 8k, hdr"]:
        ours = tok(text).input_ids
        theirs = open_clip.tokenize([text])[0].tolist()
        assert ours == theirs[: len(ours)] and theirs[len(ours)] == 0
        assert len(ours) > 5


def test_dtype_resolution():
    assert models.resolve_dtype("auto", "cpu") == "fp32"
    assert models.resolve_dtype("auto", "cuda:0") == "bf16"
    assert models.resolve_dtype("fp16", "cuda:0") == "fp16"
    with pytest.raises(JobError, match="fp16.*CUDA"):
        models.resolve_dtype("fp16", "cpu")


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(JobError, match="builtin:tiny-sdxl"):
        builtins.builtin_name("builtin:huge-sdxl")
    assert builtins.builtin_digest("builtin:tiny-sdxl") == "builtin:tiny-sdxl@r1"


def test_export_cli_writes_a_folder_plain_diffusers_loads(tmp_path, capsys):
    from diffusers import ControlNetModel, StableDiffusionXLPipeline

    from castbook.commands import models as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["models", "export", "builtin:tiny-sdxl", str(tmp_path / "tiny")])
    assert args.func(args) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny")
    assert pipe.unet.config.cross_attention_dim == 64
    assert json.loads((tmp_path / "tiny" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    # exporting into a non-empty folder is refused, not merged
    assert args.func(args) == 2
    assert "not empty" in capsys.readouterr().err
    model_export.export_builtin("builtin:tiny-controlnet", tmp_path / "cn")
    assert tuple(ControlNetModel.from_pretrained(tmp_path / "cn").config.conditioning_embedding_out_channels) == (16, 32)
    args = parser.parse_args(["models", "list"])
    assert args.func(args) == 0
    listed = capsys.readouterr().out
    assert "builtin:sdxl-random" in listed
    for name in ("toy-ip-adapter", "tiny-ip-adapter", "toy-clip"):  # every kind of built-in is listed
        assert f"builtin:{name}" in listed


@pytest.mark.slow
def test_builtins_build_byte_identical_in_a_fresh_home(tmp_path, monkeypatch):
    default = builtins.builtin_dir("tiny-sdxl")
    monkeypatch.setenv("CASTBOOK_HOME", str(tmp_path))
    fresh = builtins.builtin_dir("tiny-sdxl")
    assert fresh != default and fresh.is_relative_to(tmp_path)
    for rel in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"]:
        assert (fresh / rel).read_bytes() == (default / rel).read_bytes(), rel
    assert not [p for p in tmp_path.joinpath("builtins").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_sdxl_random_full_pipeline_builds_on_meta():
    pipe = builtins.build_sdxl_random_pipeline(device="meta", torch_dtype=torch.float16)
    assert round(sum(p.numel() for p in pipe.text_encoder_2.parameters()) / 1e6) == 695  # OpenCLIP bigG text tower
    assert pipe.vae_scale_factor == 8 and pipe.unet.dtype == torch.float16
    assert pipe.unet.device.type == "meta"


def test_builders_leave_the_callers_random_state_alone():
    """Library functions must not reseed the process: a caller's next random numbers are unchanged."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    builtins.build_tiny_sdxl_components()
    builtins.build_sdxl_random_pipeline(device="meta", torch_dtype=torch.float16)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_default_dtype() == torch.float32
