"""Paths written in specs: the project root, joining a value to it without escaping it, and the
names a file system can hold. Checked here, before the operating system sees a value, so that a NUL
byte, a lone surrogate or a 5,000-character name is a located spec error, not a traceback."""

from __future__ import annotations

import glob
import os
from pathlib import Path


def find_project_root(start: Path) -> Path:
    """The nearest ancestor holding `.git` or `pyproject.toml`, else the spec's folder."""
    start = start.resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists() or (candidate / "pyproject.toml").exists():
            return candidate
    return folder


MAX_NAME_BYTES = 255  # one file or folder name (Linux, macOS, Windows alike)
MAX_PATH_BYTES = 4096


def shown_value(value: str, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters, for messages about long values."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value):,} characters)"


def path_problem(value: str) -> str | None:
    """Why `value` cannot name a file on any system, or None. Checked before the OS sees it."""
    if "\x00" in value:
        return f"path {shown_value(value)} contains a NUL character; remove it"
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        return f"path {shown_value(value)} contains a character no file name can hold (a lone UTF-16 surrogate)"
    if len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        return (f"path {shown_value(value)} is too long: file names hold at most {MAX_NAME_BYTES} bytes "
                f"and paths {MAX_PATH_BYTES}")
    return None


def resolve_inside_root(value: str, base_dir: Path, root: Path) -> tuple[Path | None, str | None]:
    """Join `value` to `base_dir`; return (absolute resolved path, None) or (None, error).

    Symlinks are resolved first, so a link inside the root that points outside is refused.
    """
    problem = path_problem(value) or path_problem(str(base_dir / value))
    if problem:
        return None, problem
    candidate = Path(os.path.normpath(base_dir / value))
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:
        return None, f"cannot resolve path {shown_value(value)}: {exc}"
    root = root.resolve()
    if not resolved.is_relative_to(root):
        how = "through a symlink " if candidate.is_relative_to(root) else ""
        return None, f"path {shown_value(value)} points {how}outside the project root {root}; keep specs' files inside it"
    return resolved, None




def is_kind(path: Path, kind: str) -> bool:
    """`path.is_file()` / `is_dir()` that answers False, not OSError, for a path it cannot reach."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False


def glob_matches(pattern_abs: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(pattern_abs, recursive=True) if is_kind(Path(p), "file"))
