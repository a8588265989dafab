"""Single-file SDXL checkpoints (renderer/single_file.py): the toy model exported in the original
Stability layout renders the same pixels as builtin:toy-sdxl, plain diffusers reads the file, kinds
are refused by name, and the key map holds both ways for the full SDXL base and refiner (on meta)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from castbook.cli import main
from core.errors import JobError
from core.safetensors_info import inspect_file
from renderer import models, single_file
from renderer.builtins import TOY_SDXL_DIR, build_sdxl_random_pipeline
from renderer.model_export import export_builtin_single_file
from schemas.builtins import builtin_digest
from schemas.job import ResolvedModel

TOY = ResolvedModel(ref="builtin:toy-sdxl", kind="builtin", digest=builtin_digest("toy-sdxl"))


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    assert main(["models", "export", "builtin:toy-sdxl", str(root / "toy.safetensors"), "--format", "single-file"]) == 0
    return root / "toy.safetensors"


def _single(path, config=None):
    return ResolvedModel(ref=path.name, kind="single_file", digest="sha:" + path.name, config=config)


def _toy_fp32():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(TOY_SDXL_DIR, local_files_only=True, torch_dtype=torch.float32)


def test_export_writes_the_original_key_layout(toy_file):
    with safe_open(str(toy_file), "numpy") as f:
        keys, meta = list(f.keys()), f.metadata()
    for prefix in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                   "conditioner.embedders.1.model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert toy_file.stat().st_mode & 0o777 == 0o644 and not list(toy_file.parent.glob(".*.tmp"))
    assert main(["models", "export", "builtin:toy-sdxl", str(toy_file), "--format", "single-file"]) == 2  # no overwrite


SPEC = """
defaults:
  base_model: toy.safetensors
  negative_prompt: blurry
characters:
  luca: {description: a boy with brown hair}
scenes:
  beach: {prompt: "{character} on the beach"}
presets:
  draft: {width: 64, height: 64, num_inference_steps: 3}
jobs:
  t: {characters: [luca], scenes: [beach], presets: [draft], seeds: [1]}
