"""The layout keeps what DESIGN.md promises: docstrings and comments cite files that exist, no
module grows past the size limit without a reason at its top, and the import layers hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "schemas", "renderer", "reports", "trainer", "toyworld", "castbook", "benchmarks", "scripts")
# A repo file named in prose: a folder part and a known extension, e.g. `toyworld/checker.py`.
CITED = re.compile(r"(?<![\w./~$-])((?:[\w-]+/)+[\w.-]+\.(?:py|md|yaml|yml|json|j2|sh|toml))\b")
# Paths that are examples of user files or run outputs, not files of this repository.
NOT_REPO = ("runs/", "data/", "path/", "assets/", "out/", "OUT/", "/tmp/", "tmp/", "../shared/", "shared/",
            "src/diffusers/", "recipes/", "tests/pipelines/", "doc/source/", "python/ray/", "~/")
MAX_LINES = 450


def _python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_cited_files_exist():
    missing = []
    for path in _python_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for cited in CITED.findall(line):
                if cited.startswith(NOT_REPO) or "<" in cited or "*" in cited:
                    continue
                if not (REPO / cited).exists() and not (path.parent / cited).exists():
                    missing.append(f"{path.relative_to(REPO)}:{n}: {cited}")
    assert missing == [], "docstrings/comments cite files that are not in the repo:\n" + "\n".join(missing)


def test_no_module_over_the_size_limit_without_a_reason():
    """A module over ~450 lines does several jobs; a long one must say why at its top."""
    too_long = []
    for path in _python_files():
        lines = path.read_text(encoding="utf-8").splitlines()
        head = "\n".join(lines[:30])
        if len(lines) > MAX_LINES and "Why this module is long:" not in head:
            too_long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    assert too_long == [], "\n".join(too_long)


def test_import_layers_hold():
    """The import-linter contracts of pyproject.toml (also run by `make lint`)."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
