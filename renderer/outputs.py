"""Durable outputs: the run directory, run.json, plan.jsonl, the lock and the image cache.

This module must not import torch, diffusers or ray: a fully cached run uses only it.

Run-directory format: docs/INTERFACES.md. The ledger (`manifest.jsonl`, one
`schemas.records.ManifestRecord` per line, written by `renderer.writer`) is the run's truth;
the content-addressed cache (`.cache/images/<key>.png`) is what makes a re-run (or the re-run
of a killed run) render only what is missing. PNG metadata is `renderer.png_metadata`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.errors import CastbookError
from core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir
from schemas.job import RenderJob

CACHE_DIR = ".cache"
LOCK_NAME = ".lock"


def castbook_version() -> str:
    try:
        return importlib.metadata.version("castbook")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def package_version(name: str) -> str | None:
    """A package's installed version, read from metadata (never imports it: no torch here)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

# ---------------------------------------------------------------------------
# plan.jsonl (the ledger's JSONL rule is core.jsonl)
# ---------------------------------------------------------------------------


def write_plan_jsonl(path: Path, jobs: Iterable[RenderJob]) -> None:
    atomic_write_text(path, "".join(j.model_dump_json() + "\n" for j in jobs))


# ---------------------------------------------------------------------------
# Lock on the output root
# ---------------------------------------------------------------------------


class RunLocked(CastbookError):
    """Another castbook render holds the output root."""

    def __init__(self, root: Path, pid: str | None):
        self.root, self.pid = root, pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            f"output directory {root} is in use by {holder} (another `castbook render`); "
            f"wait for it to finish, or use a different --out"
        )


class RootLock:
    """fcntl.flock on DIR/.lock, non-blocking. Released on close or when the process dies."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.fd: int | None = None

    def acquire(self) -> RootLock:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 64, 0).decode("utf-8", "replace").strip() or None
            os.close(fd)
            raise RunLocked(self.root, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RootLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------
# Content-addressed image cache
# ---------------------------------------------------------------------------


class ImageCache:
    """`DIR/.cache/images/<key>.png`, plus `<key>.json` with the job's control-map names.

    The sidecar is written before the PNG, so a PNG present means a complete entry.
    """

    def __init__(self, root: Path):
        self.dir = Path(root) / CACHE_DIR / "images"
        self.control_dir = Path(root) / CACHE_DIR / "control"

    def png(self, key: str) -> Path:
        return self.dir / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.png(key).is_file()

    def put(self, key: str, png: bytes, control_maps: list[str]) -> Path:
        atomic_write_json(self.dir / f"{key}.json", {"control_maps": control_maps})
        atomic_write_bytes(self.png(key), png)
        return self.png(key)

    def control_maps(self, key: str) -> list[str]:
        try:
            return json.loads((self.dir / f"{key}.json").read_text())["control_maps"]
        except (OSError, ValueError, KeyError):
            return []

    def put_control(self, name: str, png: bytes) -> Path:
        path = self.control_dir / safe_name(name)
        if not path.exists():
            atomic_write_bytes(path, png)
        return path


def safe_name(name: str) -> str:
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"control map name {name!r} must be a plain file name")
    return name


def image_relpath(job: RenderJob) -> str:
    """Where a job's image goes inside the run directory: images/<job name>.png."""
    parts = job.name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"job name {job.name!r} is not a safe relative path (empty, '.' or '..' part)")
    return f"images/{job.name}.png"


# ---------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------


def new_run_info(
    run_dir: Path,
    *,
    kind: str,
    root: Path,
    spec_files: list[str],
    total: int,
    executor: str,
    actors: int,
    characters: dict | None = None,
    scoring: dict | None = None,
    **extra: Any,
) -> dict:
    """The one builder of `run.json` (docs/INTERFACES.md), for `castbook render` and `castbook bench`.

    `kind` is "render" or "bench"; `extra` holds the caller's own fields (e.g. `only`, `force`).
    The run starts as "running"; `finish_run_info` closes it. Write it with `atomic_write_json`.
    """
    return {
        "run_id": run_dir.name,
        "kind": kind,
        "castbook_version": castbook_version(),
        "root": str(root),
        "spec_files": list(spec_files),
        "spec_digest": spec_digest(root, spec_files),
        "git_commit": git_commit(root),
        "started": utc_now(),
        "finished": None,
        "status": "running",
        "counts": {"total": total, "rendered": 0, "cached": 0, "failed": 0},
        "environment": base_environment(),
        "executor": executor,
        "actors": actors,
        "startup": {"ray_init_s": None, "actor_start_s": None, "model_load_s": None},
        "characters": dict(characters or {}),
        "scoring": scoring,
        **extra,
    }


def finish_run_info(run: dict, *, status: str, counts: dict[str, int]) -> dict:
    """Close a `new_run_info` dict: finish time, status ("finished" or "interrupted") and counts."""
    run["finished"] = utc_now()
    run["status"] = status
    run["counts"] = {"total": run["counts"]["total"], **counts}
    return run


def new_run_dir(out_dir: Path, stem: str) -> Path:
    """Create `<out>/<UTC timestamp>-<stem>/`, adding -2, -3... if that second is taken."""
    ts = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "run"
    base = f"{ts}-{stem}"
    for i in range(1, 1000):
        run_dir = Path(out_dir) / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir(parents=True)
            fsync_dir(run_dir.parent)
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {out_dir}")


def spec_digest(root: Path, spec_files: Iterable[Path | str]) -> str | None:
    h = hashlib.sha256()
    any_file = False
    for rel in sorted(str(p) for p in spec_files):
        p = Path(root) / rel
        if p.is_file():
            any_file = True
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest() if any_file else None


def git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def base_environment() -> dict:
    """Environment facts known without importing torch (device/dtype come from the actor)."""
    return {
        "python": platform.python_version(),
        "castbook": castbook_version(),
        "torch": package_version("torch"),
        "diffusers": package_version("diffusers"),
        "ray": package_version("ray"),
        "device": None,
        "dtype": None,
        "gpu": None,
        "hostname": socket.gethostname(),
    }
