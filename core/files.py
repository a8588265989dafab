"""Atomic writes: temp file in the same folder + fsync + `os.replace` + fsync of the folder.

A reader (a browser, a second `castbook report`, a resumed run) sees the old file or the whole new
one, never a part. The one implementation, used by every package.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file of a folder (recursively), then the folders themselves."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted({folder, *(p for p in folder.rglob("*") if p.is_dir())}, key=lambda d: -len(d.parts)):
        fsync_dir(d)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are read by people and web servers
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any, *, sort_keys: bool = False) -> None:
    """Indented, strict JSON (no NaN: browsers and `jq` reject it), UTF-8, newline-terminated."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False) + "\n")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (replacing `dst`), falling back to an atomic copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        if tmp.exists():
            tmp.unlink()
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        atomic_write_bytes(dst, Path(src).read_bytes())


def new_temp_folder(beside: Path) -> Path:
    """An empty hidden folder next to `beside` (same file system, so it can be swapped in)."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}."))


def swap_in_folder(tmp: Path, out: Path) -> None:
    """Replace folder `out` with the finished folder `tmp`: a reader sees the old folder or the new
    one, never a half-written one. `tmp` must be on the same file system (see `new_temp_folder`).

    Files are made world-readable (mkdtemp/mkstemp make 0700/0600; these folders are shared) and
    fsync'd before the swap.
    """
    tmp, out = Path(tmp), Path(out)
    for p in [tmp, *tmp.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    fsync_tree(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def publish_folder(tmp: Path, final: Path) -> bool:
    """Move the finished folder `tmp` to `final` unless another writer got there first.

    For build-once caches (built-in models, the tiny scorer): every process may build its own
    copy in a `new_temp_folder(final)`; the first to finish publishes it, the others' copies are
    deleted and they use the published one. Returns True when `tmp` became `final`. Files are made
    world-readable and fsync'd before the rename, as in `swap_in_folder`.
    """
    tmp, final = Path(tmp), Path(final)
    try:
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails when another writer published a non-empty folder
        except OSError:
            if not final.exists():
                raise
            return False
        fsync_dir(final.parent)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
