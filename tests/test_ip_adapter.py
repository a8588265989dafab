"""IP-Adapter on builtin:tiny-sdxl with builtin:tiny-ip-adapter (random, in the downloaded layout):
diffusers' loader from local files, scale 0, no leak between jobs, LoRA + ControlNet, the spec side."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _render_helpers import control, job, lora
from PIL import Image, ImageDraw

from core.errors import JobError
from renderer.builtins import builtin_dir
from renderer.ip_adapter import BUILTIN_FILES, ENCODER_DIR, adapter_state_from_unet
from renderer.pipeline import JobRenderer
from schemas.job import ResolvedIpAdapter

REPO = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("iproot")
    for i, (colour, box) in enumerate([("red", (8, 8, 40, 40)), ("red", (20, 16, 56, 52)), ("blue", (10, 20, 50, 60))]):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse(box, fill=colour)
        im.save(d / f"ref{i}.png")
    Image.new("RGB", (64, 64), "black").save(d / "pose.png")
    ImageDraw.Draw(im := Image.open(d / "pose.png").copy()).ellipse((10, 10, 50, 50), outline="white", width=2)
    im.save(d / "pose.png")
    shutil.copytree(REPO / "specs" / "examples" / "loras", d / "specs" / "examples" / "loras")
    return d


def ip(root: Path, images=("ref0.png", "ref1.png"), scale: float = 1.0) -> ResolvedIpAdapter:
    return ResolvedIpAdapter(model="builtin:tiny-ip-adapter", digest="builtin:tiny-ip-adapter@r1",
                             image_encoder="builtin:tiny-ip-adapter", encoder_digest="builtin:tiny-ip-adapter@r1",
                             images=tuple(images), image_digests=tuple(_digest(root / p) for p in images), scale=scale)


@pytest.fixture(scope="module")
def renderer(root):
    return JobRenderer(root)


def px(renderer, j):
    return np.array(renderer.render(j).image).astype(int)


def test_the_builtin_has_the_downloaded_layout_and_loads_through_diffusers():
    from safetensors import safe_open

    folder = builtin_dir("tiny-ip-adapter")
    with safe_open(str(folder / BUILTIN_FILES["tiny-ip-adapter"]), framework="pt") as f:
        keys = set(f.keys())
    assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
    assert (folder / ENCODER_DIR / "config.json").is_file() and (folder / ENCODER_DIR / "model.safetensors").is_file()
    # diffusers' own loader reads it back; the inverse conversion gives the file's tensors
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(builtin_dir("tiny-sdxl"), local_files_only=True)
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=BUILTIN_FILES["tiny-ip-adapter"],
                         image_encoder_folder=ENCODER_DIR, local_files_only=True)
    assert pipe.image_encoder is not None  # the encoder folder is a CLIPVisionModelWithProjection
    saved = load_file(str(folder / BUILTIN_FILES["tiny-ip-adapter"]))
    back = adapter_state_from_unet(pipe.unet)
    assert set(back) == set(saved)
    assert all(np.array_equal(back[k].numpy(), saved[k].numpy()) for k in saved)


def test_adapter_changes_pixels_scale_zero_is_exact_and_nothing_leaks(root, renderer):
    base = px(renderer, job())
    with_ip = px(renderer, job(ip_adapter=ip(root)))
    other_refs = px(renderer, job(ip_adapter=ip(root, images=("ref2.png",))))
    zero = px(renderer, job(ip_adapter=ip(root, scale=0.0)))
    after = px(renderer, job())
    assert np.abs(with_ip - base).mean() > 1.0
    assert not np.array_equal(with_ip, other_refs)  # the references matter
    assert np.array_equal(zero, base)  # scale 0: exactly the no-adapter pixels
    assert np.array_equal(after, base)  # unloaded: a later job without the adapter is untouched
    fresh = px(JobRenderer(root), job())
    assert np.array_equal(fresh, base)
    # embeddings are computed once per (encoder, image)
    hits = renderer.ip_adapters.embeds.stats["hits"]
    px(renderer, job(ip_adapter=ip(root)))
    assert renderer.ip_adapters.embeds.stats["hits"] >= hits + 2


def test_reference_order_and_average(root, renderer):
    a = px(renderer, job(ip_adapter=ip(root, images=("ref0.png", "ref1.png"))))
    b = px(renderer, job(ip_adapter=ip(root, images=("ref1.png", "ref0.png"))))
    one = px(renderer, job(ip_adapter=ip(root, images=("ref0.png",))))
    assert np.abs(a - b).max() <= 1  # an average: order changes at most float rounding
    assert not np.array_equal(a, one)


def test_with_lora_and_controlnet(root, renderer):
    lo = (lora(root, "luca_character", 0.8),)
    ctl = (control(root, "pose.png", "canny"),)
    lora_only = px(renderer, job(loras=lo))
    both = px(renderer, job(loras=lo, ip_adapter=ip(root)))
    assert np.abs(both - lora_only).mean() > 1.0
    ctl_only = px(renderer, job(controls=ctl))
    ctl_ip = px(renderer, job(controls=ctl, ip_adapter=ip(root)))
    assert np.abs(ctl_ip - ctl_only).mean() > 1.0
    assert np.array_equal(px(renderer, job(controls=ctl)), ctl_only)  # unloaded for the ControlNet pipe too


def _ip_scales(renderer) -> dict[str, list[float]]:
    """The IP-Adapter scales the UNet's attention processors hold, by block (`mid_block`, `down_blocks.1`, ...)."""
    def block(name: str) -> str:
        return ".".join(name.split(".")[:1 if name.startswith("mid_block") else 2])

    return {block(name): list(proc.scale) for name, proc in renderer.pipe.unet.attn_processors.items()
            if hasattr(proc, "scale")}


