"""LoRA trainer on builtin:tiny-sdxl with a tiny generated dataset (CPU, real diffusers/peft)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from schemas.job import RenderJob, ResolvedLora
from schemas.training import TrainingSpec

# LoRA on attention + projections + conv in/out: the tiny UNet is random, so attention-only
# LoRA moves the loss slowly; these targets let 100 steps show real learning.
TEST_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv_in", "conv_out"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}




pytestmark = pytest.mark.usefixtures("one_thread")


def make_dataset(folder: Path, trigger: str = "zqx") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, colour) in enumerate(COLOURS.items()):
        im = Image.new("RGB", (32, 32), (240, 240, 240))
        ImageDraw.Draw(im).ellipse((6, 6, 26, 26), fill=colour)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"{trigger}, a {name} circle")


def make_spec(**over) -> TrainingSpec:
    base = {
        "base_model": "builtin:tiny-sdxl",
        "kind": "character",
        "dataset": {"folders": ["data"], "trigger": "zqx"},
        "lora": {"rank": 4, "target_modules": TEST_TARGETS},
        "train": {"steps": 100, "learning_rate": 1e-2, "resolution": 32, "batch_size": 2, "seed": 7},
        "checkpoints": {"every": 50, "keep_last": 2},
        "output": {"name": "toy", "folder": "out", "format": "both", "registry": "specs/loras.yaml"},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return TrainingSpec.model_validate(base)


REGISTRY = """\
# LoRA registry (hand-written comments must survive castbook train)
loras:
  # the hero
  luca_character:
    path: specs/examples/loras/luca_character.safetensors  # keep me
    kind: character
    trigger_words: [luca]
  portorosso_bg:
    path: specs/examples/loras/portorosso_bg.safetensors
    kind: background
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from trainer.train import train_lora

    root = tmp_path_factory.mktemp("train")
    make_dataset(root / "data")
    (root / "specs").mkdir()
    (root / "specs" / "loras.yaml").write_text(REGISTRY)
    spec = make_spec()
    result = train_lora(spec, root, progress=False, render=False)
    return root, spec, result


def test_100_steps_bring_loss_below_half_of_start(trained):
    # Observed: last-10 mean / first-10 mean ≈ 0.23 (seed 7, lr 1e-2); 0.5 leaves room for noise.
    _, _, result = trained
    assert result.steps == 100 and len(result.losses) == 100
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-10:])
    assert last < 0.5 * first, f"loss went {first:.4f} -> {last:.4f}, ratio {last / first:.2f} (want < 0.5)"


def test_output_has_training_metadata_and_checkpoints_are_pruned(trained):
    from safetensors import safe_open

    root, spec, result = trained
    assert result.lora_file == root / "out" / "toy.safetensors"
    with safe_open(str(result.lora_file), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["castbook.steps"] == "100" and meta["castbook.rank"] == "4"
    assert meta["castbook.spec_hash"] == result.spec_hash and meta["castbook.dataset_digest"] == result.dataset_digest
    assert "lora_adapter_metadata" in meta  # diffusers' own header: alpha survives loading
    assert all(k.startswith("unet.") for k in keys)
    names = [p.name for p in result.checkpoints]
    assert names == ["step-000050", "step-000100"]
    ck = result.checkpoints[-1]
    assert sorted(p.name for p in ck.iterdir()) == ["lora.safetensors", "optimizer.safetensors", "state.json",
                                                   "trainable.safetensors"]
    assert not list(ck.glob("*.pt")) and not list(ck.glob("*.bin"))


def _job(root: Path, loras=()) -> RenderJob:
    from renderer.builtins import builtin_digest
    from schemas.job import ResolvedModel, job_key

    job = RenderJob(key="", name="t", job="t", character=None, scene="s", preset="p", prompt="zqx, a red circle",
                    negative_prompt="", seed=3, width=32, height=32, num_inference_steps=2, guidance_scale=1.0,
                    scheduler="euler", dtype="fp32",
                    base_model=ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest=builtin_digest("tiny-sdxl")),
                    loras=tuple(loras))
    return job.model_copy(update={"key": job_key(job)})


