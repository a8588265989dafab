"""`castbook bench`, the FLOP counter behind its % of peak, LoRA hotswap, and the GPU suite's CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from renderer import flops
from renderer.bench_assets import make_lora_files
from renderer.pipeline import JobRenderer
from schemas.builtins import builtin_digest
from schemas.job import RenderJob, ResolvedLora, ResolvedModel

REPO = Path(__file__).resolve().parents[1]
TINY = ResolvedModel(ref="builtin:tiny-sdxl", kind="builtin", digest=builtin_digest("tiny-sdxl"))


# --------------------------------------------------------------------------- FLOPs


def test_flop_counter_matches_a_hand_count_on_meta():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1)
            self.fc = torch.nn.Linear(100, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with torch.device("meta"):
        net, x = Net(), torch.empty(2, 3, 5, 5)
    # conv: 2 FLOPs x (2*4*5*5 outputs) x (3*3*3 MACs each); linear: 2 x 2 rows x 100 x 10
    assert flops.count_flops(net, x) == 2 * (2 * 4 * 5 * 5) * 27 + 2 * 2 * 100 * 10 == 14800


def test_unet_flops_scale_with_batch_and_pixels():
    from diffusers import UNet2DConditionModel

    from renderer.builtins import builtin_dir

    unet = UNet2DConditionModel.from_pretrained(builtin_dir("tiny-sdxl") / "unet", local_files_only=True)
    one = flops.unet_forward_flops(unet, 1, 8, 8)
    assert one > 0
    assert flops.unet_forward_flops(unet, 2, 8, 8) == 2 * one  # CFG doubles the batch, and the FLOPs
    assert flops.unet_forward_flops(unet, 1, 16, 16) > 3 * one  # 4x the pixels (attention grows faster)


def test_device_peaks():
    assert flops.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert flops.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.bf16_peak_tflops("NVIDIA L4") == 121.0
    assert flops.bf16_peak_tflops("NVIDIA GeForce RTX 4090") == 165.0
    assert flops.bf16_peak_tflops("Some Future GPU") is None
    assert flops.bf16_peak_tflops(None) is None


# --------------------------------------------------------------------------- hotswap


def _job(loras=(), seed=5) -> RenderJob:
    return RenderJob(key=f"k{seed}-{len(loras)}", name=f"t/h/s/p/seed-{seed}", job="t", character="h", scene="s",
                     preset="p", prompt="a hero on a pier", negative_prompt="blurry", seed=seed, width=64, height=64,
                     num_inference_steps=2, guidance_scale=5.0, scheduler="euler", dtype="fp32", base_model=TINY,
                     loras=tuple(loras))


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from renderer.builtins import builtin_dir

    root = tmp_path_factory.mktemp("benchloras")
    unet = UNet2DConditionModel.from_pretrained(builtin_dir("tiny-sdxl") / "unet", local_files_only=True)
    paths = make_lora_files(unet, root / "loras", ranks=[8, 4])  # different ranks: hotswap pads to 8
    loras = [ResolvedLora(name=f"l{i}", path=str(p.relative_to(root)), digest=f"d{i}", weight=1.0, kind="other")
             for i, p in enumerate(paths)]
    return root, loras


def test_hotswapped_lora_gives_the_image_of_a_fresh_load(lora_root):
    root, (a, b) = lora_root
    hot = JobRenderer(root, performance={"lora_hotswap": True})
    img_a = np.asarray(hot.render(_job([a])).image, dtype=np.int16)
    img_b_hot = np.asarray(hot.render(_job([b])).image, dtype=np.int16)
    assert hot.loras.hotswap_stats == {"hotswaps": 1, "hotswap_fallbacks": 0, "target_rank": 8}
    # b replaced a's weights in the same adapter slot: nothing else is loaded
    assert {n for names in hot.pipe.get_list_adapters().values() for n in names} == {"hotswap-0"}

    fresh = JobRenderer(root)
    img_b_fresh = np.asarray(fresh.render(_job([b])).image, dtype=np.int16)
    assert np.abs(img_a - img_b_fresh).max() > 10  # the two LoRAs really differ
    # same pixels as a fresh load (zero-padding a rank-4 LoRA to 8 may move a rounding by one level)
    assert np.abs(img_b_hot - img_b_fresh).max() <= 1
    # and a job without LoRAs is the base model's image again
    base = np.asarray(fresh.render(_job([])).image, dtype=np.int16)
    assert np.array_equal(np.asarray(hot.render(_job([])).image, dtype=np.int16), base)


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_castbook_bench_cpu_reports_every_figure(tmp_path):
    from castbook.cli import main
    from reports.benchmark import summarize
    from reports.rundir import load_run

    assert main(["bench", "--model", "builtin:tiny-sdxl", "--size", "64", "--steps", "4", "--images", "2",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("*.json")
    r = json.loads(result_file.read_text())
    for side in ("castbook", "bare"):
        assert len(r[side]["seconds"]) == 2
        for k in ("s_per_image_p50", "s_per_image_p95", "s_per_image_mean", "peak_memory_bytes"):
            assert r[side][k] > 0, (side, k)
        assert r[side]["s_per_image_p95"] >= r[side]["s_per_image_p50"]
    for k in ("model_load_s", "warmup_s", "overhead_ratio", "peak_memory_bytes", "achieved_tflops"):
        assert r[k] > 0, k
    assert r["identical_images"] == 2 and r["max_pixel_diff"] == 0  # castbook adds nothing to the pixels
    assert r["castbook_path"] == "RenderActor" and r["environment"]["device"] == "cpu"
    assert r["peak_memory_kind"] == "process_max_rss"
    f = r["flops"]
    assert f["per_image"] == (f["unet_forward"] + f["controlnet_forward"]) * 4 + f["vae_decode"] and f["cfg_batch"] == 2
    for mode in ("load", "hotswap"):  # both LoRA modes on a tiny model
        s = r["lora_switch"][mode]
        assert s["mode"] == mode and s["set_adapters_s"] >= 0 and s["new_file_s"] > 0
    assert r["lora_switch"]["hotswap"]["hotswap_stats"]["hotswaps"] >= 1
    # meaningless on CPU, present and null
    for k in ("first_compile_s", "device_bf16_peak_tflops", "percent_of_peak", "within_10gb"):
        assert k in r and r[k] is None, k

    # the run-like directory feeds the benchmark report's trends
    run = load_run(Path(r["run_dir"]))
    assert run.info["kind"] == "bench"
    s = summarize(run)
    assert s["totals"]["rendered"] == 2 and s["totals"]["mean_s_per_image"] > 0
    assert s["totals"]["peak_memory_max_bytes"] > 0
    assert all(run.image_path(e).is_file() for e in run.entries)


def test_bench_refuses_bad_options(tmp_path, capsys):
    from castbook.cli import main

    assert main(["bench", "--model", "no/such/model", "--out", str(tmp_path)]) == 2
    assert "no/such/model" in capsys.readouterr().err
    assert main(["bench", "--model", "builtin:tiny-sdxl", "--size", "60", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_bench_imports_without_ray_open_clip_controlnet_aux_or_jinja2():
    # The GPU box has none of them (nor jinja2): hide them and import the command and the bench logic.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'open_clip', 'controlnet_aux'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.modules['jinja2'] = None  # absent (transformers probes it with find_spec, which then says None)\n"
        "import castbook.commands.bench, renderer.bench, renderer.bench_summary, renderer.actor, renderer.pipeline\n"
        "from castbook.cli import build_parser\n"
        "build_parser().parse_args(['bench', '--model', 'builtin:sdxl-random', '--compile', '--loras', '2'])\n"
        "from renderer.builtins import clip_tokenizer\n"
        "tok = clip_tokenizer(allow_byte_fallback=True)\n"
        "assert len(tok('a hero').input_ids) > 2\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ≈ 1-2 min on an idle 2-core box; far more when it is shared
def test_gpu_suite_cpu_mode_runs_end_to_end(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--cpu", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1700)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "castbook s/image p50/p95" in out.stdout and "suite finished" in out.stdout
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(r["options"]["compile"] for r in results) == [False, True]
    compiled = next(r for r in results if r["options"]["compile"])
    assert compiled["first_compile_s"] > 0 and compiled["compiled_graphs"]["warmup"] >= 1
    # hotswapping LoRAs into the compiled UNet builds no new graph
    assert compiled["lora_switch"]["hotswap"]["new_file_new_graphs"] == 0
    for r in results:
        assert r["options"]["loras"] == 2 and r["options"]["controlnet"] and r["identical_images"] == 2
