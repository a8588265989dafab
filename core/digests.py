"""Canonical JSON and content digests: what job keys, caches and pins are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DIGEST_CHUNK = 1 << 20


def canonical_json(data) -> str:
    """The one serialisation that is hashed: sorted keys, no spaces, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(DIGEST_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def folder_digest(path: Path) -> str:
    """Digest of a folder (a diffusers model): every file's relative path and content; hidden files
    and folders (editor and cache litter) are left out."""
    path = Path(path)
    sha = hashlib.sha256()
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    for file in files:
        sha.update(file.relative_to(path).as_posix().encode() + b"\0" + file_digest(file).encode() + b"\n")
    return sha.hexdigest()


def path_digest(path: Path) -> str:
    """`folder_digest` for a folder, `file_digest` for a file."""
    path = Path(path)
    return folder_digest(path) if path.is_dir() else file_digest(path)
