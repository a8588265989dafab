"""Errors a user can cause end as one message and exit 2 (input) or 1 (a job or gate failed),
never a traceback. Real processes for the named cases (the exit code and stderr a shell sees),
in-process calls for the rest.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from castbook.cli import main

REPO = Path(__file__).resolve().parents[1]
CASTBOOK = [sys.executable, "-m", "castbook.cli"]
TINY = REPO / "specs" / "examples" / "tiny.yaml"
NOBODY = 65534


@functools.lru_cache(maxsize=1)
def _unprivileged_prefix() -> list[str]:
    """How root runs a command without its power to ignore permission bits.

    First choice: a new user namespace (`unshare --user`, util-linux). The process keeps root's
    own files readable through their owner bits, so a checkout inside a private 0700 folder (a
    fresh clone under `mktemp -d`) still imports, while a read-only folder stays read-only.
    Fallback: user nobody (`setpriv`), which needs the checkout to be readable by everyone.
    """
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, timeout=30)
    if probe.returncode == 0:
        return ["unshare", "--user"]
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def castbook(*args: str, env: dict | None = None, unprivileged: bool = False, timeout: float = 120):
    """Run the real CLI. `unprivileged`: as user nobody when the tests run as root, so that
    permission bits mean something (root writes anywhere)."""
    prefix = _unprivileged_prefix() if unprivileged and os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *CASTBOOK, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def shared_tmp():
    """A temporary folder that user nobody can enter too (pytest's own is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="castbook-cli-"))
    folder.chmod(0o755)
    yield folder
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(folder)


def read_only_folder(parent: Path, name: str) -> Path:
    folder = parent / name
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# --- the named cases, as a shell sees them ----------------------------------------------------


def test_deeply_nested_yaml_is_a_located_error(tmp_path):
    spec = tmp_path / "deep.yaml"
    spec.write_text("jobs: " + "[" * 5000 + "]" * 5000 + "\n")
    for command in ("validate", "plan"):
        result = castbook(command, str(spec))
        assert result.returncode == 2, result.stderr
        assert "deep.yaml:1:" in result.stderr
        assert "nested more than 100 levels deep" in result.stderr
        assert result.stderr.strip().endswith("1 error")


def test_render_out_is_an_existing_file(tmp_path):
    out = tmp_path / "runs"
    out.write_text("not a folder")
    result = castbook("render", str(TINY), "--out", str(out), "--executor", "local")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"castbook render: --out {out} is a file, not a folder; give --out a folder "
                                     "you can write to (it is created if missing), e.g. --out runs")
    assert out.read_text() == "not a folder"


def test_render_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = castbook("render", str(TINY), "--out", str(tmp_path / "file" / "runs"), "--executor", "local")
    assert result.returncode == 2
    assert f"cannot be created: {tmp_path / 'file'} is a file, not a folder" in result.stderr


def test_render_out_not_writable(shared_tmp):
    out = read_only_folder(shared_tmp, "locked") / "runs"
    result = castbook("render", str(TINY), "--out", str(out), "--executor", "local", unprivileged=True)
    assert result.returncode == 2, result.stderr
    assert f"castbook render: --out {out} is not writable (Permission denied" in result.stderr
    assert not out.exists()


def test_read_only_cache_home(shared_tmp):
    home = read_only_folder(shared_tmp, "cache")
    out = shared_tmp / "runs"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # writable by nobody: only the cache is at fault
    result = castbook("render", str(TINY), "--out", str(out), "--executor", "local",
                      env={"CASTBOOK_HOME": str(home)}, unprivileged=True)
    assert result.returncode == 2, result.stderr
    assert f"castbook render: the model cache {home / 'builtins'} is not writable (Permission denied" in result.stderr
    assert f"set CASTBOOK_HOME (now {home}) to a writable folder" in result.stderr
    assert "builtin:tiny-sdxl" in result.stderr


def test_cache_home_is_a_file(tmp_path):
    home = tmp_path / "home"
    home.write_text("x")
    result = castbook("render", str(TINY), "--out", str(tmp_path / "runs"), "--executor", "local",
                      env={"CASTBOOK_HOME": str(home)})
    assert result.returncode == 2
    assert f"the model cache {home / 'builtins'} cannot be created: {home} is a file" in result.stderr


def test_missing_spec_file(tmp_path):
    for command in ("validate", "plan", "render"):
        result = castbook(command, str(tmp_path / "nope.yaml"))
        assert result.returncode == 2
        assert result.stderr.splitlines() == ["nope.yaml:1:1: file not found", "1 error"]


def test_unreadable_run_json(shared_tmp):
    run = shared_tmp / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "run.json").chmod(0)
    result = castbook("check", str(run), unprivileged=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"castbook check: run dir {run}: Permission denied (run.json); ")


# --- in-process: the same rules, faster ------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_castbook_errors_print_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, "check", str(tmp_path))
    assert code == 2
    assert err == f"castbook check: {tmp_path}: no run.json here; pass a run directory such as runs/20261130T031500Z-luca\n"


def test_root_that_is_not_a_folder(capsys, tmp_path):
    code, _, err = run_main(capsys, "plan", str(TINY), "--root", str(tmp_path / "nope"))
    assert code == 2
    assert err.startswith(f"castbook plan: --root {tmp_path / 'nope'} is not a folder")


def test_root_defaults_to_the_specs_project_from_any_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not inside the project: the root comes from the spec's location
    for command in ("validate", "plan"):
        code, out, err = run_main(capsys, command, str(TINY))
        assert code == 0, err


def test_validate_reports_each_file_and_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [\n")
    code, out, err = run_main(capsys, "validate", str(TINY), str(bad))
    assert code == 2
    assert f"ok  {TINY} (render spec)" in out
    assert "bad.yaml:2:1: invalid YAML" in err


def test_overrides_on_a_training_spec_are_refused(capsys):
    spec = next((REPO / "specs" / "training").glob("*.yaml"))
    code, _, err = run_main(capsys, "validate", str(spec), "-s", "steps=3")
    assert code == 2
    assert "-s overrides apply to render specs" in err


def test_render_checks_out_before_rendering(capsys, tmp_path):
    out = tmp_path / "out"
    out.write_text("")
    code, _, err = run_main(capsys, "render", str(TINY), "--out", str(out), "--executor", "local")
    assert code == 2
    assert "is a file, not a folder" in err


def test_os_errors_on_named_paths_of_any_command(capsys, tmp_path):
    """Commands without their own check still end in one message: `main` maps an OSError on a
    path the user named (inside it, beside it or a missing folder above it) to exit 2."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_main(capsys, "toyworld", "generate", "--out", str(afile), "--count", "1")
    assert code == 2
    assert err.startswith(f"castbook toyworld: out {afile}: File exists")


def test_os_errors_below_a_read_only_folder(shared_tmp):
    out = read_only_folder(shared_tmp, "locked") / "a" / "b"
    result = castbook("toyworld", "generate", "--out", str(out), "--count", "1", unprivileged=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"castbook toyworld: out {out}: Permission denied ({out.parent})")
