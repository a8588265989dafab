"""Atomic file writes for reports: thin names over `renderer.outputs`, the one place
that implements temp file + fsync + os.replace (+ fsync of the folder).

A reader (a browser, a second `castbook report`) never sees a half-written file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

from renderer.outputs import atomic_write_bytes


def write_bytes(path: Path, data: bytes) -> Path:
    atomic_write_bytes(Path(path), data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return write_text(path, text + "\n")


def write_with(path: Path, writer: Callable[[Any], Any]) -> Path:
    """Call `writer(binary_file)` on an in-memory buffer, then write it atomically."""
    buffer = io.BytesIO()
    writer(buffer)
    return write_bytes(path, buffer.getvalue())
