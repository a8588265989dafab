"""Failure hooks for castbook's own tests, and nothing else: each is off unless its variable is set.

They live here, in one place, so a reader of the actor or the pipeline sees one call and knows
it is not product behaviour. The runner passes every `CASTBOOK_*` variable to Ray workers
(`renderer.ray_cluster.worker_env`), so the hooks reach actors on any node.

- `CASTBOOK_TEST_CRASH_KEY` + `CASTBOOK_TEST_CRASH_MARKER`: the actor process exits abruptly
  (`os._exit`) on the first job whose key starts with CRASH_KEY; the MARKER file is created
  just before, so the restarted actor renders that job normally (tests/test_runner.py).
- `CASTBOOK_TEST_JOB_DELAY_S`: seconds to sleep before each job, so a test can kill a run
  part-way, reliably.
- `CASTBOOK_INJECT_OOM`: how many renders raise a simulated CUDA out-of-memory error, so the
  pipeline's fallback path runs on a CPU.
"""

from __future__ import annotations

import os
import time

CRASH_KEY_ENV = "CASTBOOK_TEST_CRASH_KEY"
CRASH_MARKER_ENV = "CASTBOOK_TEST_CRASH_MARKER"
DELAY_ENV = "CASTBOOK_TEST_JOB_DELAY_S"
INJECT_OOM_ENV = "CASTBOOK_INJECT_OOM"


def before_job(key: str) -> None:
    """Called by the actor before each job: crash once on the chosen key, or sleep."""
    _maybe_crash(key)
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def injected_ooms() -> int:
    """How many simulated CUDA OOMs the pipeline should raise (0 when the hook is off)."""
    return int(os.environ.get(INJECT_OOM_ENV, "0"))


def _maybe_crash(key: str) -> None:
    prefix = os.environ.get(CRASH_KEY_ENV)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if not prefix or not marker or not key.startswith(prefix):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)