def test_per_block_scale_reaches_only_the_named_blocks(root, renderer):
    """A scale per UNet block (diffusers' InstantStyle form): named blocks get it, the rest 0, and the
    next job with a plain number sets every block again."""
    from schemas.ip_adapter import canonical_ip_scale

    base = px(renderer, job())
    uniform = px(renderer, job(ip_adapter=ip(root, scale=1.0)))
    mid = px(renderer, job(ip_adapter=ip(root, scale=canonical_ip_scale({"mid": 1.0}))))
    assert _ip_scales(renderer) == {"mid_block": [1.0], "down_blocks.1": [0.0], "up_blocks.0": [0.0]}
    assert np.abs(mid - base).mean() > 0.1 and not np.array_equal(mid, uniform)
    zero = px(renderer, job(ip_adapter=ip(root, scale=canonical_ip_scale({"up": {"block_0": [0.0, 0.0, 0.0]}}))))
    assert np.array_equal(zero, base)  # every block at 0: exactly the no-adapter pixels
    assert np.array_equal(px(renderer, job(ip_adapter=ip(root, scale=1.0))), uniform)
    assert set(map(tuple, _ip_scales(renderer).values())) == {(1.0,)}
    with pytest.raises(JobError, match=r"names down.block_2, which has no .*down \['block_1'\], mid, up \['block_0'\]"):
        renderer.render(job(ip_adapter=ip(root, scale=canonical_ip_scale({"down": {"block_2": 1.0}}))))
    with pytest.raises(JobError, match="Expected 3 scales for up.block_0, got 2"):
        renderer.render(job(ip_adapter=ip(root, scale=canonical_ip_scale({"up": {"block_0": [1.0, 1.0]}}))))
    assert np.array_equal(px(renderer, job()), base)


def test_bad_adapter_file_is_a_clear_error(root, renderer, tmp_path):
    bad = ip(root).model_copy(update={"model": "missing.safetensors", "digest": "x"})
    with pytest.raises(JobError, match="does not exist"):
        renderer.render(job(ip_adapter=bad))
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(root / "not_ip.safetensors"))
    with pytest.raises(JobError, match="not an IP-Adapter"):
        renderer.render(job(ip_adapter=ip(root).model_copy(update={"model": "not_ip.safetensors", "digest": "y"})))


# ----------------------------------------------------------------------------- the spec side (no torch)

SPEC = """\
defaults: {preset: draft}
presets:
  draft: {width: 64, height: 64, num_inference_steps: 2}
characters:
  hero:
    description: a hero
    references: ["refs/*.png"]
    ip_adapter: {model: builtin:tiny-ip-adapter, scale: 0.7}
  villain:
    description: a villain
    ip_adapter: {model: adapters/ip.safetensors, image_encoder: adapters/image_encoder, images: ["villain/*.png"]}
  plain:
    description: a plain one
scenes:
  park: {prompt: "{{ character }} in a park"}
  noip: {prompt: "{{ character }} at home", use_ip_adapter: false}
jobs:
  main: {characters: [hero, villain, plain], scenes: [park, noip]}
  base: {characters: [hero], scenes: [park], use_ip_adapter: false}
  sweep: {characters: [hero], scenes: [park], sweep: {ip_adapter.scale: [0, 0.5]}}
"""


@pytest.fixture()
def proj(tmp_path):
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    for rel in ("refs/a.png", "refs/b.png", "villain/v.png", "adapters/ip.safetensors",
                "adapters/image_encoder/config.json", "adapters/image_encoder/model.safetensors"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "spec.yaml").write_text(SPEC)
    return root


def _jobs(root, text=None):
    from schemas.plan import load_plan

    if text is not None:
        (root / "spec.yaml").write_text(text)
    return {j.name: j for j in load_plan([root / "spec.yaml"]).jobs}


