"""The proof the issue asks for: `builtin:toy-ip-adapter` and held-out characters' reference images.

STATUS (measured 2026-12-03): all four pass with the committed adapter (recipe 2, trained by
distillation from the text path; alone at its recipe's scale, 1.0). With luca's LoRA the adapter
works in the UNet's mid block only (a per-block scale, `{mid: 1.0}`): the LoRA brings the colour, the
adapter the shape. At one scale for every block the adapter paints luca's body green when the
trigger word comes first; that is kept as `xfail(strict=True)`. Figures: docs/TOYWORLD.md "Toy IP-Adapter".

On the committed toy base model (builtin:toy-sdxl) and the committed adapter (trained by
`castbook toymodel train-ip-adapter specs/toy/toy-ip-adapter.yaml` with luca, alberto and giulia
held out), through `castbook render`, read back by the pixel checker:

1. without any LoRA, each held-out character rendered with `ip_adapter` on its own references
   (fresh toy-world pictures, generator seed 99) is drawn in its colour AND shape in >= 60 % of
   the images; the base model alone (same prompts and seeds) in about 0 %; the background asked
   in the prompt stays right in >= 90 %;
2. `scale: 0` gives exactly the pixels of the render without the adapter;
3. luca's LoRA plus the adapter (mid block only) hits at least as often as the LoRA alone;
4. a job without the adapter after one with it renders the same pixels as a fresh renderer.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ruamel.yaml import YAML

from castbook.cli import main as castbook
from schemas.toy import load_ip_adapter_spec
from toyworld import checker as ev
from toyworld import world as tw

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ADAPTER = REPO / "renderer" / "weights" / "toy" / "ip-adapter"
HELD_OUT = ["luca", "alberto", "giulia"]
BACKGROUNDS = ["beach", "town", "night"]
SCALE = load_ip_adapter_spec(REPO / "specs" / "toy" / "toy-ip-adapter.yaml").eval.scale  # the toy adapter's scale
MIN_HIT = 0.60  # identity (colour and shape) with the adapter, each character
MAX_BASE_HIT = 0.20  # the base model alone
MIN_BACKGROUND = 0.90
# Body colour with the adapter (the prompt does not name it), from 0 % without: measured 83 / 100 / 100 %
# here (luca / alberto / giulia; identity 83 / 92 / 96 %, luca's LoRA alone 67 %, LoRA + adapter 0 %).
MIN_COLOUR_EACH = 0.50
MIN_COLOUR_MEAN = 0.75
# With a LoRA, the adapter in the mid block only (diffusers' per-block scale): measured 24 / 24 for luca
# at mid 0.5 / 1.0 / 1.5 / 2.0, where the LoRA alone draws 16 / 24 (its shape is what misses). The mid
# block alone carries shape, not colour: without a LoRA it draws luca's heart in 100 %, brown in 0 %.
BOTH_SCALE = {"mid": 1.0}


def _spec(root: Path) -> Path:
    characters = {}
    for name in HELD_OUT:
        c, s, e = tw.CHARACTERS[name]
        tw.generate_dataset(root / "refs" / name, 4, seed=99, only=tw.character_filter(name), prefix=name)
        # No colour or shape in the prompt and no trigger word (no LoRA): identity can come only from the
        # references. (With "a brown heart character ..." the base model alone draws them: 83-100 %.)
        characters[name] = {"description": f"a character with {e} eyes", "references": [f"refs/{name}/*.png"],
                            "threshold": 0.0, "ip_adapter": {"model": "builtin:toy-ip-adapter", "scale": SCALE}}
    characters["luca"]["loras"] = [{"name": "luca", "weight": 1.0}]  # its trigger word `luca` comes with it
    seeds = {"count": 8, "start": 1}  # 24 renders per character and job: one image is 4 %, not 8
    spec = {
        "defaults": {"base_model": "builtin:toy-sdxl", "preset": "toy", "scheduler": "euler"},
        "presets": {"toy": {"extends": "standard", "width": 64, "height": 64, "num_inference_steps": 20,
                            "guidance_scale": 5.0}},
        "loras": {"luca": {"path": "loras/luca.safetensors", "kind": "character", "trigger_words": ["luca"]}},
        "characters": characters,
        "scenes": {bg: {"prompt": "{{ character }} " + tw.BACKGROUND_PHRASES[bg]} for bg in BACKGROUNDS},
        "jobs": {
            "adapter": {"characters": HELD_OUT, "scenes": BACKGROUNDS, "seeds": seeds, "use_loras": False},
            "base": {"characters": HELD_OUT, "scenes": BACKGROUNDS, "seeds": seeds, "use_loras": False,
                     "use_ip_adapter": False},
            "lora": {"characters": ["luca"], "scenes": BACKGROUNDS, "seeds": seeds, "use_ip_adapter": False},
            "both": {"characters": ["luca"], "scenes": BACKGROUNDS, "seeds": seeds,
                     "sweep": {"ip_adapter.scale": [BOTH_SCALE]}},
            "both_uniform": {"characters": ["luca"], "scenes": BACKGROUNDS, "seeds": seeds},  # scale 1.0 everywhere
            "zero": {"characters": ["alberto"], "scenes": ["beach"], "seeds": [1, 2], "use_loras": False,
                     "sweep": {"ip_adapter.scale": [0.0]}},
        },
    }
    (root / "loras").mkdir()
    (root / "loras" / "luca.safetensors").write_bytes((REPO / "specs/examples/loras/luca.safetensors").read_bytes())
    path = root / "render.yaml"
    with path.open("w") as f:
        YAML().dump(spec, f)
    return path


def _pixels(run_dir: Path, name: str) -> np.ndarray:
    (row,) = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()
              if json.loads(line).get("name") == name]
    return np.array(Image.open(run_dir / row["image"]).convert("RGB"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `castbook render` of the proof spec; (run folder, figures)."""
    if not (ADAPTER / "image_encoder" / "config.json").is_file():
        pytest.fail("the committed toy IP-Adapter is missing (renderer/weights/toy/ip-adapter)")
    root = tmp_path_factory.mktemp("ipproof") / "proj"
    (root / ".git").mkdir(parents=True)
    spec = _spec(root)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core CPU, 2 threads measured up to 50x slower per image
    try:
        with redirect_stdout(io.StringIO()):
            rc = castbook(["render", str(spec), "--root", str(root), "--out", str(root / "runs"),
                           "--executor", "local", "--quiet", "--no-report"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir() and (p / "plan.jsonl").exists()]
    items = ev.evaluate_path(run_dir, keep_items=True)["items"]
    plan = {json.loads(line)["name"]: json.loads(line) for line in (run_dir / "plan.jsonl").read_text().splitlines()}

    def rate(job: str, character: str, attribute: str) -> float:  # identity = colour and shape
        hits = [it for it in items if plan[it["name"]]["job"] == job and plan[it["name"]]["character"] == character]
        ok = [all(it["predicted"][k] == it["expected"][k] for k in (("colour", "shape") if attribute == "identity"
                                                                        else (attribute,))) for it in hits]
        assert ok, f"no images of {job}/{character}"
        return sum(ok) / len(ok)

    figures = {c: {"base": rate("base", c, "identity"), "adapter": rate("adapter", c, "identity"),
                   "base_colour": rate("base", c, "colour"), "adapter_colour": rate("adapter", c, "colour"),
                   "background": rate("adapter", c, "background")} for c in HELD_OUT}
    figures["luca"].update(lora=rate("lora", "luca", "identity"), both=rate("both", "luca", "identity"),
                           both_uniform=rate("both_uniform", "luca", "identity"),
                           both_background=rate("both", "luca", "background"))
    print(json.dumps(figures))
    return run_dir, figures


def test_identity_from_references_alone_reaches_the_bar(run):
    _, figures = run
    for c in HELD_OUT:
        assert figures[c]["base"] <= MAX_BASE_HIT, figures
        assert figures[c]["adapter"] >= MIN_HIT, figures


def test_colour_comes_from_the_references_and_the_scene_stays(run):
    """The body colour of each held-out character, which the prompt does not name, moves to the
    references' (baseline 0 %); the background asked for stays."""
    _, figures = run
    for c in HELD_OUT:
        assert figures[c]["base_colour"] <= MAX_BASE_HIT, figures
        assert figures[c]["adapter_colour"] >= MIN_COLOUR_EACH, figures
        assert figures[c]["background"] >= MIN_BACKGROUND, figures
    assert np.mean([figures[c]["adapter_colour"] for c in HELD_OUT]) >= MIN_COLOUR_MEAN, figures


def test_lora_and_adapter_together_hit_at_least_as_often_as_the_lora(run):
    _, figures = run
    assert figures["luca"]["both"] >= figures["luca"]["lora"], figures
    assert figures["luca"]["both_background"] >= MIN_BACKGROUND, figures


@pytest.mark.xfail(strict=True, reason="measured 2026-12-03: luca's LoRA alone 67 %, + the toy adapter at 1.0 in every "
                   "block 0 %: hearts, but green. The trigger word first ('luca, a character ...') is the cause: "
                   "without any LoRA it takes the adapter's colour for luca from 92 % to 0 % (docs/TOYWORLD.md)")
def test_lora_and_adapter_at_one_scale_for_every_block(run):
    _, figures = run
    assert figures["luca"]["both_uniform"] >= figures["luca"]["lora"], figures


def test_scale_zero_is_exactly_the_render_without_adapter(run):
    run_dir, _ = run
    for seed in (1, 2):
        zero = _pixels(run_dir, f"zero/alberto/beach/toy/seed-{seed}-ip=0")
        assert np.array_equal(zero, _pixels(run_dir, f"base/alberto/beach/toy/seed-{seed}")), seed


def test_no_leak_after_an_adapter_job(tmp_path):
    """One renderer: adapter job, then the same job without it == a fresh renderer's render."""
    from renderer.pipeline import JobRenderer
    from schemas.plan import load_plan

    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    spec = _spec(root)
    jobs = {j.name: j for j in load_plan([spec]).jobs}
    with_ip, without = jobs["adapter/giulia/town/toy/seed-1"], jobs["base/giulia/town/toy/seed-1"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core CPU: see the fixture above
    try:
        used = JobRenderer(root)
        a = np.array(used.render(with_ip).image)
        after = np.array(used.render(without).image)
        fresh = np.array(JobRenderer(root).render(without).image)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(after, fresh)
    assert not np.array_equal(a, fresh)


def test_recipe_runs_end_to_end_and_writes_the_downloaded_layout(tmp_path):
    """A few steps of the committed recipe's code (tiny data): export + reload through diffusers."""
    from safetensors import safe_open

    from schemas.toy import ToyIpAdapterSpec
    from toyworld.ip_adapter import ADAPTER_FILE, run_ip_adapter

    committed = load_ip_adapter_spec(REPO / "specs" / "toy" / "toy-ip-adapter.yaml")
    spec = ToyIpAdapterSpec(**{**committed.model_dump(), "data": {"count": 24, "seed": 0, "size": 64}, "steps": 2,
                               "batch_size": 2, "checkpoint_every": 100, "work_dir": str(tmp_path / "work"),
                               "output": str(tmp_path / "out"), "max_minutes": None,
                               "encoder": {**committed.encoder.model_dump(), "pretrain_steps": 20, "finetune_steps": 3,
                                           "finetune_batch_size": 4, "recoloured_copies": 1},
                               "eval": {**committed.eval.model_dump(), "characters": ["luca"], "per_character": 1,
                                        "references": 2, "steps": 2}})
    record = run_ip_adapter(spec, REPO, log=lambda m: None)
    with safe_open(str(tmp_path / "out" / ADAPTER_FILE), framework="pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype.is_floating_point and f.get_tensor(k).element_size() == 2 for k in keys)
    assert {"image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
    assert (tmp_path / "out" / "image_encoder" / "model.safetensors").is_file()
    assert set(record["eval"]["luca"]) == {"adapter", "baseline"}
    assert (tmp_path / "out.training.json").is_file()
