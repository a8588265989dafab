"""renderer.outputs, renderer.png_metadata, renderer.writer: atomic writes, PNG metadata, ledger, lock, cache (no torch needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image
from runner_helpers import make_job

from core.files import atomic_write_bytes, link_or_copy, new_temp_folder, publish_folder
from core.jsonl import append_jsonl, read_jsonl
from renderer import outputs
from renderer.outputs import ImageCache, RootLock, RunLocked, new_run_dir
from renderer.png_metadata import (
    encode_png,
    format_parameters,
    parse_parameters,
    read_castbook_chunk,
    read_png_text,
    split_lora_tags,
)
from renderer.writer import RunWriter
from schemas.job import ResolvedLora
from schemas.records import ManifestRecord, RenderResult

LORA = ResolvedLora(name="luca", path="loras/luca.safetensors", digest="ab" * 32, weight=0.8, kind="character")
STYLE = ResolvedLora(name="ink", path="loras/ink.safetensors", digest="cd" * 32, weight=1.0, kind="style")


def test_parameters_round_trip_prompt_seed_steps_cfg_size():
    job = make_job(seed=1234, steps=3, size=64, loras=(LORA, STYLE))
    text = format_parameters(job)
    lines = text.split("\n")
    assert lines[0] == f"{job.prompt} <lora:luca:0.8> <lora:ink:1>"
    assert lines[1] == "Negative prompt: blurry, lowres"
    p = parse_parameters(text)
    prompt, loras = split_lora_tags(p["Prompt"])
    assert prompt == job.prompt
    assert loras == [("luca", 0.8), ("ink", 1.0)]
    assert p["Negative prompt"] == job.negative_prompt
    assert int(p["Seed"]) == 1234
    assert int(p["Steps"]) == 3
    assert float(p["CFG scale"]) == job.guidance_scale
    assert p["Size"] == "64x64"
    assert p["Sampler"] == "Euler a"
    assert p["Model"] == "tiny-sdxl"  # the built-in's name (a file's stem, a folder's name)
    assert len(p["Model hash"]) == 10
    # no LoRA files at hand here: the fallback is the first 12 digits of each file's sha256
    assert p["Lora hashes"] == f"luca: {'ab' * 6}, ink: {'cd' * 6}"
    assert p["Version"] == "castbook-0.1.0"


@pytest.mark.parametrize(
    "scheduler,name",
    [("euler", "Euler"), ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_karras", "DPM++ 2M"),
     ("ddim", "DDIM"), ("unipc", "UniPC")],
)
def test_sampler_names_as_a1111_writes_them(scheduler, name):
    assert parse_parameters(format_parameters(make_job(scheduler=scheduler)))["Sampler"] == name


def test_prompt_with_commas_and_colons_survives():
    job = make_job(prompt="luca, 1boy: smiling, (red scarf:1.2)")
    p = parse_parameters(format_parameters(job))
    assert p["Prompt"] == job.prompt
    assert "Lora hashes" not in p


def test_png_carries_parameters_and_castbook_chunks():
    job = make_job(loras=(LORA,))
    env = {"castbook": "0.1.0", "torch": "2.14.1", "diffusers": "0.42.1", "device": "cpu", "dtype": "fp32"}
    png = encode_png(Image.new("RGB", (64, 64), (10, 20, 30)), job, env)
    text = read_png_text(png)
    assert parse_parameters(text["parameters"])["Seed"] == str(job.seed)
    meta = read_castbook_chunk(png)
    assert meta["key"] == job.key
    assert meta["job"] == job.model_dump(mode="json")
    assert meta["lora_digests"] == {"luca": LORA.digest}
    assert meta["environment"] == env
    # Deterministic bytes: reproduce compares them.
    assert encode_png(Image.new("RGB", (64, 64), (10, 20, 30)), job, env) == png


def test_read_castbook_chunk_on_foreign_png_names_the_problem(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(p)
    with pytest.raises(ValueError, match="no 'castbook' metadata"):
        read_castbook_chunk(p)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(os.listdir(target.parent)) == ["f.bin"]


def test_ledger_tolerates_torn_last_line_and_appends_after_it(tmp_path):
    m = tmp_path / "manifest.jsonl"
    append_jsonl(m, {"key": "a"})
    append_jsonl(m, {"key": "b"})
    with open(m, "a") as f:
        f.write('{"key": "c", "sta')  # kill -9 mid-write
    assert [r["key"] for r in read_jsonl(m)] == ["a", "b"]
    append_jsonl(m, {"key": "d"})
    assert [r["key"] for r in read_jsonl(m)] == ["a", "b", "d"]


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    with RootLock(tmp_path):
        code = (
            "import sys; from renderer.outputs import RootLock, RunLocked\n"
            f"try:\n    RootLock({str(tmp_path)!r}).acquire()\nexcept RunLocked as e:\n"
            "    print(e); sys.exit(2)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert f"process {os.getpid()}" in r.stdout
    RootLock(tmp_path).acquire().release()  # free again after release


def test_lock_in_same_process_is_refused(tmp_path):
    with RootLock(tmp_path):
        with pytest.raises(RunLocked, match=str(os.getpid())):
            RootLock(tmp_path).acquire()


def test_cache_entry_and_control_maps(tmp_path):
    cache = ImageCache(tmp_path)
    assert not cache.has("k")
    cache.put_control("ab-canny.png", b"ctl")
    cache.put("k", b"png", ["ab-canny.png"])
    assert cache.has("k") and cache.png("k").read_bytes() == b"png"
    assert cache.control_maps("k") == ["ab-canny.png"]
    with pytest.raises(ValueError, match="plain file name"):
        cache.put_control("../x.png", b"")


def test_link_or_copy_shares_the_inode(tmp_path):
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    dst = tmp_path / "run" / "images" / "b.png"
    link_or_copy(src, dst)
    link_or_copy(src, dst)  # idempotent
    assert dst.read_bytes() == b"x" and os.stat(dst).st_ino == os.stat(src).st_ino


def test_run_dirs_never_collide(tmp_path):
    a = new_run_dir(tmp_path, "luca")
    b = new_run_dir(tmp_path, "luca")
    assert a != b and a.name.endswith("-luca") and b.is_dir()


def test_image_path_rejects_escape():
    job = make_job().model_copy(update={"name": "main/../../etc/x"})
    with pytest.raises(ValueError, match="not a safe relative path"):
        outputs.image_relpath(job)


def test_outputs_module_does_not_import_torch():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, renderer.outputs, renderer.png_metadata, renderer.writer, renderer.runner, "
                               "schemas.records; print('torch' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert r.stdout.strip() == "False", r.stderr


def test_writer_ledger_lines_are_manifest_records_that_reports_read_back(tmp_path):
    from reports.rundir import load_run

    ok, bad = make_job(seed=1), make_job(seed=2)
    run_dir = new_run_dir(tmp_path, "t")
    outputs.write_plan_jsonl(run_dir / "plan.jsonl", [ok, bad])
    (run_dir / "run.json").write_text("{}")
    writer = RunWriter(tmp_path, run_dir)
    writer.result(ok, RenderResult(key=ok.key, actor=0, pid=1, png=b"png-bytes", seconds=0.5,
                                   timings={"denoise_s": 0.4}, device="cpu", dtype="fp32"))
    writer.result(bad, RenderResult(key=bad.key, actor=0, pid=1, error="JobError: boom", seconds=0.1))
    writer.result(ok, RenderResult(key=ok.key, actor=0, pid=1, png=b"again"))  # a late retry: not written twice
    assert writer.counts == {"rendered": 1, "cached": 0, "failed": 1}
    lines = read_jsonl(run_dir / "manifest.jsonl")
    assert list(lines[0]) == list(ManifestRecord.model_fields)[:-1]  # documented order; bare_seconds never written
    assert lines[0]["image"] == f"images/{ok.name}.png" and lines[0]["timings"] == {"denoise_s": 0.4}
    assert (run_dir / lines[0]["image"]).read_bytes() == b"png-bytes"
    run = load_run(run_dir)
    by_name = {e.name: e for e in run.entries}
    assert by_name[ok.name].status == "rendered" and by_name[ok.name].record.seconds == 0.5
    assert by_name[bad.name].status == "failed" and by_name[bad.name].ledger["error"] == "JobError: boom"


def test_older_bench_ledgers_with_bare_seconds_still_read():
    line = {"key": "k", "name": "n", "status": "rendered", "image": "images/n.png", "seconds": 1.0, "steps": 4,
            "peak_memory_bytes": None, "timings": {}, "lora_switched": False, "fallback": None, "error": None,
            "control_maps": [], "actor": 0, "finished_at": "2026-11-30T03:15:10Z", "bare_seconds": None}
    record = ManifestRecord.model_validate(line)
    assert "bare_seconds" not in record.to_json()
    with pytest.raises(ValueError, match="status"):
        ManifestRecord.model_validate({**line, "status": "done"})


def test_one_run_json_builder_for_render_and_bench(tmp_path):
    run_dir = new_run_dir(tmp_path, "luca")
    run = outputs.new_run_info(run_dir, kind="render", root=tmp_path, spec_files=["spec.yaml"], total=3,
                               executor="local", actors=1, characters={"luca": {}}, scoring=None, only=None, force=False)
    for key in ("run_id", "castbook_version", "root", "spec_files", "spec_digest", "git_commit", "started",
                "finished", "status", "counts", "environment", "executor", "actors", "startup", "characters",
                "scoring"):  # docs/INTERFACES.md
        assert key in run, key
    assert run["status"] == "running" and run["counts"] == {"total": 3, "rendered": 0, "cached": 0, "failed": 0}
    outputs.finish_run_info(run, status="finished", counts={"rendered": 2, "cached": 0, "failed": 1})
    assert run["counts"] == {"total": 3, "rendered": 2, "cached": 0, "failed": 1} and run["finished"]
    bench = outputs.new_run_info(run_dir, kind="bench", root=tmp_path, spec_files=["bench:x"], total=2,
                                 executor="local", actors=1)
    assert bench["kind"] == "bench" and bench["spec_digest"] is None and set(run) - set(bench) == {"only", "force"}


def test_publish_folder_first_writer_wins(tmp_path):
    final = tmp_path / "builtins" / "model-r1"
    first, second = new_temp_folder(final), new_temp_folder(final)
    (first / "config.json").write_text("first")
    (second / "config.json").write_text("second")
    assert publish_folder(first, final) is True
    assert publish_folder(second, final) is False
    assert (final / "config.json").read_text() == "first"
    assert not first.exists() and not second.exists()
    assert oct(final.stat().st_mode & 0o777) == "0o755"
