"""Scale-out: a two-node Ray cluster on one machine, `castbook render --ray-address ... --actors 2`.

Each node is a separate `ray start` with one `render_slot`, so the two actors land on
different nodes. Only our own processes are stopped in teardown (by process group, never
`ray stop`, which would kill every Ray on a shared machine). Token auth is on: Ray rewrites
127.0.0.1 to the host's address, so the cluster is not strictly loopback-only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_runner import SPEC

from core.jsonl import read_jsonl
from schemas.records import ManifestRecord

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture
def two_node_cluster():
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="cbray", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    common = ["--resources", '{"render_slot": 1}', "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
              "--temp-dir", temp, "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    starts = [
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
        [str(BIN / "ray"), "start", f"--address=127.0.0.1:{port}", *common],
    ]
    pgids = []
    try:
        for cmd in starts:
            # A new session per node: its daemons share our chosen process group, which teardown kills.
            p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            pgids.append(p.pid)
            out, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed:\n{out[-3000:]}")
        yield f"127.0.0.1:{port}", env
    finally:
        for pgid in reversed(pgids):
            _stop(pgid)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_actors_on_two_nodes_render_the_same_bytes_as_one(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("count: 3", "count: 2"))  # 4 jobs: 2 per actor
    base = [str(BIN / "castbook"), "render", str(spec), "--root", str(tmp_path), "--quiet", "--no-report"]

    r = subprocess.run([*base, "--out", str(tmp_path / "cluster"), "--ray-address", address, "--actors", "2"],
                       env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    (cluster_run,) = (tmp_path / "cluster").glob("2*")
    recs = [ManifestRecord.model_validate(line) for line in read_jsonl(cluster_run / "manifest.jsonl")]
    assert len(recs) == 4 and all(x.status == "rendered" for x in recs)
    assert {x.actor for x in recs} == {0, 1}  # both actors rendered
    run = json.loads((cluster_run / "run.json").read_text())
    assert len({a["node_id"] for a in run["actors_info"]}) == 2  # one actor per node (render_slot)

    # The single-actor reference, in-process (no Ray): same jobs, same bytes expected.
    from renderer.runner import run_render
    from schemas.plan import load_plan

    one = run_render(load_plan([spec], root=tmp_path), out_dir=tmp_path / "single", executor="local", quiet=True)
    assert one.exit_code == 0
    single_run = one.run_dir
    for rec in recs:
        assert (cluster_run / rec.image).read_bytes() == (single_run / rec.image).read_bytes(), rec.name