@pytest.mark.slow
def test_trained_lora_and_kohya_export_load_in_the_renderer_and_change_the_image(trained):
    from core.digests import file_digest
    from renderer.pipeline import JobRenderer

    root, _, result = trained
    renderer = JobRenderer(root, device="cpu")
    base = np.asarray(renderer.render(_job(root)).image, dtype=np.int16)
    images = {}
    for name, path in (("toy", result.lora_file), ("toy_kohya", result.kohya_file)):
        lora = ResolvedLora(name=name, path=path.relative_to(root).as_posix(), digest=file_digest(path), weight=1.0,
                            kind="character")
        images[name] = np.asarray(renderer.render(_job(root, [lora])).image, dtype=np.int16)
    assert np.abs(images["toy"] - base).mean() > 1.0, "the trained LoRA did not change the image"
    # Same weights in two formats (kohya carries alpha explicitly) give the same picture.
    assert np.abs(images["toy"] - images["toy_kohya"]).max() <= 2


def test_lora_header_does_not_depend_on_the_hash_seed():
    """Two trainings of one spec write the same bytes: the adapter config in the header must not
    follow PYTHONHASHSEED (peft keeps target_modules as a set)."""
    import os
    import subprocess
    import sys

    script = (
        "import json; from peft import LoraConfig; from trainer.models import adapter_config\n"
        f"class Model: peft_config = {{'default': LoraConfig(r=4, target_modules={TEST_TARGETS!r})}}\n"
        "print(json.dumps(adapter_config(Model()), default=list)); "
        "print(json.dumps(Model.peft_config['default'].to_dict(), default=list))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    outs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.splitlines() for seed in (1, 2, 3)]
    assert len({raw for _, raw in outs}) > 1, "peft's own order did not vary: this test shows nothing"
    assert len({ours for ours, _ in outs}) == 1
    assert json.loads(outs[0][0])["target_modules"] == sorted(TEST_TARGETS)


def test_registry_entry_added_and_comments_kept(trained):
    from ruamel.yaml import YAML

    root, _, result = trained
    text = (root / "specs" / "loras.yaml").read_text()
    assert text.startswith(REGISTRY.rstrip("\n"))  # everything before, byte for byte (comments, order)
    entry = YAML(typ="safe").load(text)["loras"]["toy"]
    assert entry["path"] == "../out/toy.safetensors"  # relative to the registry file, like every spec path
    assert entry["kind"] == "character" and entry["trigger_words"] == ["zqx"] and entry["rank"] == 4
    assert list(YAML(typ="safe").load(text)["loras"]) == ["luca_character", "portorosso_bg", "toy"]


def test_registry_validates_against_the_spec_schema(trained):
    from ruamel.yaml import YAML

    from schemas.spec import LoraEntry

    root, _, result = trained
    for entry in YAML(typ="safe").load((root / "specs" / "loras.yaml").read_text())["loras"].values():
        LoraEntry.model_validate(entry)
    # A spec that includes the registry finds the trained file.
    from schemas.spec_loader import load_spec

    toy = YAML(typ="safe").load((root / "specs" / "loras.yaml").read_text())["loras"]["toy"]
    (root / "specs" / "only_toy.yaml").write_text(json.dumps({"loras": {"toy": toy}}))  # JSON is YAML
    (root / "specs" / "uses.yaml").write_text("include: [only_toy.yaml]\n")
    assert load_spec([root / "specs" / "uses.yaml"], root=root).spec.loras["toy"].path == "out/toy.safetensors"


@pytest.mark.slow
def test_resume_gives_the_same_loss_curve_as_an_uninterrupted_run(tmp_path):
    from trainer.train import TrainingError, train_lora

    over = dict(train={"steps": 40}, checkpoints={"every": 20}, output={"name": "r", "folder": "out", "format": "diffusers",
                                                                           "registry": None})
    spec = make_spec(**over)
    straight_root, resumed_root = tmp_path / "a", tmp_path / "b"
    for r in (straight_root, resumed_root):
        make_dataset(r / "data")
    straight = train_lora(spec, straight_root, progress=False, render=False)
    part = train_lora(spec, resumed_root, progress=False, render=False, stop_after=20)
    assert part.steps == 20 and part.lora_file is None
    with pytest.raises(TrainingError, match="--resume"):
        train_lora(spec, resumed_root, progress=False, render=False)  # would overwrite the checkpoints
    resumed = train_lora(spec, resumed_root, progress=False, render=False, resume=True)
    assert resumed.steps == 40
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    a = load_file(straight.lora_file)
    b = load_file(resumed.lora_file)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_samples_render_through_the_renderer_and_report_shows_them(tmp_path):
    from castbook.commands.train import clip_i_scorer
    from trainer.train import train_lora

    root = tmp_path
    make_dataset(root / "data")
    ref = root / "data" / "img0.png"
    spec = make_spec(
        train={"steps": 4},
        checkpoints={"every": 2, "keep_last": 1},
        samples={"every": 2, "prompts": ["zqx, a red circle"], "seeds": [1, 2],
                 "preset": {"width": 32, "height": 32, "num_inference_steps": 2, "guidance_scale": 1.0}},
        evaluation={"references": [ref.relative_to(root).as_posix()], "select_best": "clip_i"},
        output={"name": "s", "folder": "out", "format": "diffusers", "registry": None},
    )
    result = train_lora(spec, root, progress=False, score_images=clip_i_scorer(spec, root))
    assert sorted(result.samples) == [2, 4]
    assert len(result.samples[4]) == 2
    assert set(result.clip_i) == {2, 4} and result.best_step in (2, 4)
    run_dir = root / "out" / "s.train"
    for rel in result.samples[2] + result.samples[4]:
        assert Image.open(run_dir / rel).size == (32, 32)
    html = result.report.read_text()
    assert "<svg" in html and "<polyline" in html
    assert html.count("<img ") == 4 and "(selected)" in html
    training = json.loads((run_dir / "training.json").read_text())
    assert training["best_step"] == result.best_step


def _error_of(root: Path, spec: TrainingSpec) -> str:
    from trainer.data import check_inputs
    from trainer.errors import TrainingError

    with pytest.raises(TrainingError) as err:
        check_inputs(spec, root)
    return str(err.value)


def test_bad_data_is_reported_before_training(tmp_path):
    make_dataset(tmp_path / "data")
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "data" / "broken.txt").write_text("zqx, broken")
    (tmp_path / "data" / "orphan.txt").write_text("zqx, no image")
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "nocap.png")
    msg = _error_of(tmp_path, make_spec())
    assert "broken.png cannot be read" in msg
    assert "orphan.txt has no image" in msg
    assert "nocap.png has no caption file nocap.txt" in msg
    (tmp_path / "data" / "img1.txt").write_bytes(b"zqx, caf\xe9")  # Latin-1, not UTF-8
    assert "img1.txt is not UTF-8 text" in _error_of(tmp_path, make_spec())


