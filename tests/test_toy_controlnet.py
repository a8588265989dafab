"""builtin:toy-controlnet: pose maps, the control images training sees, a short training run, eval, loading.

Fast: a few images, a few steps, the committed toy base model (renderer/weights/toy/sdxl),
real controlnet_aux, diffusers and renderer code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scipy import ndimage  # noqa: E402

from schemas import toy as recipes  # noqa: E402
from schemas.builtins import builtin_digest  # noqa: E402
from toyworld import controlnet as tc  # noqa: E402
from toyworld import controlnet_eval as ce  # noqa: E402
from toyworld import loop  # noqa: E402
from toyworld import world as tw  # noqa: E402
from toyworld.export import load_pipeline  # noqa: E402
from toyworld.unet import time_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "renderer" / "weights" / "toy" / "sdxl"

needs_base = pytest.mark.skipif(not (BASE / "model_index.json").exists(),
                                reason="renderer/weights/toy/sdxl not trained yet")


@pytest.fixture(scope="module")
def base_pipe():
    if not (BASE / "model_index.json").exists():
        pytest.skip("renderer/weights/toy/sdxl not trained yet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this module's runs: 1 thread is the fastest on a shared CPU
    pipe = load_pipeline(BASE)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    yield pipe
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(base_pipe):
    images, captions, labels, controls = tc.toy_examples(8, seed=3)
    return tc.encode_data(base_pipe, images, captions, controls)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A whole `run_controlnet` (data, 4 steps, export, eval on 3 cases) into a tmp folder."""
    if not (BASE / "model_index.json").exists():
        pytest.skip("renderer/weights/toy/sdxl not trained yet")
    tmp = tmp_path_factory.mktemp("toycn")
    spec = recipes.ToyControlNetSpec(data={"count": 12, "seed": 0}, steps=4, batch_size=4, warmup_steps=0,
                                learning_rate=1e-3, checkpoint_every=2,
                                eval={"count": 3, "steps": 2, "batch_size": 3, "seed": 2000},
                                work_dir=str(tmp / "work"), output=str(tmp / "out" / "controlnet"))
    lines: list[str] = []
    record = tc.run_controlnet(spec, REPO, log=lines.append)
    assert not torch.are_deterministic_algorithms_enabled()  # the run's settings end with the run
    return spec, Path(spec.output), record, lines


# --- pose maps and control images ---------------------------------------------------------------


def test_pose_map_outline_lies_on_the_border_of_the_rendered_body():
    for i in range(12):
        img, label = tw.generate_one(7, i)
        body = ce.body_mask(img, label.background)  # what `render` painted, read from its pixels
        band = (body ^ ndimage.binary_erosion(body)) | (ndimage.binary_dilation(body) ^ body)
        inner = body ^ ndimage.binary_erosion(body)
        pm = np.asarray(tw.pose_map(label.shape, label.pose))
        assert pm.shape == (64, 64, 3) and (pm[..., 0] == pm[..., 1]).all() and pm.max() == 255
        line = pm[..., 0] >= 128
        # every line pixel is on the body's border (within 1 px), and the border is covered by the line
        off = ndimage.distance_transform_edt(~band)[line]
        assert off.max() <= 1.5 and (off == 0).mean() >= 0.9, (label.shape, off.max(), (off == 0).mean())
        gap = ndimage.distance_transform_edt(~line)[inner]
        assert gap.max() <= 1.5, (label.shape, gap.max())
        # a thin line, not a filled shape: far fewer pixels than the body
        assert line.sum() < 0.6 * body.sum()


def test_control_image_is_byte_equal_to_what_the_renderer_prepares(tmp_path):
    from renderer.control import ControlPreparer
    from schemas.job import ResolvedControl, ResolvedModel
    from schemas.spec import CannyControl

    default = CannyControl(type="canny", image="pose.png")
    assert tc.CANNY_PARAMS == {"low_threshold": default.low_threshold, "high_threshold": default.high_threshold}
    _, label = tw.generate_one(11, 0)
    pose = tw.pose_map(label.shape, label.pose)
    pose.save(tmp_path / "pose.png")
    # what `castbook plan` resolves for `{type: canny, image: pose.png}` (preprocess defaults to on)
    control = ResolvedControl(type="canny", image="pose.png", image_digest="0" * 64, scale=1.0, preprocess=True,
                              model=ResolvedModel(ref="builtin:toy-controlnet", kind="builtin",
                                                  digest=builtin_digest("toy-controlnet")),
                              detector="canny", detector_params=dict(tc.CANNY_PARAMS))
    rendered, _ = ControlPreparer(tmp_path).prepare(control, 64, 64)
    ours = tc.control_image(pose, 64)
    assert ours.mode == rendered.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(rendered))
    assert np.asarray(ours).max() > 0  # the outline's edges were found


