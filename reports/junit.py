"""A night's gate as JUnit XML (`castbook check RUN --junit FILE`), so Jenkins, GitLab and GitHub
show it natively: one test case per character gate and one per failed or unfinished job.

Built with junitparser (the library CI tools' own parsers agree with), from the same `results`
that `castbook check` prints, so the XML and the terminal never disagree.
"""

from __future__ import annotations

import io
from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from core.files import atomic_write_bytes


def _character_case(name: str, c: dict) -> TestCase:
    case = TestCase(name=name, classname="castbook.characters")
    rate = "n/a" if c["pass_rate"] is None else f"{c['pass_rate']:.2f}"
    summary = (f"pass rate {rate} ({c['passed']}/{c['selected']} selected images with CLIP-I >= "
               f"{c['threshold']:.2f}); gate {c['min_pass_rate']:.2f}")
    if c["error"] and c["jobs"]:
        case.result = [Error(f"character {name}: {c['error']}", "unscored")]
    elif c["pass_rate"] is None:
        case.result = [Skipped(f"character {name}: no gated image was scored")]
    elif c["pass_rate"] < c["min_pass_rate"]:
        case.result = [Failure(f"character {name}: {summary}", "below_gate")]
    case.system_out = summary
    return case


def _job_case(job: dict) -> TestCase:
    case = TestCase(name=job["name"], classname="castbook.jobs")
    if job["status"] == "failed":
        case.result = [Failure(job["error"] or "the job failed without a message", "failed")]
    elif job["status"] == "missing":
        case.result = [Error("the job never finished (no ledger line); re-run the render to resume", "unfinished")]
    else:
        case.result = [Failure(job["error"] or "the job's image could not be scored", "unscored")]
    return case


def junit_xml(results: dict) -> bytes:
    """The JUnit XML document of one run's results (see reports/RESULTS_SCHEMA.md)."""
    run = results.get("run") or {}
    suite = TestSuite(f"castbook gate {run.get('run_id', '')}".strip())
    for key in ("run_id", "spec_digest", "git_commit"):
        if run.get(key):
            suite.add_property(key, str(run[key]))
    for name, character in sorted(results["characters"].items()):
        suite.add_testcase(_character_case(name, character))
    for job in results.get("failed_jobs", []):
        suite.add_testcase(_job_case(job))
    suite.update_statistics()
    xml = JUnitXml("castbook")
    xml.add_testsuite(suite)
    buffer = io.BytesIO()
    xml.write(buffer, pretty=True)
    return buffer.getvalue()


def write_junit(results: dict, path: Path) -> Path:
    atomic_write_bytes(Path(path), junit_xml(results))
    return Path(path)