def test_empty_dataset_and_missing_trigger_are_errors(tmp_path):
    (tmp_path / "data").mkdir()
    assert "has no images" in _error_of(tmp_path, make_spec())
    make_dataset(tmp_path / "data2", trigger="other")
    msg = _error_of(tmp_path, make_spec(dataset={"folders": ["data2"], "trigger": "zqx"}))
    assert "does not contain the trigger word 'zqx'" in msg


def test_rank_larger_than_a_layer_is_an_error_before_training(tmp_path):
    from trainer.train import TrainingError, train_lora

    make_dataset(tmp_path / "data")
    (tmp_path / "specs").mkdir()
    spec = make_spec(lora={"rank": 100, "target_modules": ["to_q", "to_k"]})  # tiny attention layers are 64 wide
    with pytest.raises(TrainingError, match=r"lora rank 100 is larger than UNet layer .* at most 64"):
        train_lora(spec, tmp_path, progress=False, render=False)
    spec = make_spec(lora={"rank": 2, "target_modules": ["to_qq"]})
    with pytest.raises(TrainingError, match="'to_qq' matches no layer"):
        train_lora(spec, tmp_path, progress=False, render=False)
    assert not (tmp_path / "out" / "toy.train" / "checkpoints").exists()


def test_latents_and_text_embeddings_are_cached_once_per_image_and_caption(trained):
    # 100 steps x batch 2 over 4 images: the VAE and text encoders ran once per image/caption.
    root, _, _ = trained
    cache = root / "out" / ".cache" / "train"
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 4
    assert len(list((cache / "text").rglob("*.safetensors"))) == 4


