"""Checks on folders a user names for castbook to write into (an output root, the cache home).

Each check runs before any expensive work and turns the operating system's refusal into an
`InputError` that names the folder, the reason and what to do instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.errors import InputError


def _first_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (as anything: folder, file, link)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def ensure_writable_folder(folder: Path, what: str, fix: str) -> Path:
    """Create `folder` if missing and prove castbook can write into it; return it (absolute).

    `what` names the folder for the user (e.g. "--out"); `fix` says what to do instead.
    A probe file is created and removed, because permission bits do not tell the whole story
    (root, read-only mounts, immutable folders).
    """
    folder = Path(folder).absolute()
    existing = _first_existing(folder)
    if existing == folder and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder; {fix}")
    if not existing.is_dir():
        raise InputError(f"{what} {folder} cannot be created: {existing} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".castbook-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if exc.filename and Path(exc.filename) != folder else ""
        raise InputError(f"{what} {folder} is not writable ({reason}{where}); {fix}") from None
    return folder
