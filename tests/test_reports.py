"""Reports on real run directories: parsed HTML (not byte compares), results.json, gate, trends, diff."""

from __future__ import annotations

import argparse
import itertools
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from castbook.cli import main as cli_main
from castbook.commands import check as check_cmd
from castbook.commands import report as report_cmd
from reports import write_reports
from reports.analysis import analyze
from tests.reports_fixtures import (  # noqa: F401
    XSS_ATTR,
    XSS_SCRIPT,
    build_run,
    castbook_home,
    draw,
    make_job,
    make_refs,
    standard_characters,
    standard_items,
)

pytestmark = pytest.mark.usefixtures("castbook_home")
PAGES = ("report", "consistency", "benchmark", "diff")


# --- a tiny DOM from html.parser -----------------------------------------------------------
class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def all_text(self) -> str:
        return "".join(t for n in self.iter() for t in n.text)


class _Tree(HTMLParser):
    VOID = {"meta", "link", "img", "br", "input", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", [])
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        if n is not self.root:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def parse(path: Path) -> Node:
    t = _Tree()
    t.feed(path.read_text(encoding="utf-8"))
    return t.root


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory, castbook_home):
    """Three runs of the same spec: the last is slower, changes one prompt and one image."""
    base = tmp_path_factory.mktemp("reports")
    root, out = base / "proj", base / "runs"
    chars = standard_characters(root)
    runs = []
    for n, (rid, slow) in enumerate([("20261128T000000Z-t", 0.40), ("20261129T000000Z-t", 0.42),
                                     ("20261130T000000Z-t", 0.60)]):
        items = standard_items(slow)
        if n == 2:
            items[2] = dict(items[2], job=make_job("luca", "city", seed=1, prompt="luca, changed"))
            items[1] = dict(items[1], picture=draw("circle", 3))  # same key, other bytes
            items.append({"job": make_job("luca", "new-scene", seed=1), "picture": draw("circle", 1),
                          "seconds": slow})
        run_dir = build_run(out, rid, root, items, chars)
        paths = write_reports(run_dir)
        runs.append((run_dir, paths))
    return {"root": root, "out": out, "runs": runs}


@pytest.fixture(scope="module")
def current(project):
    run_dir, paths = project["runs"][-1]
    return run_dir, paths, json.loads(paths["results"].read_text())


