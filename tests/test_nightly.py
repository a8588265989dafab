"""The nightly loop's last mile: runs/index.html and the JUnit XML of a night's gate."""

from __future__ import annotations

import pytest
from junitparser import Error, Failure, JUnitXml
from test_reports import parse

from reports import write_reports
from reports.junit import write_junit
from reports.runs_index import runs_index_data
from tests.reports_fixtures import (  # noqa: F401 - fixture
    XSS_SCRIPT,
    build_run,
    castbook_home,
    standard_characters,
    standard_items,
)

pytestmark = pytest.mark.usefixtures("castbook_home")


@pytest.fixture(scope="module")
def nights(tmp_path_factory, castbook_home):
    base = tmp_path_factory.mktemp("nightly")
    root, out = base / "proj", base / "runs"
    chars = standard_characters(root)
    written = []
    for rid, slow in [("20261201T020000Z-t", 0.4), ("20261202T020000Z-t", 0.5)]:
        written.append(write_reports(build_run(out, rid, root, standard_items(slow), chars)))
    # A run that was killed before its report: listed, not scored.
    build_run(out, "20261203T020000Z-t", root, standard_items(0.5)[:2], chars, status="running")
    (out / ".cache").mkdir(exist_ok=True)
    (out / "stray-folder").mkdir()
    return out, written


def test_index_lists_every_run_newest_first_with_gate_and_trends(nights):
    out, written = nights
    assert written[-1]["index"] == out / "index.html"
    data = runs_index_data(out)
    assert [r["folder"] for r in data["runs"]] == ["20261203T020000Z-t", "20261202T020000Z-t", "20261201T020000Z-t"]
    unscored, newest_scored = data["runs"][0], data["runs"][1]
    assert unscored["gate"] is None and unscored["report"] is None
    assert newest_scored["gate"] is False  # the fixture has a failed job
    assert newest_scored["report"] == "20261202T020000Z-t/report.html"
    assert set(newest_scored["characters"]) == {"luca", "mia"}
    assert [t["character"] for t in data["trends"]] == ["luca", "mia"]
    assert all(len(t["points"]) == 2 for t in data["trends"])

    html = (out / "index.html").read_text(encoding="utf-8")
    assert XSS_SCRIPT not in html and "&lt;script&gt;" in html  # gate failures quote spec strings
    tree = parse(out / "index.html")
    links = [a.attrs.get("href") for a in tree.find_all("a")]
    assert "20261202T020000Z-t/report.html" in links
    for href in links:
        if href and not href.startswith(("http", "#")):
            assert (out / href).is_file(), href


def test_junit_has_one_case_per_character_gate_and_failed_job(nights, tmp_path):
    out, written = nights
    import json

    results = json.loads(written[-1]["results"].read_text())
    xml_path = write_junit(results, tmp_path / "gate.xml")
    suites = list(JUnitXml.fromfile(str(xml_path)))
    assert len(suites) == 1
    cases = {(c.classname, c.name): c for c in suites[0]}
    characters = {name for cls, name in cases if cls == "castbook.characters"}
    assert characters == set(results["characters"])
    failed_jobs = {name for cls, name in cases if cls == "castbook.jobs"}
    assert failed_jobs == {j["name"] for j in results["failed_jobs"]} and failed_jobs
    for (cls, name), case in cases.items():
        kinds = {type(r) for r in case.result}
        if cls == "castbook.jobs":
            assert kinds & {Failure, Error}
        else:
            c = results["characters"][name]
            assert bool(kinds & {Failure, Error}) == (not c["gate_passed"] or bool(c["error"]))
    assert suites[0].failures + suites[0].errors >= len(failed_jobs)


def test_check_junit_from_the_command_line(nights, tmp_path, capsys):
    from castbook.cli import main

    out, written = nights
    run_dir = written[-1]["report"].parent
    xml_path = tmp_path / "ci" / "castbook.xml"
    assert main(["check", str(run_dir), "--junit", str(xml_path)]) == 1  # the fixture has a failed job
    suite = next(iter(JUnitXml.fromfile(str(xml_path))))
    assert suite.tests >= 3 and suite.failures >= 1
    assert "check FAILED" in capsys.readouterr().err