def test_spec_resolves_adapters_images_and_switches(proj):
    jobs = _jobs(proj)
    hero = jobs["main/hero/park/draft/seed-0"].ip_adapter
    assert hero.model == "builtin:tiny-ip-adapter" and hero.scale == 0.7
    assert hero.images == ("refs/a.png", "refs/b.png")  # default: the character's references
    assert hero.image_digests == (_digest(proj / "refs/a.png"), _digest(proj / "refs/b.png"))
    villain = jobs["main/villain/park/draft/seed-0"].ip_adapter
    assert villain.images == ("villain/v.png",) and villain.digest == _digest(proj / "adapters/ip.safetensors")
    assert villain.image_encoder == "adapters/image_encoder" and villain.scale == 0.6
    assert jobs["main/plain/park/draft/seed-0"].ip_adapter is None
    assert jobs["main/hero/noip/draft/seed-0"].ip_adapter is None  # the scene turns it off
    assert jobs["base/hero/park/draft/seed-0"].ip_adapter is None  # and the job
    assert [jobs[f"sweep/hero/park/draft/seed-0-ip={s}"].ip_adapter.scale for s in ("0", "0.5")] == [0.0, 0.5]


def test_per_block_scales_in_the_spec_and_in_sweeps(proj):
    """`scale` may be diffusers' per-block dict, on the character or as a sweep value: one canonical
    form in the job (so two spellings share a key), a readable name, the grid label, the infotext."""
    from renderer.png_metadata import format_parameters, parse_parameters

    text = SPEC.replace("scale: 0.7}", "scale: {mid: 1, up: {block_0: [0, 1, 0]}}}").replace(
        "ip_adapter.scale: [0, 0.5]", "ip_adapter.scale: [0.5, {mid: 1.0}]")
    jobs = _jobs(proj, text)
    hero = jobs["main/hero/park/draft/seed-0"]
    assert hero.ip_adapter.scale == {"down": 0.0, "mid": 1.0, "up": {"block_0": [0.0, 1.0, 0.0]}}
    swept = [j for n, j in jobs.items() if n.startswith("sweep/")]
    assert sorted(j.name for j in swept) == ["sweep/hero/park/draft/seed-0-ip=0.5",
                                             "sweep/hero/park/draft/seed-0-ip=mid@1"]
    (mid,) = [j for j in swept if j.name.endswith("mid@1")]
    assert mid.ip_adapter.scale == {"down": 0.0, "mid": 1.0, "up": 0.0} and mid.sweep == {"ip_adapter.scale": "mid@1"}
    assert json.loads(parse_parameters(format_parameters(hero))["IP-Adapter scale"]) == hero.ip_adapter.scale
    plain = _jobs(proj, text.replace("up: {block_0: [0, 1, 0]}", "up: 0"))
    assert plain["main/hero/park/draft/seed-0"].key != hero.key


@pytest.mark.parametrize("scale, message", [
    ("{middle: 1}", r"characters.hero.ip_adapter.scale.*middle"),
    ("{up: {block_0: -1}}", r"characters.hero.ip_adapter.scale.*greater than or equal to 0"),
    ("{up: {b0: 1}}", r"characters.hero.ip_adapter.scale.*up"),
    ("5", r"characters.hero.ip_adapter.scale"),
])
def test_bad_per_block_scales_are_clear(proj, scale, message):
    from schemas.loader import SpecErrors

    with pytest.raises(SpecErrors, match=message):
        _jobs(proj, SPEC.replace("scale: 0.7}", f"scale: {scale}}}"))
    with pytest.raises(SpecErrors, match=r"ip_adapter.scale\[1\]: per-block IP-Adapter scale: mid: .*less than"):
        _jobs(proj, SPEC.replace("ip_adapter.scale: [0, 0.5]", "ip_adapter.scale: [0, {mid: 9}]"))
    with pytest.raises(SpecErrors, match=r"ip_adapter.scale\[2\]: the same scale as value 1"):
        _jobs(proj, SPEC.replace("ip_adapter.scale: [0, 0.5]", "ip_adapter.scale: [0, {mid: 1.0}, {mid: 1, down: 0}]"))
    with pytest.raises(SpecErrors, match=r"ip_adapter.scale\[1\]: the same scale as value 0 \(`ip=0`"):
        _jobs(proj, SPEC.replace("ip_adapter.scale: [0, 0.5]", "ip_adapter.scale: [0, {up: {block_0: [0, 0, 0]}}]"))
    with pytest.raises(SpecErrors, match="per-block mapping"):
        _jobs(proj, SPEC.replace("ip_adapter.scale: [0, 0.5]", "ip_adapter.scale: [0, high]"))


