"""`castbook plan --changes`: new, unchanged and re-rendered jobs, each with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from test_plan import SPEC, proj  # noqa: F401 - fixture

from core.files import atomic_write_json, atomic_write_text
from schemas.changes import find_previous_run, load_run_jobs, plan_changes
from schemas.plan import load_plan


def _fake_run(out: Path, name: str, plan, started: str) -> Path:
    """A run folder as `castbook render` leaves it: run.json + plan.jsonl (enough for --changes)."""
    run = out / name
    atomic_write_json(run / "run.json", {"run_id": name, "started": started,
                                         "spec_files": [str(p) for p in plan.spec_files]})
    atomic_write_text(run / "plan.jsonl", "".join(j.model_dump_json() + "\n" for j in plan.jobs))
    return run


def test_an_edit_rerenders_only_its_jobs_and_says_why(proj):  # noqa: F811
    before = load_plan([proj / "spec.yaml"])
    (proj / "spec.yaml").write_text(SPEC.replace("draft: {width: 64, height: 64, num_inference_steps: 4}",
                                                 "draft: {width: 64, height: 64, num_inference_steps: 6}"))
    (proj / "hero.safetensors").write_bytes(b"hero-v2")
    after = load_plan([proj / "spec.yaml"])
    changes = plan_changes(after.jobs, before.jobs, cached_keys=set())

    by_name = {c.name: c for c in changes.jobs}
    park = by_name["main/hero/park/draft/seed-10"]
    assert park.status == "rerender"
    assert "num_inference_steps 4 → 6" in park.reasons
    digest_reason = [r for r in park.reasons if r.startswith("loras.hero_lora.digest ")]
    assert len(digest_reason) == 1 and "→" in digest_reason[0]
    # The sidekick has no LoRA: only the step count changed for it.
    assert by_name["main/sidekick/park/draft/seed-10"].reasons == ("num_inference_steps 4 → 6",)
    # `high` preset jobs of the sidekick do not change at all.
    assert by_name["main/sidekick/park/high/seed-10"].status == "unchanged"
    assert changes.count("new") == 0 and changes.removed == ()
    assert json.loads(json.dumps(changes.to_json()))["counts"]["rerender"] == changes.count("rerender")


def test_new_and_removed_jobs_and_the_cache(proj):  # noqa: F811
    before = load_plan([proj / "spec.yaml"])
    (proj / "spec.yaml").write_text(SPEC.replace("seeds: {count: 3, start: 10}", "seeds: {count: 2, start: 11}"))
    after = load_plan([proj / "spec.yaml"])
    changes = plan_changes(after.jobs, before.jobs, cached_keys=set())
    assert "main/hero/park/draft/seed-10" in changes.removed
    assert {c.status for c in changes.jobs if "seed-11" in c.name} == {"unchanged"}
    assert {c.status for c in changes.jobs if "seed-12" in c.name} == {"unchanged"}
    assert changes.count("new") == 0
    # No previous run at all: every job is new unless its image is already cached.
    cold = plan_changes(after.jobs, None, cached_keys={after.jobs[0].key})
    assert cold.jobs[0].status == "unchanged" and cold.jobs[0].cached and cold.count("new") == len(after.jobs) - 1


def test_the_previous_run_is_the_newest_one_of_the_same_spec(proj, tmp_path):  # noqa: F811
    plan = load_plan([proj / "spec.yaml"])
    out = tmp_path / "runs"
    _fake_run(out, "20261201T000000Z-spec", plan, "2026-12-01T00:00:00Z")
    newest = _fake_run(out, "20261202T000000Z-spec", plan, "2026-12-02T00:00:00Z")
    other = out / "20261203T000000Z-other"
    atomic_write_json(other / "run.json", {"started": "2026-12-03T00:00:00Z", "spec_files": ["other.yaml"]})
    (out / "not-a-run").mkdir()
    assert find_previous_run(out, [str(p) for p in plan.spec_files]) == newest
    assert [j.key for j in load_run_jobs(newest)] == [j.key for j in plan.jobs]
    assert find_previous_run(tmp_path / "nowhere", ["spec.yaml"]) is None


def test_plan_changes_command_prints_reasons_and_imports_no_torch(proj, tmp_path):  # noqa: F811
    import subprocess
    import sys

    out = tmp_path / "runs"
    _fake_run(out, "20261201T000000Z-spec", load_plan([proj / "spec.yaml"]), "2026-12-01T00:00:00Z")
    (proj / "spec.yaml").write_text(SPEC.replace("num_inference_steps: 4", "num_inference_steps: 5"))
    code = ("import sys; from castbook.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); raise SystemExit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "plan", str(proj / "spec.yaml"), "--changes", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "re-render  main/hero/park/draft/seed-10: num_inference_steps 4 → 5" in lines
    assert "unchanged  main/hero/park/high/seed-10 (same key, but not in the cache: renders again)" in lines
    assert lines[-2].endswith("compared with the last run " + str(out / "20261201T000000Z-spec"))
    assert lines[-1] == "NO-TORCH"

    as_json = subprocess.run([sys.executable, "-m", "castbook", "plan", str(proj / "spec.yaml"), "--changes",
                              str(out / "20261201T000000Z-spec"), "--json"], capture_output=True, text=True, timeout=120)
    data = json.loads(as_json.stdout)
    assert data["counts"]["rerender"] == sum(1 for j in data["jobs"] if j["status"] == "rerender") > 0
    steps = next(j for j in data["jobs"] if j["name"] == "main/hero/park/draft/seed-10")["fields"]
    assert steps == {"num_inference_steps": {"before": 4, "after": 5}}

    not_a_run = subprocess.run([sys.executable, "-m", "castbook", "plan", str(proj / "spec.yaml"), "--changes",
                                str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert not_a_run.returncode == 2 and "is not a castbook run folder" in not_a_run.stderr
    assert "Traceback" not in not_a_run.stderr
