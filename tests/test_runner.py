"""renderer.runner / renderer.actor end to end: real Ray, real diffusers on builtin:tiny-sdxl.

64x64, 2 steps. One Ray instance for the module (actors are created per run, as in production).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runner_helpers import make_job, make_plan

from core.jsonl import read_jsonl
from renderer.outputs import ImageCache, RootLock
from renderer.png_metadata import parse_parameters, read_castbook_chunk, read_png_text, split_lora_tags
from renderer.ray_cluster import start_ray, worker_env
from renderer.runner import order_jobs, run_render
from schemas.job import ResolvedLora
from schemas.records import ManifestRecord

pytestmark = pytest.mark.slow

PY = sys.executable
CASTBOOK = str(Path(PY).parent / "castbook")

SPEC = textwrap.dedent(
    """\
    defaults:
      base_model: builtin:tiny-sdxl
      preset: draft
    presets:
      draft: {width: 64, height: 64, num_inference_steps: 2}
    characters:
      luca:
        description: a boy
    scenes:
      beach:
        prompt: "{{ character }} on the beach"
      town:
        prompt: "{{ character }} in town"
    jobs:
      main:
        characters: [luca]
        scenes: [beach, town]
        seeds: {count: 3, start: 1}
    """
)


def manifest(run_dir: Path) -> list[ManifestRecord]:
    """The run's ledger, read through the one model the runner writes."""
    return [ManifestRecord.model_validate(line) for line in read_jsonl(run_dir / "manifest.jsonl")]


def names(recs: list[ManifestRecord], status: str | None = None) -> list[str]:
    return [r.name for r in recs if status is None or r.status == status]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # False when another module's session fixture owns Ray: then leave it running.
    started = start_ray(None, num_cpus=2, resources={"render_slot": 2}, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_session):
    """One Ray run with a corrupt LoRA job and an actor that dies (os._exit) on one job, once."""
    root = tmp_path_factory.mktemp("project")
    (root / "loras").mkdir()
    (root / "loras" / "bad.safetensors").write_bytes(b"this is not a safetensors file")
    bad = ResolvedLora(name="bad", path="loras/bad.safetensors", digest="00" * 32, weight=1.0, kind="style")
    good = [make_job(scene="beach", seed=s) for s in (1, 2)] + [make_job(scene="town", seed=1)]
    broken = make_job(scene="cursed", seed=1, loras=(bad,))
    out = tmp_path_factory.mktemp("runs")
    marker = out.parent / f"{out.name}-crashed"
    os.environ["CASTBOOK_TEST_CRASH_KEY"] = good[1].key
    os.environ["CASTBOOK_TEST_CRASH_MARKER"] = str(marker)
    try:
        result = run_render(make_plan(good + [broken], root=root), out_dir=out, progress=False, quiet=True)
    finally:
        del os.environ["CASTBOOK_TEST_CRASH_KEY"], os.environ["CASTBOOK_TEST_CRASH_MARKER"]
    return {"root": root, "out": out, "result": result, "good": good, "broken": broken, "marker": marker}


