"""JSON Lines ledgers (`manifest.jsonl`, `bench.jsonl`, training logs): one fsync'd line per record.

One rule for a torn last line, in both directions: a writer killed mid-line leaves a line that is
not valid JSON; readers skip it (the record it described is not finished) and the next append
starts on a fresh line, so its own record stays whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it: durable before the caller goes on."""
    line = json.dumps(record, sort_keys=False, separators=(",", ":"), ensure_ascii=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as r:
                r.seek(size - 1)
                if r.read(1) != b"\n":
                    line = "\n" + line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every whole JSON object line of `path` ([] when it does not exist); torn lines are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn line: the record it described is not finished
        if isinstance(record, dict):
            out.append(record)
    return out
