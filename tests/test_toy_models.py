"""The toy-world built-ins trained from scratch: trainers learn, runs repeat, committed weights load.

Fast: tiny batches and a handful of steps on real diffusers / open_clip models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from schemas import toy as recipes  # noqa: E402
from toyworld import base, export, loop  # noqa: E402
from toyworld import clip as tc  # noqa: E402
from toyworld import unet as unet_stage  # noqa: E402
from toyworld import vae as vae_stage  # noqa: E402
from toyworld import world as tw  # noqa: E402
from toyworld.data import to_unit, toy_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "renderer" / "weights" / "toy"


@pytest.fixture(scope="module")
def toy_data():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this module's runs: 1 thread is the fastest on a shared CPU
    yield toy_images(32, seed=5)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_parts():
    return unet_stage.frozen_text_parts()


def _unet_data(images, captions, text_parts, vae_spec=None):
    vae_spec = vae_spec or recipes.VaeSpec()
    torch.manual_seed(0)
    vae = vae_stage.build_vae(vae_spec).eval()
    latents = vae_stage.encode_latents(vae, images)
    latents = latents / latents.std()
    pipe = unet_stage.make_pipeline(unet_stage.build_unet(), vae, text_parts)
    index, embeds, pooled = unet_stage.caption_embeddings(pipe, captions)
    empty_e, _, empty_p, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    return unet_stage.UnetData(latents, index, embeds, pooled, empty_e[0], empty_p[0])


def test_vae_training_reduces_reconstruction_loss(toy_data):
    images, _ = toy_data
    spec = recipes.VaeSpec(batch_size=4, learning_rate=3e-3, warmup_steps=0, steps=10)
    x = to_unit(images[:8])

    def loss_of(vae):
        with torch.no_grad():
            return float(vae_stage.vae_loss(vae, x, spec, generator=torch.Generator().manual_seed(0)))

    torch.manual_seed(0)
    before = loss_of(vae_stage.build_vae(spec))
    vae, losses = vae_stage.train_vae(images, spec, seed=0, log=lambda m: None)
    after = loss_of(vae)
    assert len(losses) == 10
    assert after < 0.9 * before, (before, after)
    assert vae.config.scaling_factor > 0


def test_vae_has_three_levels_and_16px_latents(toy_data):
    images, _ = toy_data
    vae = vae_stage.build_vae(recipes.VaeSpec())
    assert 0.5e6 < sum(p.numel() for p in vae.parameters()) < 1e6
    assert vae_stage.encode_latents(vae, images[:2]).shape == (2, 4, 16, 16)


def test_unet_training_reduces_denoising_loss(toy_data, text_parts):
    images, captions = toy_data
    data = _unet_data(images, captions, text_parts)
    spec = recipes.UnetSpec(batch_size=16, learning_rate=2e-3, warmup_steps=0, steps=10, caption_dropout=0.1)
    scheduler = loop.noise_scheduler(text_parts["scheduler"].config)

    def loss_of(model):
        g = torch.Generator().manual_seed(123)
        lat, e, p = data.batch(32, 0.0, g)
        with torch.no_grad():
            return float(unet_stage.unet_loss(model, lat, e, p, scheduler, spec, 64, g))

    torch.manual_seed(0)
    before = loss_of(unet_stage.build_unet())
    ema, losses, done, _ = unet_stage.train_unet(data, spec, seed=0, size=64, scheduler_config=text_parts["scheduler"].config,
                                         log=lambda m: None)
    assert done == 10 and len(losses) == 10
    # The EMA lags the raw weights, but with its warm-up it has moved well within 10 steps.
    assert loss_of(ema) < 0.8 * before, (before, loss_of(ema))


def test_caption_dropout_gives_zero_and_empty_prompt_conditioning(toy_data, text_parts):
    images, captions = toy_data
    data = _unet_data(images[:4], captions[:4], text_parts)
    lat, e, p = data.batch(64, 1.0, torch.Generator().manual_seed(0))
    zero = (e.abs().sum(dim=(1, 2)) == 0)
    empty = torch.tensor([torch.equal(e[i], data.empty_embeds) for i in range(64)])
    assert zero.any() and empty.any() and bool((zero | empty).all())
    lat, e, p = data.batch(8, 0.0, torch.Generator().manual_seed(0))
    assert bool((e.abs().sum(dim=(1, 2)) > 0).all())


def test_unet_training_is_deterministic(toy_data, text_parts):
    images, captions = toy_data
    data = _unet_data(images[:8], captions[:8], text_parts)
    spec = recipes.UnetSpec(batch_size=4, steps=3, warmup_steps=0)
    with loop.deterministic(seed=0, threads=1):
        runs = [unet_stage.train_unet(data, spec, seed=7, size=64, scheduler_config=text_parts["scheduler"].config,
                                log=lambda m: None) for _ in range(2)]
    a, b = (r[0].state_dict() for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0][1] == runs[1][1]  # identical loss curves
    assert not all(torch.equal(a[k], unet_stage.build_unet().state_dict()[k]) for k in a)


def test_trained_text_encoders_see_the_same_batches_as_the_frozen_cache(toy_data, text_parts):
    """caption_batch + encode_captions (the path that trains the encoders) makes the conditioning the
    cached path makes, from the same random draws: a comparison of the two recipes differs only in
    whether the encoders learn."""
    images, captions = toy_data
    data = _unet_data(images[:8], captions[:8], text_parts)
    data.texts = sorted(set(captions[:8]))
    lat_a, e_a, p_a = data.batch(24, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    lat_b, prompts, zero = data.caption_batch(24, 0.5, g)
    pipe = unet_stage.make_pipeline(unet_stage.build_unet(), None, text_parts)
    with torch.no_grad():
        e_b, p_b = unet_stage.encode_captions(pipe, prompts, zero)
    assert torch.equal(lat_a, lat_b)
    assert zero.any() and "" in prompts and any(prompts)  # all three kinds drawn
    assert torch.allclose(e_a, e_b, atol=1e-5) and torch.allclose(p_a, p_b, atol=1e-5)
    # the next draw of both generators is the same: the noise of the loss lines up too
    g_a = torch.Generator().manual_seed(3)
    data.batch(24, 0.5, g_a)
    assert torch.equal(torch.rand(4, generator=g_a), torch.rand(4, generator=g))


def test_unet_training_with_text_encoders_trains_them_deterministically(toy_data):
    images, captions = toy_data
    spec = recipes.UnetSpec(batch_size=4, steps=4, warmup_steps=0, learning_rate=3e-3, train_text_encoders=True,
                       caption_dropout=0.25)

    def run():
        parts = unet_stage.frozen_text_parts()
        data = _unet_data(images[:8], captions[:8], parts)
        data.texts = sorted(set(captions[:8]))
        ema, losses, done, _ = unet_stage.train_unet(data, spec, seed=7, size=64, scheduler_config=parts["scheduler"].config,
                                             log=lambda m: None, text_parts=parts)
        return ema, losses, parts

    with loop.deterministic(seed=0, threads=1):
        (ema_a, losses_a, parts_a), (ema_b, losses_b, parts_b) = run(), run()
    fresh = unet_stage.frozen_text_parts()
    for k in ("text_encoder", "text_encoder_2"):
        a, b, f = (x[k].state_dict() for x in (parts_a, parts_b, fresh))
        assert all(torch.equal(a[n], b[n]) for n in a)  # same spec, same encoder weights
        assert not all(torch.equal(a[n], f[n]) for n in a), f"{k} did not train"
        assert not parts_a[k].training  # handed back in eval mode, like the EMA UNet
    ua, ub = ema_a.state_dict(), ema_b.state_dict()
    assert all(torch.equal(ua[n], ub[n]) for n in ua) and losses_a == losses_b
    with pytest.raises(ValueError, match="text_parts"):
        unet_stage.train_unet(_unet_data(images[:4], captions[:4], fresh), spec, seed=0, size=64,
                      scheduler_config=fresh["scheduler"].config, log=lambda m: None)


def test_stop_after_keeps_the_learning_rate_schedule_of_the_full_run(toy_data, text_parts):
    images, captions = toy_data
    data = _unet_data(images[:8], captions[:8], text_parts)
    full = recipes.UnetSpec(batch_size=4, steps=6, warmup_steps=0)
    cut = full.model_copy(update={"stop_after": 3})
    logs = []
    ema_cut, losses_cut, done, _ = unet_stage.train_unet(data, cut, seed=1, size=64, scheduler_config=text_parts["scheduler"].config,
                                                 log=logs.append)
    _, losses_full, _, _ = unet_stage.train_unet(data, full, seed=1, size=64, scheduler_config=text_parts["scheduler"].config,
                                         log=lambda m: None)
    assert done == 3 and losses_cut == losses_full[:3]
    assert any("stop_after=3" in m for m in logs)
    assert unet_stage.unet_lr(cut, cut.steps)(2) == unet_stage.unet_lr(full, full.steps)(2) > unet_stage.unet_lr(full, full.steps)(5)


def test_a_whole_run_with_trained_text_encoders_ships_them(tmp_path):
    """run_base end to end (tiny): the exported folder holds the trained encoders, not the random ones."""
    from safetensors.torch import load_file

    spec = recipes.ToyBaseSpec(data=recipes.ToyDataSpec(count=8), vae=recipes.VaeSpec(steps=1, batch_size=4),
                          unet=recipes.UnetSpec(steps=3, batch_size=4, warmup_steps=0, train_text_encoders=True),
                          work_dir=str(tmp_path / "work"), output=str(tmp_path / "sdxl"))
    logs = []
    record = base.run_base(spec, tmp_path, log=logs.append, do_eval=False)
    assert record["unet_steps_done"] == 3
    assert any("no embedding cache" in m for m in logs)
    assert (tmp_path / "work" / "text-encoders-ema.safetensors").exists()
    saved = load_file(tmp_path / "sdxl" / "text_encoder_2" / "model.safetensors")
    fresh = {k: v.half() for k, v in unet_stage.frozen_text_parts()["text_encoder_2"].state_dict().items()}
    assert saved.keys() == fresh.keys()
    assert not all(torch.equal(saved[k], fresh[k]) for k in saved), "the exported encoder is the random one"


def test_export_of_a_text_encoder_run_uses_its_trained_encoders(tmp_path):
    """A stopped run that trained its encoders is exported with those encoders, never the random ones."""
    from safetensors.torch import load_file

    spec = recipes.ToyBaseSpec(data=recipes.ToyDataSpec(count=8), unet=recipes.UnetSpec(train_text_encoders=True),
                          work_dir=str(tmp_path / "work"), output=str(tmp_path / "sdxl"))
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    vae_stage.build_vae(spec.vae).save_pretrained(work / "vae", safe_serialization=True)
    parts = unet_stage.frozen_text_parts()
    with torch.no_grad():
        parts["text_encoder"].final_layer_norm.weight.add_(1.0)  # "trained"
    export.atomic_save_safetensors(dict(unet_stage.build_unet().state_dict()), work / "unet-ema.safetensors", {"step": "5"})
    export.atomic_save_safetensors(base.text_encoder_state(parts), work / "text-encoders-ema.safetensors", {"step": "4"})
    with pytest.raises(ValueError, match="step 4"):
        base.export_from_checkpoint(spec, tmp_path, log=lambda m: None, do_eval=False)
    export.atomic_save_safetensors(base.text_encoder_state(parts), work / "text-encoders-ema.safetensors", {"step": "5"})
    base.export_from_checkpoint(spec, tmp_path, log=lambda m: None, do_eval=False)
    saved = load_file(tmp_path / "sdxl" / "text_encoder" / "model.safetensors")
    want = parts["text_encoder"].final_layer_norm.weight.half()
    (key,) = [k for k in saved if k.endswith("final_layer_norm.weight")]
    assert torch.equal(saved[key], want)


# --- the shared loop: the numbers the shipped weights were trained with ----------------------------
# benchmarks/toy_recipe_identity.py checks whole retrains byte for byte; these pin the parts cheaply.


def test_noising_and_min_snr_are_the_recipes_float64_schedule(text_parts):
    config = text_parts["scheduler"].config
    scheduler = loop.noise_scheduler(config)
    n, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    ac = torch.cumprod(1.0 - torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2, 0).float()
    assert torch.equal(scheduler.alphas_cumprod, ac)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    a = ac[t].view(-1, 1, 1, 1)
    assert torch.equal(scheduler.add_noise(x, noise, t), a.sqrt() * x + (1 - a).sqrt() * noise)
    per = torch.rand(6, generator=g)
    snr = ac[t] / (1 - ac[t])
    assert torch.equal(loop.min_snr_weighted(per, scheduler, t, 5.0), per * torch.clamp(snr, max=5.0) / snr)


def test_ema_decay_warms_up_from_a_tenth_and_updates_by_lerp():
    shadow, params = [torch.zeros(5)], [torch.arange(5.0)]
    ema = loop.Ema(shadow, params, decay=0.999)
    assert [ema.decay_at(s) for s in (0, 1, 2)] == [0.1, 2 / 11, 3 / 12] and ema.decay_at(10**6) == 0.999
    ema.update(0)
    assert torch.equal(shadow[0], torch.lerp(torch.zeros(5), params[0], 1 - 0.1))


def test_train_loop_sets_the_recipes_learning_rate_bit_for_bit():
    spec = recipes.UnetSpec(learning_rate=1e-3, warmup_steps=7, steps=40, final_lr_fraction=0.1)
    w = torch.nn.Parameter(torch.ones(2))
    te = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [w], "lr": 1.0}, {"params": [te], "lr": 0.5}], lr=1.0)
    seen, saved = [], []

    def step_loss(step):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return (w * te).sum()

    run = loop.train_loop(step_loss, opt, unet_stage.unet_lr(spec, spec.steps), spec.steps, clip_params=[w, te],
                          name="t", log=lambda m: None, checkpoint=saved.append, checkpoint_every=10, stop_after=35)
    assert run.done == 35 and len(run.losses) == 35 and saved == [10, 20, 30]
    for step, (lr, lr_te) in enumerate(seen):  # the recipe's formula as it was written before the shared loop
        warm = min(1.0, (step + 1) / max(1, spec.warmup_steps))
        cos = spec.final_lr_fraction + (1 - spec.final_lr_fraction) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, step / spec.steps)))
        assert lr == spec.learning_rate * warm * cos and lr_te == lr * 0.5


def test_deterministic_restores_the_callers_settings():
    threads, algorithms = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    state = torch.random.get_rng_state()
    with loop.deterministic(seed=3, threads=1):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        inside = torch.rand(3)
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == algorithms
    assert torch.equal(torch.random.get_rng_state(), state)
    with loop.deterministic(seed=3, threads=1):
        assert torch.equal(torch.rand(3), inside)


def test_toy_clip_training_reduces_contrastive_loss(toy_data):
    images, captions = toy_data
    tok = tc.tokenizer()
    unique = sorted(set(captions))
    ids = torch.tensor([unique.index(c) for c in captions])
    tokens = tok(unique)[ids]
    x = tc.normalize(images)

    def loss_of(model):
        with torch.no_grad():
            return float(tc.contrastive_loss(model.eval(), x, tokens, ids))

    before = loss_of(tc.build_model(seed=0))
    spec = recipes.ClipTrainSpec(batch_size=32, steps=15, learning_rate=1e-3, warmup_steps=0)
    model, losses, done, _ = tc.train_clip(images, captions, spec, seed=0, log=lambda m: None)
    assert done == 15
    assert loss_of(model) < 0.9 * before, (before, loss_of(model))


def test_toy_clip_save_load_roundtrip_and_determinism(toy_data, tmp_path):
    images, captions = toy_data
    spec = recipes.ClipTrainSpec(batch_size=8, steps=2, warmup_steps=0)
    m1, l1, _, _ = tc.train_clip(images, captions, spec, seed=3, log=lambda m: None)
    m2, l2, _, _ = tc.train_clip(images, captions, spec, seed=3, log=lambda m: None)
    assert l1 == l2
    tc.save_clip(m1, tmp_path / "clip")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == [tc.WEIGHTS_FILE, tc.CONFIG_FILE]
    loaded, preprocess, tok = tc.load_toy_clip(tmp_path / "clip")
    with torch.no_grad():
        a = m1.encode_image(tc.normalize(images[:2]), normalize=True)
        b = loaded.encode_image(tc.normalize(images[:2]), normalize=True)
    assert torch.allclose(a, b, atol=2e-2)  # stored as fp16
    acc = tc.retrieval_accuracy(loaded, images[:8], captions[:8])
    assert 0.0 <= acc["caption_to_image_top1"] <= 1.0 and acc["images"] == 8


def test_save_pipeline_writes_fp16_safetensors_that_load_as_fp32(text_parts, tmp_path):
    import os
    import stat

    pipe = unet_stage.make_pipeline(unet_stage.build_unet(), vae_stage.build_vae(recipes.VaeSpec()), text_parts)
    out = tmp_path / "models" / "sdxl"
    export.save_pipeline(pipe, out)
    export.save_pipeline(pipe, out)  # replacing an existing folder works and leaves no temp folders
    assert sorted(p.name for p in out.parent.iterdir()) == ["sdxl"]
    weights = sorted(out.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(stat.S_IMODE(os.stat(w).st_mode) == 0o644 for w in weights)
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    loaded = export.load_pipeline(out)
    assert loaded.unet.dtype == torch.float32 and loaded.vae_scale_factor == 4


def test_committed_specs_load():
    base = recipes.load_base_spec(REPO / "specs" / "toy" / "toy-base.yaml")
    assert base.vae.block_out_channels == (16, 32, 64) and base.unet.noise_offset > 0
    assert base.output == "renderer/weights/toy/sdxl"
    clip = recipes.load_clip_spec(REPO / "specs" / "toy" / "toy-clip.yaml")
    assert clip.output == "renderer/weights/toy/clip"


def test_spec_rejects_unknown_keys(tmp_path):
    from schemas.loader import SpecErrors

    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  stepz: 3\n")
    with pytest.raises(SpecErrors, match="stepz"):
        recipes.load_base_spec(bad)


def test_eval_grid_is_fixed_and_parses_back():
    grid = base.eval_prompts()
    assert len(grid) == 8 * 6 * 3 - 3 * 3  # every colour x shape x scene minus the hold-out pairs
    assert len({p for p, _ in grid}) == len(grid)
    for prompt, expected in grid:
        assert {k: v for k, v in tw.parse_attributes(prompt).items()} == expected
        assert not tw.is_held_out(expected["colour"], expected["shape"], expected["eyes"], tw.HOLDOUT)


def test_cli_reports_a_missing_spec(tmp_path, capsys):
    from castbook.cli import main

    assert main(["toymodel", "train-base", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


# --- the committed weights ---------------------------------------------------------------


@pytest.mark.skipif(not (TOY / "sdxl" / "model_index.json").exists(),
                    reason="renderer/weights/toy/sdxl not trained yet (castbook toymodel train-base specs/toy/toy-base.yaml)")
def test_committed_base_model_renders_with_diffusers():
    from diffusers import StableDiffusionXLPipeline

    files = list((TOY / "sdxl").rglob("*"))
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    pipe = StableDiffusionXLPipeline.from_pretrained(TOY / "sdxl", local_files_only=True, use_safetensors=True,
                                                     torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    img = pipe("a red circle character with black eyes on the beach", num_inference_steps=4, guidance_scale=5.0,
               width=64, height=64, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert img.size == (64, 64)
    import numpy as np

    assert np.asarray(img).std() > 5  # a picture, not a flat colour


@pytest.mark.skipif(not (TOY / "clip" / tc.WEIGHTS_FILE).exists(),
                    reason="renderer/weights/toy/clip not trained yet (castbook toymodel train-clip specs/toy/toy-clip.yaml)")
def test_committed_toy_clip_prefers_the_right_caption():
    model, _, tok = tc.load_toy_clip(TOY / "clip")
    images, captions = toy_images(24, seed=99)
    acc = tc.retrieval_accuracy(model, images, captions)
    assert acc["caption_to_image_top1"] >= 0.5, acc  # chance is ~1/24


def test_committed_models_fit_the_size_budget():
    if not TOY.exists():
        pytest.skip("renderer/weights/toy not trained yet")
    total = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, total
    record = TOY / "sdxl.training.json"
    if record.exists():
        assert json.loads(record.read_text())["spec"]["output"] == "renderer/weights/toy/sdxl"


def test_toy_builtins_are_wired_into_plan_render_and_scoring(tmp_path):
    """builtin:toy-sdxl picks its own ControlNet and scorer, and renders with a control."""
    from renderer.pipeline import JobRenderer
    from reports.metrics import ClipScorer
    from schemas.builtins import builtin_digest
    from schemas.plan import load_plan

    if not (TOY / "sdxl" / "model_index.json").exists():
        pytest.skip("renderer/weights/toy/sdxl not trained yet")
    plan = load_plan([REPO / "specs" / "examples" / "toyworld.yaml"], overrides=["presets.toy.num_inference_steps=2"])
    assert plan.scoring["model"] == "builtin:toy-clip"
    job = next(j for j in plan.jobs if j.controls)
    assert job.base_model.digest == builtin_digest("toy-sdxl")
    assert job.controls[0].model.ref == "builtin:toy-controlnet"  # 4x-downsampling conditioning, matches the toy VAE
    out = JobRenderer(REPO).render(job)
    assert out.image.size == (64, 64)
    image = tmp_path / "toy.png"
    out.image.save(image)
    scorer = ClipScorer("builtin:toy-clip")
    assert scorer.embed_images([image]).shape == (1, 64)


def test_shipped_weights_match_their_recipe_number():
    """Retrained weights need a new recipe number (schemas/builtins.py), or cached images lie."""
    from core.digests import folder_digest
    from schemas.builtins import BUILTIN_RECIPES, SHIPPED_WEIGHTS

    folders = {"toy-sdxl": TOY / "sdxl", "toy-clip": TOY / "clip", "toy-controlnet": TOY / "controlnet",
               "toy-ip-adapter": TOY / "ip-adapter"}
    assert set(SHIPPED_WEIGHTS) <= set(folders)
    for name, expected in SHIPPED_WEIGHTS.items():
        assert folder_digest(folders[name]) == expected, (
            f"renderer/weights/toy/{folders[name].name} changed: bump BUILTIN_RECIPES[{name!r}] "
            f"(now {BUILTIN_RECIPES[name]}) and record the new digest in SHIPPED_WEIGHTS")