def test_key_holds_adapter_encoder_images_and_scale_only_when_used(proj):
    before = {n: j.key for n, j in _jobs(proj).items()}
    assert "ip_adapter" not in _jobs(proj)["main/plain/park/draft/seed-0"].pixel_fields()
    (proj / "refs/b.png").write_bytes(b"changed")
    after = {n: j.key for n, j in _jobs(proj).items()}
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {n for n in before if "/hero/park/" in n and not n.startswith("base/")}
    (proj / "adapters/image_encoder/model.safetensors").write_bytes(b"new encoder")
    again = {n: j.key for n, j in _jobs(proj).items()}
    assert {n for n in after if after[n] != again[n]} == {n for n in after if "/villain/park/" in n}
    scaled = {n: j.key for n, j in _jobs(proj, SPEC.replace("scale: 0.7", "scale: 0.8")).items()}
    assert scaled["main/hero/park/draft/seed-0"] != again["main/hero/park/draft/seed-0"]
    assert scaled["main/plain/park/draft/seed-0"] == again["main/plain/park/draft/seed-0"]


@pytest.mark.parametrize("change, message", [
    ("builtin:tiny-ip-adapter, scale", "unknown built-in IP-Adapter"),
    ("adapters/ip.bin, image_encoder: adapters/image_encoder, scale", "must be a .safetensors"),
    ("adapters/ip.safetensors, scale", "`image_encoder` is required"),
])
def test_bad_ip_adapter_specs_are_clear(proj, change, message):
    from schemas.loader import SpecErrors

    bad = SPEC.replace("builtin:tiny-ip-adapter, scale", change.replace("builtin:tiny-ip-adapter", "builtin:nope")
                       if "builtin" in change else change)
    with pytest.raises(SpecErrors, match=message):
        _jobs(proj, bad)


def test_missing_images_and_sweeps_without_adapter_are_errors(proj):
    from schemas.loader import SpecErrors

    with pytest.raises(SpecErrors, match="matches no file"):
        _jobs(proj, SPEC.replace("villain/*.png", "nobody/*.png"))
    with pytest.raises(SpecErrors, match="has an `ip_adapter` to sweep"):
        _jobs(proj, SPEC.replace("sweep: {characters: [hero]", "sweep: {characters: [plain]"))
    with pytest.raises(SpecErrors, match="needs images"):
        _jobs(proj, SPEC.replace('    references: ["refs/*.png"]\n', ""))


def test_infotext_and_chunk_record_the_adapter(proj):
    from renderer.png_metadata import castbook_metadata, format_parameters, parse_parameters

    jobs = _jobs(proj)
    params = parse_parameters(format_parameters(jobs["main/villain/park/draft/seed-0"]))
    assert params["IP-Adapter"] == "ip" and params["IP-Adapter scale"] == "0.6"
    assert params["IP-Adapter hash"] == _digest(proj / "adapters/ip.safetensors")[:10]
    chunk = castbook_metadata(jobs["main/hero/park/draft/seed-0"], {})
    assert chunk["ip_adapter"]["scale"] == 0.7 and chunk["ip_adapter"]["model"] == "builtin:tiny-ip-adapter"
    assert "ip_adapter" not in castbook_metadata(jobs["main/plain/park/draft/seed-0"], {})


def test_identity_source_table():
    from reports.identity import by_source, identity_source

    lora = {"loras": [{"kind": "character", "weight": 1.0}]}
    ipa = {"ip_adapter": {"scale": 0.6}}
    assert identity_source(lora) == "LoRA only" and identity_source(ipa) == "adapter only"
    assert identity_source({**lora, **ipa}) == "both" and identity_source({}) == "neither"
    assert identity_source({"loras": [{"kind": "style", "weight": 1.0}], "ip_adapter": {"scale": 0.0}}) == "neither"
    assert identity_source({"ip_adapter": {"scale": {"down": 0.0, "mid": 0.0, "up": {"block_0": [0.0, 0.0]}}}}) \
        == "neither"
    assert identity_source({**lora, "ip_adapter": {"scale": {"down": 0.0, "mid": 1.0, "up": 0.0}}}) == "both"

    def rec(source, job, clip, ok):
        return {"identity_source": source, "job": job, "selected": True, "clip_i_mean": clip, "pass": ok}

    records = [rec("LoRA only", "main", 0.4, True), rec("LoRA only", "main", 0.1, False),
               rec("adapter only", "ad", 0.3, True), rec("neither", "base", -0.2, False)]
    table = by_source(records)
    assert list(table) == ["LoRA only", "adapter only", "neither"]
    assert table["LoRA only"]["pass_rate"] == 0.5 and table["adapter only"]["jobs"] == ["ad"]
    assert by_source([r for r in records if r["identity_source"] != "adapter only"]) == {}