@needs_base
def test_control_tensor_is_what_the_controlnet_pipeline_feeds_the_controlnet(base_pipe):
    from diffusers import StableDiffusionXLControlNetPipeline

    _, label = tw.generate_one(11, 1)
    cmap = tc.control_image(tw.pose_map(label.shape, label.pose))
    pipe = StableDiffusionXLControlNetPipeline(**base_pipe.components,
                                               controlnet=tc.build_controlnet(base_pipe.unet, seed=0))
    theirs = pipe.prepare_image(cmap, 64, 64, 1, 1, "cpu", torch.float32)
    ours = tc.control_tensor(tc.control_u8([cmap]))
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


# --- training ----------------------------------------------------------------------------------


@needs_base
def test_fresh_controlnet_changes_nothing_and_training_makes_it_matter(base_pipe, small_data):
    spec = recipes.ToyControlNetSpec(batch_size=4, steps=3, warmup_steps=0, learning_rate=1e-3)
    lat, e, p, c = tc.sample_batch(small_data, 4, 0.0, 0.0, torch.Generator().manual_seed(0))
    t = torch.full((4,), 500)
    added = {"text_embeds": p, "time_ids": time_ids(64, 4)}

    def out(controlnet):
        with torch.no_grad():
            return tc.controlled_unet(base_pipe.unet, controlnet, c)(lat, t, e, added).sample

    with torch.no_grad():
        plain = base_pipe.unet(lat, t, encoder_hidden_states=e, added_cond_kwargs=added).sample
    assert torch.equal(out(tc.build_controlnet(base_pipe.unet, seed=0)), plain)  # zero init: standard, no noise
    trained, losses, _ = tc.train_controlnet(base_pipe.unet, small_data, spec, base_pipe.scheduler.config,
                                             log=lambda m: None)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (out(trained) - plain).abs().max() > 1e-4
    assert not any(q.requires_grad for q in base_pipe.unet.parameters())  # the base stays frozen


@needs_base
def test_training_is_deterministic(base_pipe, small_data):
    spec = recipes.ToyControlNetSpec(batch_size=4, steps=3, warmup_steps=1, caption_dropout=0.5, control_dropout=0.25)
    with loop.deterministic(seed=0, threads=1):
        runs = [tc.train_controlnet(base_pipe.unet, small_data, spec, base_pipe.scheduler.config, log=lambda m: None)
                for _ in range(2)]
    a, b = (r[0].state_dict() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0][1] == runs[1][1]  # identical loss curves


