"""PNG infotext as A1111 1.10 writes it, read back by an independent parser (sd-parsers, from PyPI),
with the hashes recomputed the way A1111 computes them."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest
from PIL import Image
from runner_helpers import make_job
from sd_parsers import ParserManager

from renderer import png_metadata
from renderer.outputs import castbook_version
from renderer.png_metadata import encode_png, format_parameters, read_castbook_chunk
from schemas.job import ResolvedLora, ResolvedModel

REPO = Path(__file__).resolve().parents[1]
ENV = {"castbook": castbook_version(), "device": "cpu", "dtype": "fp32"}


def a1111_model_hash(path: Path) -> str:
    """A1111's `Model hash` (sd_models.model_hash since 1.x: sha256 of the whole file, 10 digits)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash (extensions-builtin/Lora: hashes.addnet_hash_safetensors, 12 digits)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def a1111_lora_hashes_field(value: str) -> dict[str, str]:
    """How A1111's Lora extension reads `Lora hashes` back (lora_script.py: infotext_pasted)."""
    pairs = [x.strip().split(":", 1) for x in value.split(",")]
    return {x[0].strip().replace(",", ""): x[1].strip() for x in pairs}


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "loras").mkdir()
    for name in ("luca_character", "portorosso_bg"):
        shutil.copy(REPO / "specs/examples/loras" / f"{name}.safetensors", tmp_path / "loras" / f"{name}.safetensors")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "disneyPixarCartoon_v10.safetensors").write_bytes(b"not loaded here" * 1000)
    return tmp_path


def loras(root: Path) -> tuple[ResolvedLora, ...]:
    out = []
    for name, w in (("luca_character", 0.8), ("portorosso_bg", 0.5)):
        path = root / "loras" / f"{name}.safetensors"
        out.append(ResolvedLora(name=name, path=f"loras/{name}.safetensors", weight=w, kind="character",
                                digest=hashlib.sha256(path.read_bytes()).hexdigest()))
    return tuple(out)


def parse_png(path: Path):
    info = ParserManager().parse(str(path))
    assert info is not None, "sd-parsers did not recognise the PNG"
    return info


def test_a1111_fields_read_by_sd_parsers_with_recomputed_hashes(root, tmp_path):
    model_file = root / "models" / "disneyPixarCartoon_v10.safetensors"
    base = ResolvedModel(ref="models/disneyPixarCartoon_v10.safetensors", kind="single_file",
                         digest=hashlib.sha256(model_file.read_bytes()).hexdigest())
    job = make_job(scheduler="dpmpp_2m_karras", loras=loras(root), prompt="luca, 1boy: smiling").model_copy(
        update={"base_model": base, "guidance_scale": 6.5})
    png = tmp_path / "out.png"
    png.write_bytes(encode_png(Image.new("RGB", (64, 64), (9, 9, 9)), job, ENV, root=root))

    info = parse_png(png)
    assert info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"  # separate fields
    assert (sampler.parameters["seed"], sampler.parameters["steps"], sampler.parameters["cfg_scale"]) == (
        str(job.seed), str(job.num_inference_steps), "6.5")
    assert sampler.model.name == "disneyPixarCartoon_v10"  # the file's stem
    assert sampler.model.hash == a1111_model_hash(model_file)
    assert sampler.prompts[0].value == "luca, 1boy: smiling <lora:luca_character:0.8> <lora:portorosso_bg:0.5>"
    assert sampler.negative_prompts[0].value == job.negative_prompt
    assert info.metadata["Version"] == f"castbook-{castbook_version()}"
    assert info.metadata["Size"] == "64x64"

    # sd-parsers splits a quoted value at its commas; read `Lora hashes` as A1111's Lora extension does
    params = png_metadata.parse_parameters(png_metadata.read_png_text(png)["parameters"])
    assert '"luca_character: ' in info.raw_parameters["parameters"]  # quoted, as A1111 writes it
    assert a1111_lora_hashes_field(params["Lora hashes"]) == {
        "luca_character": addnet_hash(root / "loras/luca_character.safetensors"),
        "portorosso_bg": addnet_hash(root / "loras/portorosso_bg.safetensors")}
    # the castbook chunk is still the full job
    assert read_castbook_chunk(png)["job"] == job.model_dump(mode="json")


def test_model_names_of_folders_and_builtins_and_lora_hashes_are_computed_once_per_file(root, tmp_path):
    folder = ResolvedModel(ref="models/my-sdxl", kind="diffusers", digest="ef" * 32)
    p = png_metadata.parse_parameters(format_parameters(make_job().model_copy(update={"base_model": folder})))
    assert (p["Model"], p["Model hash"]) == ("my-sdxl", "ef" * 5)
    builtin = png_metadata.parse_parameters(format_parameters(make_job()))
    assert builtin["Model"] == "tiny-sdxl"
    assert builtin["Model hash"] == hashlib.sha256(make_job().base_model.digest.encode()).hexdigest()[:10]

    png_metadata._lora_file_hash.cache_clear()
    job = make_job(loras=loras(root))
    first = encode_png(Image.new("RGB", (8, 8)), job, ENV, root=root)
    for seed in (2, 3):
        encode_png(Image.new("RGB", (8, 8)), make_job(seed=seed, loras=loras(root)), ENV, root=root)
    assert png_metadata._lora_file_hash.cache_info().misses == 2  # one hash per LoRA file, not per image
    assert encode_png(Image.new("RGB", (8, 8)), job, ENV, root=root) == first  # deterministic bytes
