"""`gate: false` job matrices: scored and shown per job, never counted toward the gate."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from castbook.cli import main as cli_main
from reports import write_reports
from schemas.job import RenderJob
from schemas.plan import load_plan
from tests.reports_fixtures import build_run, castbook_home, draw, make_job, make_refs  # noqa: F401

pytestmark = pytest.mark.usefixtures("castbook_home")

# luca looks like a red disc; the baseline (no LoRA) draws blue stripes, which must fail
# the per-image threshold, while the LoRA job's discs pass it.
SPEC = """\
defaults:
  preset: draft
presets:
  draft: {width: 64, height: 64, num_inference_steps: 4}
characters:
  luca:
    description: red disc
    references: [refs/luca/*.png]
    threshold: 0.99
  mia:
    description: blue stripes
scenes:
  beach:
    prompt: "{{ character }} on the beach"
jobs:
  main:
    characters: [luca, mia]
    scenes: [beach]
    seeds: [1, 2]
  baseline:
    characters: [luca]
    scenes: [beach]
    seeds: [1, 2]
    use_loras: false
    gate: false
"""


def _project(tmp_path: Path, spec: str = SPEC) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    make_refs(root, "luca", "circle")
    (root / "spec.yaml").write_text(spec)
    return root


def _run(tmp_path: Path, run_id: str, spec: str = SPEC, main: bool = True) -> Path:
    """A run whose run.json `characters` come from the real plan of `spec`."""
    root = _project(tmp_path / run_id, spec)
    characters = {"luca": load_plan([root / "spec.yaml"]).characters["luca"]}
    items = [{"job": make_job("luca", "beach", seed=s, job="baseline"), "picture": draw("stripes", s)}
             for s in (1, 2)]
    if main:
        items = [{"job": make_job("luca", "beach", seed=s, job="main"), "picture": draw("circle", s - 1)}
                 for s in (1, 2)] + items
    return build_run(tmp_path / run_id / "runs", run_id, root, items, characters)


def _check(run_dir: Path) -> int:
    return cli_main(["check", str(run_dir)])


class _JobRows(HTMLParser):
    """Text and badge classes of every `<tr data-job=...>`, per character section."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: dict[tuple[str, str], dict] = {}
        self.section = self.row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("data-character")
        elif tag == "tr" and "data-job" in a:
            self.row = self.rows.setdefault((self.section, a["data-job"]), {"text": "", "badges": []})
        elif tag == "span" and self.row is not None and "badge" in (a.get("class") or "").split():
            self.row["badges"].append(a["class"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None

    def handle_data(self, data):
        if self.row is not None:
            self.row["text"] += data


def job_rows(path: Path) -> dict[tuple[str, str], dict]:
    p = _JobRows()
    p.feed(path.read_text(encoding="utf-8"))
    return p.rows


# --- plan --------------------------------------------------------------------------------
def test_gate_false_changes_no_key_and_is_listed_per_character(tmp_path):
    root = _project(tmp_path)
    plan = load_plan([root / "spec.yaml"])
    assert plan.characters["luca"]["ungated_jobs"] == ["baseline"]
    assert plan.characters["mia"]["ungated_jobs"] == []  # mia is not in the baseline job
    assert "gate" not in RenderJob.model_fields
    gated = {j.name: j.key for j in plan.jobs}
    (root / "spec.yaml").write_text(SPEC.replace("    gate: false\n", ""))
    plan_gated = load_plan([root / "spec.yaml"])
    assert {j.name: j.key for j in plan_gated.jobs} == gated
    assert len([n for n in gated if n.startswith("baseline/")]) == 2
    assert plan_gated.characters["luca"]["ungated_jobs"] == []


def test_gate_must_be_a_boolean(tmp_path):
    from schemas.loader import SpecErrors

    root = _project(tmp_path, SPEC.replace("gate: false", "gate: sometimes"))
    with pytest.raises(SpecErrors, match="gate"):
        load_plan([root / "spec.yaml"])


# --- reports -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ungated(tmp_path_factory):
    run_dir = _run(tmp_path_factory.mktemp("gate"), "20261130T000000Z-ungated")
    paths = write_reports(run_dir)
    return run_dir, paths, json.loads(paths["results"].read_text())


def test_by_job_numbers_and_gate_leave_the_baseline_out(ungated):
    _, _, res = ungated
    luca = res["characters"]["luca"]
    images = {r["name"]: r for r in res["images"]}
    main = [r for r in images.values() if r["job"] == "main"]
    base = [r for r in images.values() if r["job"] == "baseline"]
    # The premise: discs pass, stripes fail, image by image (the baseline keeps its `pass`).
    assert [r["pass"] for r in main] == [True, True]
    assert [r["pass"] for r in base] == [False, False]

    assert luca["ungated_jobs"] == ["baseline"]
    assert set(luca["by_job"]) == {"main", "baseline"}
    assert luca["by_job"]["main"] == {
        "selected": 2, "passed": 2, "pass_rate": 1.0, "gated": True, "would_pass": True,
        "clip_i_mean": pytest.approx(sum(r["clip_i_mean"] for r in main) / 2, abs=1e-6)}
    assert luca["by_job"]["baseline"] == {
        "selected": 2, "passed": 0, "pass_rate": 0.0, "gated": False, "would_pass": False,
        "clip_i_mean": pytest.approx(sum(r["clip_i_mean"] for r in base) / 2, abs=1e-6)}
    # The character's own numbers are the gated job's only.
    assert (luca["jobs"], luca["selected"], luca["passed"], luca["failed"]) == (2, 2, 2, 0)
    assert luca["pass_rate"] == 1.0 and luca["gate_passed"] is True
    assert luca["clip_i_mean"]["min"] == min(r["clip_i_mean"] for r in main)
    assert res["gate"] == {"passed": True, "failures": []}
    # The summary agrees with the character's gated mean; the baseline shows only in `_all`.
    assert res["summary"]["clip_i_mean"] == pytest.approx(luca["clip_i_mean"]["mean"], abs=1e-6)
    assert res["summary"]["clip_i_mean_all"] == pytest.approx(
        sum(r["clip_i_mean"] for r in main + base) / 4, abs=1e-6)
    assert res["summary"]["clip_i_mean_all"] < res["summary"]["clip_i_mean"]


def test_check_passes_with_the_baseline_ungated_and_fails_with_it_gated(ungated, tmp_path, capsys):
    run_dir, _, _ = ungated
    assert _check(run_dir) == 0
    assert "ok   luca: pass rate 1.00 (2/2" in capsys.readouterr().out

    gated = _run(tmp_path, "20261130T000000Z-gated", SPEC.replace("    gate: false\n", ""))
    assert _check(gated) == 1
    err = capsys.readouterr().err
    assert "character luca: pass rate 0.50 (2/4" in err and "below the gate 0.80" in err


def test_a_run_json_without_ungated_jobs_counts_every_job(tmp_path):
    """Runs written before `gate` existed: every job counts, as it did then."""
    run_dir = _run(tmp_path, "20261130T000000Z-old")
    info = json.loads((run_dir / "run.json").read_text())
    del info["characters"]["luca"]["ungated_jobs"]
    (run_dir / "run.json").write_text(json.dumps(info))
    assert _check(run_dir) == 1
    res = json.loads(write_reports(run_dir)["results"].read_text())
    assert res["characters"]["luca"]["by_job"]["baseline"]["gated"] is True


def test_only_ungated_images_leave_no_pass_rate(tmp_path):
    run_dir = _run(tmp_path, "20261130T000000Z-only", main=False)
    res = json.loads(write_reports(run_dir)["results"].read_text())
    luca = res["characters"]["luca"]
    assert (luca["jobs"], luca["selected"], luca["pass_rate"]) == (0, 0, None)
    assert luca["gate_passed"] is True  # the None rule: no error, nothing gated to judge
    assert luca["by_job"]["baseline"]["would_pass"] is False
    assert _check(run_dir) == 0


def test_consistency_page_has_a_by_job_row_per_job(ungated):
    _, paths, res = ungated
    rows = job_rows(paths["consistency"])
    assert set(rows) == {("luca", "main"), ("luca", "baseline")}
    base, main = rows[("luca", "baseline")], rows[("luca", "main")]
    assert "not gated — would fail" in base["text"] and base["badges"] == ["badge fail"]
    assert "counts" in main["text"] and main["badges"] == [] and "would" not in main["text"]
    assert "0%" in base["text"] and "100%" in main["text"]
    # The character's own badge still says the gate passed.
    text = paths["consistency"].read_text(encoding="utf-8")
    assert "gate passed" in text and "<code>gate: false</code>" in text


def test_an_ungated_job_that_would_pass_says_so(tmp_path):
    root = _project(tmp_path)
    characters = {"luca": load_plan([root / "spec.yaml"]).characters["luca"]}
    items = [{"job": make_job("luca", "beach", seed=1, job="baseline"), "picture": draw("circle", 0)}]
    run_dir = build_run(tmp_path / "runs", "20261130T000000Z-wp", root, items, characters)
    rows = job_rows(write_reports(run_dir)["consistency"])
    assert "not gated — would pass" in rows[("luca", "baseline")]["text"]
    assert rows[("luca", "baseline")]["badges"] == ["badge pass"]


def test_all_images_grid_has_a_row_per_job_and_scene(ungated):
    """A baseline shares scene, preset and seed with its LoRA job: both must be visible."""
    import re

    _, paths, _ = ungated
    text = paths["consistency"].read_text(encoding="utf-8")
    rows = re.findall(r'<tr data-scene="([^"]*)" data-grid-job="([^"]*)"><th class="rowhead">([^<]*)</th>', text)
    assert sorted(rows) == [("beach", "baseline", "baseline · beach"), ("beach", "main", "main · beach")]