"""


@pytest.mark.slow
def test_a_spec_using_the_file_renders_the_same_pixels_as_the_builtin(toy_file):
    from core.model_hashes import sha256
    from renderer.pipeline import JobRenderer
    from schemas.plan import load_plan

    root = toy_file.parent
    (root / "pyproject.toml").write_text("")  # the project root
    (root / "spec.yaml").write_text(SPEC)
    single = load_plan([root / "spec.yaml"]).jobs[0]
    builtin = load_plan([root / "spec.yaml"], ["defaults.base_model=builtin:toy-sdxl"]).jobs[0]
    assert single.base_model.kind == "single_file" and single.base_model.digest == sha256(toy_file)
    assert single.key != builtin.key
    renderer = JobRenderer(root)
    a = np.asarray(renderer.render(builtin).image)
    b = np.asarray(renderer.render(single).image)
    assert a.shape == (64, 64, 3) and a.std() > 1
    assert np.array_equal(a, b)
    # The same file as a refiner (issue 14's hand-off; a base fine-tune may refine, as in A1111) is
    # loaded through the single-file loader and finishes exactly as the built-in refining itself.
    from schemas.passes import ResolvedPasses, ResolvedRefiner

    def refined(ref, kind, digest):
        refiner = ResolvedRefiner(model_ref=ref, model_kind=kind, model_digest=digest, switch_at=0.7)
        return np.asarray(renderer.render(builtin.model_copy(update={"passes": ResolvedPasses(refiner=refiner)})).image)

    by_itself = refined("builtin:toy-sdxl", "builtin", builtin.base_model.digest)
    loads = renderer.stats["model_loads"]
    by_file = refined(toy_file.name, "single_file", sha256(toy_file))
    assert renderer.stats["model_loads"] == loads + 1  # the file was loaded as a second model
    assert np.array_equal(by_itself, by_file)


def test_plain_diffusers_reads_the_file_with_the_toy_config(toy_file):
    from diffusers import StableDiffusionXLPipeline

    ref = _toy_fp32()
    pipe = StableDiffusionXLPipeline.from_single_file(str(toy_file), config=str(TOY_SDXL_DIR), local_files_only=True,
                                                      torch_dtype=torch.float32)
    # diffusers tells the two text encoders apart by width; the toy's are both 32 wide, so plain diffusers
    # fills text_encoder_2 wrongly (castbook's loader handles it: renderer/single_file.py). The rest is exact.
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(pipe, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_fp16_bf16_and_ema_files_load(toy_file, tmp_path):
    ref = _toy_fp32().unet.state_dict()
    for dtype, td in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = export_builtin_single_file("builtin:toy-sdxl", tmp_path / f"toy-{dtype}.safetensors", dtype)
        with safe_open(str(path), "pt") as f:
            assert f.get_slice("model.diffusion_model.out.2.weight").get_dtype() == {"fp16": "F16", "bf16": "BF16"}[dtype]
        unet = models.load_base_pipeline(_single(path), tmp_path, "cpu", "fp32").unet.state_dict()
        # the toy is stored in fp16, so an fp16 file is exact; bf16 rounds
        assert all(torch.equal(ref[k], unet[k]) if dtype == "fp16" else torch.allclose(ref[k], unet[k], rtol=1e-2, atol=1e-2)
                   for k in ref)
    # a full (non-pruned) file: EMA copies under model_ema.* and extra buffers beside the weights
    sd = load_file(str(toy_file))
    ema = {"model_ema." + k.removeprefix("model.diffusion_model.").replace(".", ""): v.clone()
           for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    save_file({**sd, **ema, **extra}, str(tmp_path / "full.safetensors"))
    unet = models.load_base_pipeline(_single(tmp_path / "full.safetensors"), tmp_path, "cpu", "fp32").unet.state_dict()
    assert all(torch.equal(ref[k], unet[k]) for k in ref)


def test_the_files_vae_is_used_unless_performance_vae_overrides_it(toy_file):
    from renderer.builtins import builtin_dir
    from renderer.pipeline import JobRenderer

    root = toy_file.parent
    if not (root / "othervae").exists():
        shutil.copytree(builtin_dir("tiny-sdxl") / "vae", root / "othervae")
    renderer = JobRenderer(root)
    renderer.load_base_model(_single(toy_file), "fp32")
    assert list(renderer.pipe.vae.config.block_out_channels) == [16, 32, 64]  # the toy VAE inside the file
    other = ResolvedModel(ref="othervae", kind="diffusers", digest="sha:othervae")
    renderer.load_base_model(_single(toy_file), "fp32", vae=other)
    assert list(renderer.pipe.vae.config.block_out_channels) == [32, 64]  # performance.vae


def test_the_tiny_builtin_exports_and_its_config_is_found_by_shape(tmp_path, capsys):
    from renderer.builtins import builtin_dir

    path = export_builtin_single_file("builtin:tiny-sdxl", tmp_path / "tiny.safetensors")
    header, _ = single_file.check_single_file(path, "sdxl-base")
    assert single_file.choose_config(header.shapes, path) == builtin_dir("tiny-sdxl")
    pipe = models.load_base_pipeline(_single(path), tmp_path, "cpu", "fp32")
    assert pipe.unet.config.sample_size == 32  # tiny-sdxl's, not toy-sdxl's 16
    capsys.readouterr()
    assert main(["models", "export", "builtin:tiny-controlnet", str(tmp_path / "cn.safetensors"), "--format", "single-file"]) == 2
    assert "cannot be exported as a single-file checkpoint" in capsys.readouterr().err


def _save_keys(path, shapes: dict):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))


@pytest.mark.parametrize("layout, message", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
      "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}, "Stable Diffusion 1.x checkpoint; castbook renders SDXL only"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "cond_stage_model.model.token_embedding.weight": (10, 8)}, "Stable Diffusion 2.x checkpoint; castbook renders SDXL only"),
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (4, 8), "lora_te2_x.lora_up.weight": (8, 4)}, "is a LoRA"),
    ({"controlnet_cond_embedding.conv_in.weight": (8, 3, 3, 3), "controlnet_down_blocks.0.weight": (8, 8, 1, 1)}, "is a ControlNet"),
    ({"image_proj.proj.weight": (8, 8), "ip_adapter.1.to_k_ip.weight": (8, 2048)}, "is an IP-Adapter"),
])
def test_what_is_not_an_sdxl_checkpoint_is_refused_by_name(tmp_path, layout, message):
    _save_keys(tmp_path / "m.safetensors", layout)
    with pytest.raises(JobError, match=message):
        models.load_base_pipeline(_single(tmp_path / "m.safetensors"), tmp_path, "cpu", "fp32")


def test_validate_says_what_a_wrong_checkpoint_is_before_rendering(tmp_path, capsys):
    _save_keys(tmp_path / "sd15.safetensors", {
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (8, 16, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)})
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "spec.yaml").write_text(SPEC.replace("toy.safetensors", "sd15.safetensors"))
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "spec.yaml:3:" in err and "sd15.safetensors is a Stable Diffusion 1.x checkpoint; castbook renders SDXL only" in err


def test_an_unknown_sdxl_architecture_asks_for_config(toy_file, tmp_path):
    sd = load_file(str(toy_file))
    sd["conditioner.embedders.1.model.transformer.resblocks.99.ln_1.weight"] = torch.ones(32)  # deeper encoder
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(JobError, match="no shipped config matches.*config:"):
        models.load_base_pipeline(_single(tmp_path / "odd.safetensors"), tmp_path, "cpu", "fp32")
    shutil.copytree(TOY_SDXL_DIR, tmp_path / "cfg", ignore=shutil.ignore_patterns("*.safetensors"))
    sd.pop("conditioner.embedders.1.model.transformer.resblocks.99.ln_1.weight")
    save_file(sd, str(tmp_path / "ok.safetensors"))  # an explicit config: is used as given
    pipe = models.load_base_pipeline(_single(tmp_path / "ok.safetensors", "cfg"), tmp_path, "cpu", "fp32")
    assert pipe.unet.config.cross_attention_dim == 64


def _forward_equal(ours: dict, theirs: dict, what: str):
    assert set(ours) == set(theirs), (what, sorted(set(ours) ^ set(theirs))[:5])
    assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in ours), what


def test_full_sdxl_base_key_map_holds_both_ways_on_meta():
    from diffusers.loaders import single_file_utils as su

    pipe = build_sdxl_random_pipeline(device="meta", torch_dtype=torch.float16)
    orig = single_file.to_original_state_dict(pipe)
    assert all(v.device.type == "meta" for v in orig.values())  # nothing allocated
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    assert single_file.choose_config(shapes, single_file.SHIPPED_CONFIGS["sdxl-base"]) == single_file.SHIPPED_CONFIGS["sdxl-base"]
    n_unet = sum(k.startswith("model.diffusion_model.") for k in orig)
    unet = su.convert_ldm_unet_checkpoint(orig, dict(pipe.unet.config))
    assert len(unet) == n_unet  # every original key maps back
    _forward_equal(unet, pipe.unet.state_dict(), "unet")
    _forward_equal(su.convert_ldm_vae_checkpoint(orig, dict(pipe.vae.config)), pipe.vae.state_dict(), "vae")
    te1 = {k.removeprefix("text_model."): v for k, v in su.convert_ldm_clip_checkpoint(orig).items()}
    _forward_equal(te1, {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}, "text_encoder")
    te2 = su.convert_open_clip_checkpoint(pipe.text_encoder_2, orig, prefix="conditioner.embedders.1.model.")
    _forward_equal(te2, pipe.text_encoder_2.state_dict(), "text_encoder_2")
    assert su.infer_diffusers_model_type(orig) == "xl_base"
    # the shipped config is the architecture's, field by field
    cfg = single_file.SHIPPED_CONFIGS["sdxl-base"]
    for sub, model in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder),
                       ("text_encoder_2", pipe.text_encoder_2)):
        shipped = json.loads((cfg / sub / "config.json").read_text())
        fields = [k for k in shipped if not k.startswith("_") and k not in ("architectures", "torch_dtype", "bos_token_id",
                                                                            "eos_token_id", "pad_token_id", "model_type")]
        have = dict(model.config) if sub in ("unet", "vae") else model.config.to_dict()
        mismatched = [f for f in fields if f in have and json.loads(json.dumps(have[f])) != shipped[f]]
        assert mismatched == [] and len([f for f in fields if f in have]) >= 8, (sub, mismatched)


def test_full_sdxl_refiner_key_map_and_config_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = single_file.SHIPPED_CONFIGS["sdxl-refiner"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae" / "config.json").read_text()))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))

    class Refiner:  # the attributes to_original_state_dict reads
        text_encoder = None

    r = Refiner()
    r.unet, r.vae, r.text_encoder_2 = unet, vae, te2
    orig = single_file.to_original_state_dict(r)
    assert round(sum(v.numel() for k, v in orig.items() if k.startswith("model.diffusion_model.")) / 1e9, 2) == 2.26  # the refiner UNet, ≈2.3 B
    shapes = {k: tuple(v.shape) for k, v in orig.items()}
    assert single_file.header_signature(shapes) == single_file.config_signature(cfg)
    assert su.infer_diffusers_model_type(orig) == "xl_refiner"
    _forward_equal(su.convert_ldm_unet_checkpoint(orig, dict(unet.config)), unet.state_dict(), "refiner unet")
    _forward_equal(su.convert_open_clip_checkpoint(te2, orig, prefix="conditioner.embedders.0.model."), te2.state_dict(), "te2")


def test_a_refiner_single_file_loads_and_runs_img2img(tmp_path):
    """A tiny refiner (OpenCLIP-only, aesthetic-score conditioning), saved in the original layout."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModelWithProjection

    from renderer.builtins import tiny_unet_config

    toy = _toy_fp32()
    torch.manual_seed(0)
    cfg = dict(tiny_unet_config(), cross_attention_dim=32, projection_class_embeddings_input_dim=5 * 8 + 32)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=toy.vae, text_encoder=None, text_encoder_2=CLIPTextModelWithProjection(toy.text_encoder_2.config),
        tokenizer=None, tokenizer_2=toy.tokenizer_2, unet=UNet2DConditionModel(**cfg), scheduler=toy.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.save_pretrained(tmp_path / "cfg")
    single_file.export_single_file(refiner, tmp_path / "refiner.safetensors", "tiny refiner")
    assert inspect_file(tmp_path / "refiner.safetensors", hashes=False)["kind"] == "sdxl-refiner"
    model = _single(tmp_path / "refiner.safetensors", "cfg")
    pipe = models.load_refiner_pipeline(model, tmp_path, "cpu", "fp32")
    assert isinstance(pipe, StableDiffusionXLImg2ImgPipeline)
    out = pipe("a boy", image=Image.new("RGB", (64, 64), (120, 80, 40)), num_inference_steps=2, strength=0.5,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
    with pytest.raises(JobError, match="SDXL refiner checkpoint, but an SDXL base checkpoint is needed"):
        models.load_base_pipeline(model, tmp_path, "cpu", "fp32")
