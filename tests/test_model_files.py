"""Knowing what a model file is: `castbook models inspect` (core/safetensors_info.py) on files with the
real layouts, `castbook loras add` (schemas/lora_registry.py), `castbook models convert`
(renderer/model_convert.py, never runs a pickle's code) and the folder export plain diffusers loads."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from castbook.cli import main
from core.safetensors_info import inspect_file
from renderer.builtins import TOY_SDXL_DIR, builtin_dir

LORAS = "specs/examples/loras"


def _inspect(capsys, path) -> dict:
    capsys.readouterr()
    assert main(["models", "inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _zeros(path, shapes: dict, metadata: dict | None = None):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


def _peft_lora(tmp_path):
    """A diffusers/peft LoRA saved by diffusers itself from a peft-wrapped tiny UNet."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(builtin_dir("tiny-sdxl") / "unet", local_files_only=True)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(unet))
    return tmp_path / "peft" / "pytorch_lora_weights.safetensors"


def test_inspect_names_every_kind_from_real_layouts(tmp_path, repo_root, capsys):
    kohya = _inspect(capsys, repo_root / LORAS / "luca_character_kohya.safetensors")
    assert (kohya["kind"], kohya["form"], kohya["architecture"], kohya["rank"]) == ("lora", "kohya", "SDXL", 4)
    assert set(kohya["targets"]) == {"unet", "text_encoder", "text_encoder_2"}
    assert kohya["dtype"] == "F32" and kohya["parameters"] > 50_000
    peft = _inspect(capsys, _peft_lora(tmp_path))
    assert (peft["kind"], peft["form"], peft["rank"]) == ("lora", "diffusers-peft", 2)
    assert peft["targets"] == {"unet": ["cross-attention", "self-attention"]}
    lycoris = _zeros(tmp_path / "lyco.safetensors", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.hada_w1_a": (2048, 8),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.hada_w1_b": (8, 640),
        "lora_unet_output_blocks_0_1_proj_in.lokr_w1": (8, 8),
        "lora_unet_output_blocks_0_1_proj_in.lokr_w2": (160, 160),
        "lora_unet_output_blocks_0_1_proj_in.alpha": ()})
    assert _inspect(capsys, lycoris)["form"] == "LyCORIS"
    cn = _inspect(capsys, builtin_dir("tiny-controlnet") / "diffusion_pytorch_model.safetensors")
    assert (cn["kind"], cn["form"], cn["architecture"]) == ("controlnet", "diffusers", "SDXL")
    vae = _inspect(capsys, TOY_SDXL_DIR / "vae" / "diffusion_pytorch_model.safetensors")
    assert (vae["kind"], vae["dtype"]) == ("vae", "F16")
    ip = _inspect(capsys, _zeros(tmp_path / "ip.safetensors", {"image_proj.proj.weight": (8192, 1280),
                                                                "ip_adapter.1.to_k_ip.weight": (640, 2048)}))
    assert (ip["kind"], ip["architecture"]) == ("ip-adapter", "SDXL")
    ti = _inspect(capsys, _zeros(tmp_path / "ti.safetensors", {"clip_l": (2, 768), "clip_g": (2, 1280)}))
    assert (ti["kind"], ti["architecture"]) == ("textual-inversion", "SDXL")
    sd1 = _inspect(capsys, _zeros(tmp_path / "sd1.safetensors", {
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}))
    assert sd1["kind"] == "sd1" and "1.x" in sd1["description"]
    unknown = _inspect(capsys, _zeros(tmp_path / "x.safetensors", {"foo": (2,)}))
    assert unknown["kind"] == "unknown"