def test_failed_job_is_isolated_and_dead_actor_is_replaced(ray_run):
    r, good, broken = ray_run["result"], ray_run["good"], ray_run["broken"]
    assert r.exit_code == 1
    assert r.counts == {"total": 4, "rendered": 3, "cached": 0, "failed": 1}
    recs = manifest(r.run_dir)
    assert sorted(names(recs)) == sorted(j.name for j in good + [broken])  # each job exactly once
    (failed,) = [x for x in recs if x.status == "failed"]
    assert failed.name == broken.name and "bad" in failed.error and failed.image is None
    # The actor really died on good[1] (the marker exists) and a new one rendered it.
    assert ray_run["marker"].exists()
    assert r.stats and r.stats[0]["restarts"] == 1
    for rec in recs:
        if rec.status == "rendered":
            assert (r.run_dir / rec.image).is_file()
            assert ImageCache(ray_run["out"]).has(rec.key)
    run = json.loads((r.run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["counts"]["failed"] == 1
    assert run["environment"]["device"] == "cpu" and run["executor"] == "ray"
    plan_lines = [json.loads(x) for x in (r.run_dir / "plan.jsonl").read_text().splitlines()]
    assert {p["key"] for p in plan_lines} == {j.key for j in good + [broken]}


def test_png_parameters_parse_back_to_the_job(ray_run):
    r = ray_run["result"]
    job = ray_run["good"][0]
    path = r.run_dir / f"images/{job.name}.png"
    p = parse_parameters(read_png_text(path)["parameters"])
    assert split_lora_tags(p["Prompt"])[0] == job.prompt
    assert p["Negative prompt"] == job.negative_prompt
    assert (int(p["Seed"]), int(p["Steps"]), float(p["CFG scale"]), p["Size"]) == (
        job.seed, job.num_inference_steps, job.guidance_scale, f"{job.width}x{job.height}")
    meta = read_castbook_chunk(path)
    assert meta["key"] == job.key and meta["environment"]["device"] == "cpu"


def test_reproduce_matches_the_ray_rendered_bytes(ray_run, capsys):
    from castbook.cli import main

    job = ray_run["good"][0]
    path = ray_run["result"].run_dir / f"images/{job.name}.png"
    assert main(["reproduce", str(path)]) == 0
    assert "match" in capsys.readouterr().out


def test_all_cached_rerun_renders_nothing_and_imports_no_torch(ray_run, tmp_path):
    """A subprocess, so sys.modules is clean: the all-cached path must not import torch or ray."""
    good = ray_run["good"]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(j.model_dump_json() + "\n" for j in good))
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from runner_helpers import make_plan
        from schemas.job import RenderJob
        from renderer.runner import run_render
        jobs = [RenderJob.model_validate_json(l) for l in open({str(jobs_file)!r})]
        r = run_render(make_plan(jobs, root=Path({str(ray_run['root'])!r})), out_dir={str(ray_run['out'])!r}, quiet=True)
        heavy = sorted(m for m in ("torch", "ray", "diffusers", "transformers") if m in sys.modules)
        print(json.dumps({{"counts": r.counts, "heavy": heavy, "run_dir": str(r.run_dir), "exit": r.exit_code}}))
        """
    )
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["counts"] == {"total": 3, "rendered": 0, "cached": 3, "failed": 0}
    assert res["heavy"] == [] and res["exit"] == 0
    run_dir = Path(res["run_dir"])
    for rec in manifest(run_dir):
        assert rec.status == "cached"
        img = run_dir / rec.image
        assert img.read_bytes() == ImageCache(ray_run["out"]).png(rec.key).read_bytes()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and run["startup"]["ray_init_s"] is None


def test_changed_prompt_renders_only_its_jobs_and_force_rerenders(tmp_path):
    jobs = [make_job(scene=s, seed=i) for s in ("beach", "town") for i in (1, 2)]
    plan = make_plan(jobs, root=tmp_path)
    first = run_render(plan, out_dir=tmp_path / "runs", executor="local", quiet=True)
    assert first.counts["rendered"] == 4 and first.exit_code == 0
    edited = [j if j.scene == "beach" else make_job(scene="town", seed=j.seed, prompt="luca in the rain")
              for j in jobs]
    second = run_render(make_plan(edited, root=tmp_path), out_dir=tmp_path / "runs", executor="local", quiet=True)
    recs = manifest(second.run_dir)
    assert sorted(names(recs, "rendered")) == sorted(j.name for j in jobs if j.scene == "town")
    assert sorted(names(recs, "cached")) == sorted(j.name for j in jobs if j.scene == "beach")
    forced = run_render(plan, out_dir=tmp_path / "runs", executor="local", quiet=True, force=True, only="*/beach/*")
    assert forced.counts == {"total": 2, "rendered": 2, "cached": 0, "failed": 0}
    # Same seed, same bytes: the cache entry is unchanged by the forced re-render.
    for rec in manifest(forced.run_dir):
        assert (forced.run_dir / rec.image).read_bytes() == (first.run_dir / rec.image).read_bytes()


def test_ray_workers_run_offline_with_the_drivers_castbook_settings(monkeypatch):
    monkeypatch.setenv("CASTBOOK_TORCH_THREADS", "3")
    env = worker_env()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["CASTBOOK_TORCH_THREADS"] == "3" and env["CASTBOOK_IN_RAY"] == "1"


def test_jobs_are_grouped_by_lora_stack():
    a = ResolvedLora(name="a", path="a.safetensors", digest="1" * 64, weight=1.0, kind="style")
    b = ResolvedLora(name="b", path="b.safetensors", digest="2" * 64, weight=1.0, kind="style")
    jobs = [make_job(seed=1, loras=(a,)), make_job(seed=2, loras=(b,)), make_job(seed=3, loras=(a,)),
            make_job(seed=4), make_job(seed=5, loras=(b,))]
    assert [j.seed for j in order_jobs(jobs)] == [1, 3, 2, 5, 4]


def _write_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    return spec


def test_second_run_on_locked_root_exits_2_naming_the_holder(tmp_path):
    spec = _write_spec(tmp_path)
    with RootLock(tmp_path / "runs"):
        r = subprocess.run([CASTBOOK, "render", str(spec), "--root", str(tmp_path), "--out", str(tmp_path / "runs"),
                            "--quiet", "--no-report"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"in use by process {os.getpid()}" in r.stderr


def test_kill_9_then_rerun_renders_exactly_the_missing_jobs(tmp_path):
    spec = _write_spec(tmp_path)
    out = tmp_path / "runs"
    cmd = [CASTBOOK, "render", str(spec), "--root", str(tmp_path), "--out", str(out), "--quiet", "--no-report"]
    slow = dict(os.environ, CASTBOOK_TEST_JOB_DELAY_S="0.7")  # so the kill lands part-way
    log = open(tmp_path / "killed.log", "wb")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT, env=slow)
    deadline = time.monotonic() + 240
    killed_run = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list(out.glob("2*"))
            if runs and len(manifest(runs[0])) >= 2:
                killed_run = runs[0]
                break
            time.sleep(0.1)
        assert killed_run is not None, f"no progress before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    done_before = {r.key for r in manifest(killed_run)}
    assert 2 <= len(done_before) < 6
    assert json.loads((killed_run / "run.json").read_text())["status"] == "running"  # killed, never closed
    cache = ImageCache(out)
    cached_keys = {p.stem for p in cache.dir.glob("*.png")}
    assert done_before <= cached_keys  # every ledger line has its image

    # Resume is executor-independent (cache + ledger); local saves a Ray start here.
    r = subprocess.run([*cmd, "--executor", "local"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    new_run = max(out.glob("2*"), key=lambda p: p.stat().st_mtime_ns)
    recs = manifest(new_run)
    assert len(recs) == 6 and len({x.name for x in recs}) == 6  # no duplicates
    assert {x.key for x in recs if x.status == "cached"} == cached_keys
    rendered = {x.key for x in recs if x.status == "rendered"}
    assert rendered and not (rendered & cached_keys)  # exactly the missing ones
    assert len(rendered) + len(cached_keys) == 6
    assert all((new_run / x.image).is_file() for x in recs)


def test_spec_error_exits_2_before_anything_is_created(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("num_inference_steps: 2", "num_inference_steps: many"))
    r = subprocess.run([CASTBOOK, "render", str(spec), "--root", str(tmp_path), "--out", str(tmp_path / "runs"),
                        "--quiet", "--no-report"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "num_inference_steps" in r.stderr
    assert not (tmp_path / "runs").exists()