def test_buckets_and_crops_keep_aspect_and_record_crop_offsets():
    from trainer.data import crop_to, make_buckets, nearest_bucket

    buckets = make_buckets(64, 16)
    assert (64, 64) in buckets and all(w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64 for w, h in buckets)
    wide = nearest_bucket(200, 100, buckets)
    assert wide[0] > wide[1]
    crop, (top, left) = crop_to(Image.new("RGB", (200, 100)), wide)
    assert crop.size == wide and top == 0 and left > 0


def test_clip_i_without_a_scorer_and_a_broken_registry_are_errors_before_any_model_loads(tmp_path):
    from trainer.errors import TrainingError
    from trainer.train import Trainer

    make_dataset(tmp_path / "data")
    (tmp_path / "specs").mkdir()
    spec = make_spec(samples={"every": 2, "prompts": ["zqx"]},
                     evaluation={"references": ["data/img0.png"], "select_best": "clip_i"})
    with pytest.raises(TrainingError, match="select_best: clip_i needs a scorer"):
        Trainer(spec, tmp_path, render=True, score_images=None)
    (tmp_path / "specs" / "loras.yaml").write_text("- not\n- a mapping\n")
    assert "is not a YAML mapping" in _error_of(tmp_path, make_spec())
    (tmp_path / "specs" / "loras.yaml").write_text("loras: [a, b]\n")
    assert "`loras:` is not a mapping" in _error_of(tmp_path, make_spec())


def test_a_scoring_model_that_cannot_load_is_a_training_error(tmp_path):
    from castbook.commands.train import clip_i_scorer
    from trainer.errors import TrainingError

    spec = make_spec(evaluation={"references": ["data/img0.png"], "scoring_model": "ViT-L-14"})
    with pytest.raises(TrainingError, match="scoring.weights"):
        clip_i_scorer(spec, tmp_path)
    assert clip_i_scorer(make_spec(), tmp_path) is None  # no references: nothing to score


def test_train_lora_restores_torch_threads_and_global_rng_and_reports_a_damaged_checkpoint(tmp_path):
    """A library call leaks no process-wide torch setting; --resume on a damaged checkpoint says what to delete."""
    import torch

    from trainer.errors import TrainingError
    from trainer.train import train_lora

    make_dataset(tmp_path / "data")
    spec = make_spec(train={"steps": 2, "threads": 2}, checkpoints={"every": 2},
                     output={"name": "t", "folder": "out", "format": "diffusers", "registry": None})
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    train_lora(spec, tmp_path, progress=False, render=False)
    assert torch.get_num_threads() == threads  # the module fixture's 1, not the spec's 2
    assert torch.equal(torch.get_rng_state(), rng)
    (tmp_path / "out" / "t.train" / "checkpoints" / "step-000002" / "state.json").write_text("{not json")
    with pytest.raises(TrainingError, match=r"step-000002 cannot be read .* delete that folder"):
        train_lora(spec, tmp_path, progress=False, render=False, resume=True)
    assert torch.get_num_threads() == threads