def test_inspect_hashes_match_a_recomputation_and_the_text_view(repo_root, capsys):
    path = repo_root / LORAS / "luca_character.safetensors"
    info = _inspect(capsys, path)
    data = path.read_bytes()
    full = hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[:8], "little")
    assert info["hashes"]["sha256"] == full and info["hashes"]["a1111_model_hash"] == full[:10]
    assert info["hashes"]["a1111_lora_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    assert main(["models", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a LoRA (diffusers-peft, SDXL)" in out and full in out and "rank          4" in out


def _kohya_with_metadata(repo_root, tmp_path, name="pixar_luca.safetensors", **metadata):
    sd = load_file(str(repo_root / LORAS / "luca_character_kohya.safetensors"))
    md = {"ss_output_name": "pixar_luca", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
          "ss_tag_frequency": json.dumps({"10_lucachar": {"lucachar": 40, "1boy": 38, "smile": 7, "beach": 12},
                                          "5_bg": {"beach": 30, "sea": 3}}), **metadata}
    save_file(sd, str(tmp_path / name), metadata=md)
    return tmp_path / name


def test_trigger_words_come_from_the_tag_frequency(repo_root, tmp_path):
    info = inspect_file(_kohya_with_metadata(repo_root, tmp_path), hashes=False)
    assert info["trigger_words"] == ["beach", "lucachar", "1boy", "smile", "sea"]
    assert info["metadata"]["ss_output_name"] == "pixar_luca"
    phrase = inspect_file(_kohya_with_metadata(repo_root, tmp_path, "p.safetensors", **{"modelspec.trigger_phrase": "lucaboy"}),
                          hashes=False)
    assert phrase["trigger_words"][0] == "lucaboy"


def _project(tmp_path, repo_root):
    proj = tmp_path / "proj"
    shutil.copytree(repo_root / "specs" / "examples", proj / "specs", ignore=shutil.ignore_patterns("assets", "vars", "*.yaml"))
    shutil.copy(repo_root / "specs" / "examples" / "registry.yaml", proj / "specs" / "registry.yaml")
    (proj / "pyproject.toml").write_text("")  # marks the project root (schemas/paths.py)
    return proj


def test_loras_add_keeps_comments_validates_and_refuses_clashes_and_sd1(tmp_path, repo_root, capsys):
    proj = _project(tmp_path, repo_root)
    registry = proj / "specs" / "registry.yaml"
    before = registry.read_text()
    lora = _kohya_with_metadata(repo_root, proj / "specs" / "loras")
    assert main(["loras", "add", str(lora), "--registry", str(registry), "--kind", "character", "--weight", "0.7"]) == 0
    after = registry.read_text()
    assert after.startswith(before.split("loras:")[0])  # the header comments are kept
    assert "# These LoRAs are small files" in after and "luca_character:" in after
    from ruamel.yaml import YAML

    entry = YAML(typ="safe").load(after)["loras"]["pixar_luca"]
    assert entry["path"] == "loras/pixar_luca.safetensors" and entry["rank"] == 4 and entry["weight"] == 0.7
    assert entry["kind"] == "character" and entry["trigger_words"][:2] == ["beach", "lucachar"]
    assert "kohya LoRA for SDXL" in entry["notes"]
    capsys.readouterr()
    assert main(["validate", str(registry)]) == 0
    # the same name again is refused; --name picks another
    assert main(["loras", "add", str(lora), "--registry", str(registry)]) == 2
    assert "already has a LoRA named 'pixar_luca'" in capsys.readouterr().err
    assert main(["loras", "add", str(lora), "--registry", str(registry), "--name", "luca_two"]) == 0
    # an SD 1.x LoRA (kohya names, 768-wide cross-attention, sd_v1 metadata) is refused with what it is
    sd1 = _zeros(proj / "specs" / "loras" / "sd1.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 768)},
        {"ss_base_model_version": "sd_v1"})
    text = registry.read_text()
    assert main(["loras", "add", str(sd1), "--registry", str(registry)]) == 2
    err = capsys.readouterr().err
    assert "LoRA for SD 1.x" in err and "SDXL" in err
    assert registry.read_text() == text  # nothing written
    assert main(["loras", "add", str(TOY_SDXL_DIR / "vae" / "diffusion_pytorch_model.safetensors"), "--registry",
                 str(registry)]) == 2
    assert "is a VAE" in capsys.readouterr().err
    outside = _kohya_with_metadata(repo_root, tmp_path, "outside.safetensors")
    assert main(["loras", "add", str(outside), "--registry", str(registry), "--name", "x"]) == 2
    assert "outside the project" in capsys.readouterr().err


def test_convert_flattens_nested_tensors_and_never_runs_a_payload(tmp_path, capsys):
    ip = {"image_proj": {"proj.weight": torch.randn(16, 8), "norm.bias": torch.zeros(4)},
          "ip_adapter": {"1.to_k_ip.weight": torch.randn(8, 2048), "1.to_v_ip.weight": torch.randn(8, 2048)}}
    torch.save(ip, tmp_path / "ip-adapter_sdxl.bin")
    assert main(["models", "convert", str(tmp_path / "ip-adapter_sdxl.bin"), "--to", "safetensors"]) == 0
    out = load_file(str(tmp_path / "ip-adapter_sdxl.safetensors"))
    assert set(out) == {"image_proj.proj.weight", "image_proj.norm.bias", "ip_adapter.1.to_k_ip.weight", "ip_adapter.1.to_v_ip.weight"}
    assert torch.equal(out["image_proj.proj.weight"], ip["image_proj"]["proj.weight"])
    assert inspect_file(tmp_path / "ip-adapter_sdxl.safetensors", hashes=False)["kind"] == "ip-adapter"

    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    pickle.loads(pickle.dumps(Evil())).close()  # noqa: S301 - proves the payload works when unpickled
    assert sentinel.exists()
    sentinel.unlink()
    torch.save({"w": torch.ones(2), "payload": Evil()}, tmp_path / "evil.pt")
    capsys.readouterr()
    assert main(["models", "convert", str(tmp_path / "evil.pt"), "--to", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert "needs more than tensors" in err and "refused without running it" in err
    assert not sentinel.exists() and not (tmp_path / "evil.safetensors").exists()
    # plain data beside the tensors is refused too, naming the key
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "train.ckpt")
    assert main(["models", "convert", str(tmp_path / "train.ckpt"), "--to", "safetensors"]) == 2
    assert "epoch is a int" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_folder_loads_in_plain_diffusers_with_no_arguments(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "toy"
    assert main(["models", "export", "builtin:toy-sdxl", str(out)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out)  # no arguments at all
    assert {p.dtype for p in pipe.unet.parameters()} | {p.dtype for p in pipe.text_encoder.parameters()} == {torch.float32}
    kw = dict(prompt="a red ball", num_inference_steps=2, height=64, width=64, output_type="np")
    img = pipe(**kw, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0.01
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = StableDiffusionXLPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    bf16 = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16
    img16 = bf16(**kw, generator=torch.Generator().manual_seed(0)).images[0]  # bf16 runs on CPU
    assert img16.shape == (64, 64, 3) and np.abs(img16.astype(np.float32) - img).mean() < 0.1