def test_run_exports_a_folder_that_loads_and_renders_with_the_toy_base(smoke_run, base_pipe):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    spec, out, record, lines = smoke_run
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # fp16 on disk
    cn = ControlNetModel.from_pretrained(out, local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)
    assert tuple(cn.config.conditioning_embedding_out_channels) == (16, 32, 64)
    assert (Path(spec.work_dir) / "controlnet.safetensors").exists()  # the checkpoint
    assert record["steps_done"] == 4 and record["images_per_second"] > 0
    assert any("checkpoint" in line for line in lines)
    saved = json.loads((out.parent / "controlnet.training.json").read_text())
    assert saved["spec"]["output"] == spec.output and "eval" in saved

    pipe = StableDiffusionXLControlNetPipeline(**base_pipe.components, controlnet=cn)
    _, label = tw.generate_one(5, 0)
    cmap = tc.control_image(tw.pose_map(label.shape, label.pose))
    img = pipe(label.caption, image=cmap, num_inference_steps=2, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert img.size == (64, 64) and np.asarray(img).std() > 1


def test_renderer_loads_the_trained_folder_as_builtin_toy_controlnet(smoke_run, monkeypatch):
    from renderer import builtins as renderer_builtins
    from renderer import models
    from renderer.pipeline import JobRenderer
    from schemas.job import RenderJob, ResolvedControl, ResolvedModel

    _, out, _, _ = smoke_run
    monkeypatch.setattr(renderer_builtins, "TOY_CONTROLNET_DIR", out)
    cn_ref = ResolvedModel(ref="builtin:toy-controlnet", kind="builtin", digest=builtin_digest("toy-controlnet"))
    cn = models.load_controlnet(cn_ref, REPO, "cpu", "fp32")
    assert cn.dtype == torch.float32  # fp16 on disk, loaded as the job asks
    # a whole job through the renderer: toy-sdxl + a canny control on a drawn pose map
    root = out.parent
    _, label = tw.generate_one(5, 1)
    tw.pose_map(label.shape, label.pose).save(root / "pose.png")
    control = ResolvedControl(type="canny", image="pose.png", image_digest="1" * 64, scale=1.0, preprocess=True,
                              model=cn_ref, detector="canny", detector_params=dict(tc.CANNY_PARAMS))
    job = RenderJob(key="t", name="t/toy/beach/draft/seed-1", job="t", character=None, scene="beach", preset="draft",
                    prompt=label.caption, negative_prompt="", seed=1, width=64, height=64, num_inference_steps=2,
                    guidance_scale=5.0, scheduler="euler", dtype="fp32",
                    base_model=ResolvedModel(ref="builtin:toy-sdxl", kind="builtin", digest=builtin_digest("toy-sdxl")),
                    controls=(control,))
    result = JobRenderer(root).render(job)
    assert result.image.size == (64, 64)


def test_missing_weights_tell_the_user_how_to_train_them(tmp_path, monkeypatch):
    from core.errors import JobError
    from renderer import builtins as renderer_builtins

    monkeypatch.setattr(renderer_builtins, "TOY_CONTROLNET_DIR", tmp_path / "controlnet")
    with pytest.raises(JobError, match=r"castbook toymodel train-controlnet specs/toy/toy-controlnet\.yaml"):
        renderer_builtins.builtin_dir("builtin:toy-controlnet")


# --- eval --------------------------------------------------------------------------------------


def test_pose_agreement_is_high_on_the_true_image_and_low_for_a_moved_pose():
    from dataclasses import replace

    for i in range(6):
        img, label = tw.generate_one(21, i)
        good = ce.pose_agreement(img, label)
        assert good["iou"] > 0.9 and good["hit"] and good["centroid_distance"] < 1.0, good
        moved = replace(label, pose=replace(label.pose, x=label.pose.x + label.pose.radius,
                                            y=label.pose.y - 0.5 * label.pose.radius))
        bad = ce.pose_agreement(img, moved)
        assert bad["iou"] < 0.5 and not bad["hit"], bad


def test_eval_reports_pose_agreement_with_and_without_the_control(smoke_run):
    spec, _, record, _ = smoke_run
    ev = record["eval"]
    assert ev["count"] == 3 and ev["conditioning_scale"] == spec.eval.conditioning_scale
    for side in ("with_control", "without_control"):
        s = ev[side]
        assert 0.0 <= s["mean_iou"] <= 1.0 and 0.0 <= s["position_hit_rate"] <= 1.0
        assert 0 <= s["bodies_found"] <= 3
        assert {"colour", "shape", "background"} <= set(s["checker"])
    held = record["held_out_loss"]
    assert held["without_control"] > 0 and held["with_control"] > 0
    assert [c["step"] for c in record["held_out_loss_curve"]] == [2, 4]  # one per checkpoint
    images = sorted(p.name for p in (Path(spec.work_dir) / "eval").iterdir())
    assert images[:3] == ["000-control.png", "000-with.png", "000-without.png"]


# --- the recipe --------------------------------------------------------------------------------


def test_committed_recipe_validates_and_is_picked_by_castbook_validate(tmp_path):
    from castbook.commands.validate import validate_file
    from schemas.loader import SpecErrors

    path = REPO / "specs" / "toy" / "toy-controlnet.yaml"
    spec = recipes.load_controlnet_spec(path)
    assert spec.output == "renderer/weights/toy/controlnet" and spec.base == "renderer/weights/toy/sdxl"
    assert spec.eval.seed != spec.data.seed and spec.threads == 1
    assert validate_file(path) == "toy ControlNet recipe"
    for other in ("toy-base.yaml", "toy-clip.yaml"):
        assert validate_file(REPO / "specs" / "toy" / other) != "toy ControlNet recipe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: renderer/weights/toy/sdxl\nstepz: 3\n")
    with pytest.raises(SpecErrors, match="stepz"):
        validate_file(bad)
    same = tmp_path / "same.yaml"
    same.write_text("steps: 3\ndata: {seed: 4}\neval: {seed: 4}\n")
    with pytest.raises(SpecErrors, match="eval.seed"):
        recipes.load_controlnet_spec(same)


def test_cli_reports_a_missing_recipe(tmp_path, capsys):
    from castbook.cli import main

    assert main(["toymodel", "train-controlnet", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
