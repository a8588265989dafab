"""`castbook render --quiet`: a successful cron run prints nothing; library warnings go to the
run's castbook.log, and the capture leaves the process's logging as it found it."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from renderer.library_logs import capture_library_output

REPO = Path(__file__).resolve().parents[1]


def test_capture_collects_library_records_and_warnings_then_restores():
    diffusers_logger = logging.getLogger("diffusers")
    before = (list(diffusers_logger.handlers), diffusers_logger.propagate)
    show_before = warnings.showwarning
    lines: list[str] = []
    with capture_library_output(lines):
        logging.getLogger("peft.tuners").warning("Already found a peft_config")
        warnings.warn("a deprecation", FutureWarning, stacklevel=1)
        logging.getLogger("diffusers.loaders").info("below WARNING: dropped")
    assert any("peft.tuners WARNING: Already found a peft_config" in line for line in lines)
    assert any("FutureWarning: a deprecation" in line for line in lines)
    assert not any("dropped" in line for line in lines)
    assert (list(diffusers_logger.handlers), diffusers_logger.propagate) == before
    assert warnings.showwarning is show_before  # Python warnings print as before, outside the block


def test_quiet_render_prints_nothing_and_keeps_the_warnings_in_the_run_log(tmp_path):
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "castbook", "render", str(REPO / "specs/examples/tiny.yaml"),
                           "--only", "baseline/luca/beach/*", "--out", str(out), "--executor", "local", "--quiet",
                           "--no-report"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    (run,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    log = (run / "castbook.log").read_text()
    assert "== baseline/luca/beach/draft/seed-1 (actor 0)" in log
    assert "WARNING" in log  # diffusers' and timm's deprecations, which used to reach the terminal