# --- tests -------------------------------------------------------------------------------
def test_all_outputs_written_atomically(current):
    run_dir, paths, _ = current
    assert set(paths) == {"results", "selection", "report", "consistency", "benchmark", "diff", "index"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 0
    assert not list(run_dir.rglob("*.tmp"))
    assert list((run_dir / "thumbs").glob("*.jpg"))


def test_results_json_numbers(current):
    _, _, res = current
    s = res["summary"]
    assert res["schema_version"] == 1
    assert (s["jobs"], s["rendered"], s["failed"], s["cached"]) == (15, 14, 1, 0)
    luca = res["characters"]["luca"]
    recs = [r for r in res["images"] if r["character"] == "luca" and r["selected"] and r["clip_i_mean"] is not None]
    assert luca["selected"] == len(recs)
    assert luca["passed"] == sum(r["clip_i_mean"] >= 0.97 for r in recs)
    assert luca["pass_rate"] == pytest.approx(luca["passed"] / luca["selected"], abs=1e-6)
    off_model = next(r for r in res["images"] if r["name"] == "main/luca/city/draft/seed-2")
    assert off_model["pass"] is False  # blue stripes are not luca's red disc
    on_model = next(r for r in res["images"] if r["name"] == "main/luca/beach/draft/seed-1")
    assert on_model["clip_i_best"] == pytest.approx(1.0, abs=1e-5)  # identical to reference 0
    assert on_model["clip_i_ratio"] == pytest.approx(on_model["clip_i_mean"] / luca["ceiling"], abs=1e-5)
    assert all(r["clip_t"] is not None for r in res["images"] if r["image"])


def test_ceiling_is_mean_pairwise_of_the_references(project, current):
    _, _, res = current
    a = analyze(project["runs"][-1][0], history=False)
    for name, c in res["characters"].items():
        e = a.refs[name]["clip"]
        pairs = [float(np.dot(e[i], e[j])) for i, j in itertools.combinations(range(len(e)), 2)]
        assert c["ceiling"] == pytest.approx(np.mean(pairs), abs=1e-5)


def test_rescoring_hits_the_cache_and_loads_no_model(project):
    a = analyze(project["runs"][-1][0])
    assert a.clip.stats.model_loads == 0
    assert a.clip.stats.image_model_calls == 0 and a.clip.stats.text_model_calls == 0
    assert a.clip.stats.image_cache_hits > 0


def test_report_counts_and_failed_jobs(current):
    run_dir, paths, res = current
    doc = parse(paths["report"])
    counts = {n.attrs["data-count"]: n.find_all(cls="v")[0].all_text() for n in doc.find_all(cls="stat")
              if "data-count" in n.attrs}
    for k in ("jobs", "rendered", "cached", "failed"):
        assert counts[k] == str(res["summary"][k])
    failed_rows = doc.find_all("tr", cls="failed-job")
    assert len(failed_rows) == len(res["failed_jobs"]) == 1
    assert "out of memory" in failed_rows[0].all_text()
    assert doc.find_all(id="gate")[0].classes >= {"banner", "fail"}
    assert "abc1234" in doc.find_all(id="run-info")[0].all_text()


def _tile_state(r: dict) -> str:
    if r["status"] in ("failed", "missing") or r["image"] is None:
        return "failed" if r["status"] != "missing" else "missing"
    if not r["selected"]:
        return "loser"
    if r["pass"] is None:
        return "unscored"
    return "pass" if r["pass"] else "fail"


def test_consistency_rows_per_character_and_pass_fail_classes(current):
    _, paths, res = current
    doc = parse(paths["consistency"])
    by_key = {r["key"]: r for r in res["images"]}
    sections = {s.attrs["data-character"]: s for s in doc.find_all("section")}
    assert set(sections) == {"luca", "mia", ""}
    for name, sec in sections.items():
        mine = [r for r in res["images"] if (r["character"] or "") == name]
        # Every job of the character appears in its grids exactly once (worst offenders repeat some).
        tiles = [t for g in sec.find_all("table", cls="grid") for t in g.find_all("div", cls="tile")]
        assert sorted(t.attrs["data-key"] for t in tiles) == sorted(r["key"] for r in mine)
        for t in tiles:
            r = by_key[t.attrs["data-key"]]
            assert _tile_state(r) in t.classes, (r["name"], t.classes)
        if name:
            summary = res["characters"][name]
            cell = {td.attrs["data-field"]: td.all_text() for td in sec.find_all("td") if "data-field" in td.attrs}
            assert cell["selected"] == str(summary["selected"])
            assert cell["passed"] == str(summary["passed"])
    # Both pass and fail states really occur, so the class check above is not vacuous.
    states = {t.attrs["data-state"] for t in doc.find_all("div", cls="tile")}
    assert {"pass", "fail", "failed", "loser", "unscored"} <= states
    # Sweep axes form a grid: 2 guidance values across, 2 step counts down.
    sweep = doc.find_all("table", cls="sweep")
    assert len(sweep) == 1
    rows = sweep[0].find_all("tr")
    assert len(rows) == 3 and len(rows[0].find_all("th")) == 3


def test_worst_offenders_come_first(current):
    _, paths, res = current
    doc = parse(paths["consistency"])
    luca = doc.find_all("section", data_character="luca")[0]
    worst = luca.find_all("div", cls="worst")[0].find_all("div", cls="tile")
    scores = [next(r for r in res["images"] if r["key"] == t.attrs["data-key"])["clip_i_mean"] for t in worst]
    assert scores == sorted(scores)
    assert worst[0].attrs["data-key"] == next(r["key"] for r in res["images"]
                                              if r["name"] == "main/luca/city/draft/seed-2")


def test_spec_strings_are_escaped_everywhere(current):
    run_dir, paths, res = current
    html = {p: paths[p].read_text() for p in PAGES}
    for page, text in html.items():
        assert XSS_SCRIPT not in text, page
        assert XSS_ATTR not in text, page
        assert "onerror=alert" not in text.replace("onerror=alert(1)&gt;", ""), page
        doc = parse(paths[page])
        assert not [n for n in doc.iter() if "onerror" in n.attrs], page
        scripts = doc.find_all("script")
        assert all(s.attrs.get("type") == "application/json" or "alert(1)" not in s.all_text() for s in scripts)
        assert len(scripts) == (2 if page == "consistency" else 0), page
        for img in doc.find_all("img"):
            assert img.attrs["src"] != "x"
    # The strings still show, as text: in the body (error), an attribute (title), and the JSON block.
    report = parse(paths["report"])
    assert XSS_SCRIPT in report.all_text() and XSS_ATTR in report.all_text()
    cons = parse(paths["consistency"])
    titles = [t.attrs.get("title", "") for t in cons.find_all("div", cls="tile")]
    assert any(XSS_SCRIPT in t for t in titles) and any(XSS_ATTR in t for t in titles)
    assert f"blue stripes {XSS_SCRIPT}" in cons.all_text()
    data = json.loads(cons.find_all("script", id="cell-data")[0].all_text())
    assert {d["key"] for d in data} == {r["key"] for r in res["images"]}


def test_json_block_cannot_be_closed_by_a_name(tmp_path):
    """A job name with `</script>` must stay inside the embedded JSON."""
    root, out = tmp_path / "proj", tmp_path / "runs"
    chars = {"luca": {"references": make_refs(root, "luca", "circle"), "threshold": 0.5}}
    evil = make_job("luca", f"x{XSS_SCRIPT}</script><script>alert(2)</script>", seed=1)
    run_dir = build_run(out, "20261130T000000Z-x", root, [{"job": evil, "picture": draw("circle", 0)}], chars)
    paths = write_reports(run_dir)
    text = paths["consistency"].read_text()
    assert "</script><script>alert(2)" not in text
    doc = parse(paths["consistency"])
    assert len(doc.find_all("script")) == 2
    data = json.loads(doc.find_all("script", id="cell-data")[0].all_text())
    assert data[0]["name"] == evil.name


def test_pages_are_self_contained(current):
    run_dir, paths, _ = current
    for page in PAGES:
        doc = parse(paths[page])
        for n in doc.iter():
            for attr in ("src", "href"):
                v = n.attrs.get(attr)
                if v is None:
                    continue
                assert "://" not in v and not v.startswith("//"), (page, v)
                if n.tag == "img" or (n.tag == "a" and v.endswith((".png", ".jpg"))):
                    assert (run_dir / v).resolve().is_file(), (page, v)
        assert not doc.find_all("link", rel="stylesheet")


def test_trend_chart_has_one_point_per_run(project, current):
    _, paths, res = current
    hist = res["benchmark"]["history"]
    assert [h["run_id"] for h in hist] == ["20261128T000000Z-t", "20261129T000000Z-t", "20261130T000000Z-t"]
    doc = parse(paths["benchmark"])
    charts = doc.find_all("svg", cls="chart")
    assert {c.attrs["data-metric"] for c in charts} >= {"mean_s_per_image", "mean_s_per_step"}
    for c in charts:
        if c.attrs["data-metric"] != "clip_i_mean":
            assert len(c.find_all("circle")) == 3  # 2 previous runs + this one
    # The first run had no earlier run: a single point.
    first = parse(project["runs"][0][1]["benchmark"])
    spi = [c for c in first.find_all("svg", cls="chart") if c.attrs["data-metric"] == "mean_s_per_image"][0]
    assert len(spi.find_all("circle")) == 1


def test_regressions_over_ten_percent_are_highlighted(project, current):
    _, paths, res = current
    regs = {(r["scope"], r["metric"]): r for r in res["benchmark"]["regressions"]}
    assert regs[("run", "mean_s_per_image")]["regression"] is True  # 0.42 -> 0.60
    assert regs[("run", "peak_memory_max_bytes")]["regression"] is False
    doc = parse(paths["benchmark"])
    assert doc.find_all("tr", cls="regression")
    assert [c for c in doc.find_all("svg", cls="chart") if "flagged" in c.classes]
    # Run 2 was only 5% slower than run 1: nothing flagged.
    second = json.loads(project["runs"][1][1]["results"].read_text())
    assert not any(r["regression"] for r in second["benchmark"]["regressions"])


def test_diff_against_previous_run(current):
    _, paths, res = current
    d = res["diff"]
    assert d["previous_run"] == "20261129T000000Z-t"
    assert d["new"] == ["main/luca/new-scene/draft/seed-1"]
    assert [c["name"] for c in d["changed"]] == ["main/luca/city/draft/seed-1"]
    assert d["changed"][0]["changed_fields"] == ["prompt"]
    assert d["changed"][0]["clip_i_drift"] == pytest.approx(0.0, abs=1e-6)  # same picture, new prompt
    assert [n["name"] for n in d["nondeterministic"]] == ["main/luca/beach/draft/seed-2"]
    doc = parse(paths["diff"])
    assert "NON-DETERMINISM" in doc.find_all(id="nondeterminism")[0].all_text()
    assert len(doc.find_all("tr", cls="changed")) == 1
    assert len(doc.find_all("tr", cls="changed")[0].find_all("img")) == 2


def test_first_run_diff_says_nothing_to_compare(project):
    res = json.loads(project["runs"][0][1]["results"].read_text())
    assert res["diff"]["previous_run"] is None
    assert parse(project["runs"][0][1]["diff"]).find_all(id="no-previous")


# --- castbook check / report ------------------------------------------------------------
def _check(run_dir: Path) -> int:
    return cli_main(["check", str(run_dir)])


def _simple_run(tmp_path: Path, name: str, pictures: list[str], threshold: float, failed: bool = False,
                min_pass_rate: float | None = None) -> Path:
    root = tmp_path / "proj"
    refs = make_refs(root, "luca", "circle")
    char = {"references": refs, "threshold": threshold}
    if min_pass_rate is not None:
        char["min_pass_rate"] = min_pass_rate
    items = [{"job": make_job("luca", "s", seed=i), "picture": draw(kind, 0)} for i, kind in enumerate(pictures)]
    if failed:
        items.append({"job": make_job("luca", "s", seed=99), "status": "failed", "error": "boom"})
    return build_run(tmp_path / "runs", name, root, items, {"luca": char})


def test_check_passes_a_good_run(tmp_path, capsys):
    run_dir = _simple_run(tmp_path, "20261130T000000Z-ok", ["circle", "circle"], threshold=0.65)
    assert _check(run_dir) == 0
    assert "check passed" in capsys.readouterr().out


def test_check_fails_below_the_gate(tmp_path, capsys):
    # 1 of 2 images on-model: pass rate 0.5 < 0.8 default gate.
    run_dir = _simple_run(tmp_path, "20261130T000000Z-bad", ["circle", "stripes"], threshold=0.99)
    assert _check(run_dir) == 1
    err = capsys.readouterr().err
    assert "character luca: pass rate 0.50" in err and "below the gate 0.80" in err


def test_check_respects_a_spec_min_pass_rate(tmp_path):
    run_dir = _simple_run(tmp_path, "20261130T000000Z-half", ["circle", "stripes"], threshold=0.99,
                          min_pass_rate=0.5)
    assert _check(run_dir) == 0


def test_check_fails_on_a_failed_job(tmp_path, capsys):
    run_dir = _simple_run(tmp_path, "20261130T000000Z-f", ["circle"], threshold=0.65, failed=True)
    assert _check(run_dir) == 1
    assert "failed: boom" in capsys.readouterr().err


def test_check_and_report_on_a_missing_run_exit_2(tmp_path, capsys):
    assert _check(tmp_path / "nope") == 2
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_report_command_writes_the_pages(tmp_path):
    run_dir = _simple_run(tmp_path, "20261130T000000Z-r", ["circle"], threshold=0.65)
    assert cli_main(["report", str(run_dir)]) == 0
    for page in PAGES:
        assert (run_dir / f"{page}.html").is_file()
    assert json.loads((run_dir / "results.json").read_text())["gate"]["passed"] is True


def test_commands_register_with_argparse():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    report_cmd.register(sub)
    check_cmd.register(sub)
    args = p.parse_args(["check", "runs/x"])
    assert args.func is check_cmd.run and args.run_dir == Path("runs/x")
    assert p.parse_args(["report", "runs/x"]).func is report_cmd.run
