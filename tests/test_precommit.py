"""The `castbook-validate` pre-commit hook, run by the real pre-commit package on a temporary git
repository (a local hook configuration: no network, no hook environment to build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pre_commit.clientlib import load_manifest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
GOOD = """\
defaults: {base_model: "builtin:tiny-sdxl", preset: tiny}
presets: {tiny: {extends: draft, width: 64, height: 64, num_inference_steps: 2}}
characters: {hero: {description: a hero}}
scenes: {park: {prompt: "{{ character }} in a park"}}
jobs: {main: {characters: [hero], scenes: [park], seeds: [1]}}
"""


def _git(repo: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def repo(tmp_path: Path):
    repo = tmp_path / "art"
    (repo / "specs").mkdir(parents=True)
    env = dict(os.environ, PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    assert _git(repo, "init", "-q", env=env).returncode == 0
    # The hook exactly as published, made local: `language: system` uses the castbook on PATH
    # instead of building a hook environment (which would install castbook from the network).
    (hook,) = load_manifest(str(REPO / ".pre-commit-hooks.yaml"))
    local = {k: hook[k] for k in ("id", "name", "entry", "types", "files", "require_serial")} | {"language": "system"}
    with open(repo / ".pre-commit-config.yaml", "w") as fh:
        YAML(typ="safe").dump({"repos": [{"repo": "local", "hooks": [local]}]}, fh)
    (repo / "specs" / "hero.yaml").write_text(GOOD)
    (repo / "notes.yaml").write_text("not: [a, spec\n")  # outside specs/: the hook ignores it
    assert _git(repo, "add", "-A", env=env).returncode == 0
    return repo, env


def _pre_commit(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pre_commit", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_hook_passes_a_valid_spec_and_blocks_a_broken_one(repo):
    repo, env = repo
    assert _pre_commit(repo, env, "install").returncode == 0
    first = _git(repo, "commit", "-q", "-m", "hero", env=env)
    assert first.returncode == 0, first.stdout + first.stderr

    (repo / "specs" / "hero.yaml").write_text(GOOD.replace("seeds: [1]", "seeds: [1], guidance: 5"))
    _git(repo, "add", "specs/hero.yaml", env=env)
    blocked = _git(repo, "commit", "-q", "-m", "typo", env=env)
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode != 0
    assert "specs/hero.yaml:5:" in out and "guidance_scale" in out, out  # located, with the hint
    assert "Traceback" not in out
    log = _git(repo, "log", "--oneline", env=env).stdout.strip().splitlines()
    assert len(log) == 1  # the broken spec did not land


def test_published_hook_manifest_is_valid_for_pre_commit():
    (hook,) = load_manifest(str(REPO / ".pre-commit-hooks.yaml"))
    assert hook["id"] == "castbook-validate" and hook["entry"].startswith("castbook validate")
    assert hook["pass_filenames"] is True  # only the changed files are validated
