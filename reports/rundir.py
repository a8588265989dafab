"""Read a run directory (docs/INTERFACES.md) into plain data.

Nothing here imports torch: the benchmark and diff pages of older runs are built
from their ledgers alone. Ledger lines are read as `schemas.records.ManifestRecord`,
the model the runner writes; JSONL follows core.jsonl's one torn-line rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from core.errors import CastbookError
from core.jsonl import read_jsonl
from schemas.records import ManifestRecord


class RunDirError(CastbookError):
    """A run directory that cannot be read; the message names the file and what to do."""


@dataclass
class Entry:
    """One planned job joined with its ledger line (None when it never finished)."""

    job: dict  # RenderJob JSON from plan.jsonl
    record: ManifestRecord | None

    @property
    def ledger(self) -> dict | None:
        """The ledger line as JSON data (what the report builders index)."""
        return self.record.to_json() if self.record else None

    @property
    def key(self) -> str:
        return self.job["key"]

    @property
    def name(self) -> str:
        return self.job["name"]

    @property
    def status(self) -> str:
        return self.record.status if self.record else "missing"

    @property
    def image(self) -> str | None:
        return self.record.image if self.record else None


@dataclass
class Run:
    path: Path
    info: dict  # run.json
    entries: list[Entry] = field(default_factory=list)
    extra_ledger: list[ManifestRecord] = field(default_factory=list)  # ledger lines with no planned job

    @property
    def run_id(self) -> str:
        return self.info.get("run_id") or self.path.name

    @property
    def root(self) -> Path:
        return Path(self.info.get("root") or self.path.parent)

    def image_path(self, entry: Entry) -> Path | None:
        return None if entry.image is None else self.path / entry.image


def _read_ledger(path: Path) -> list[ManifestRecord]:
    records = []
    for n, line in enumerate(read_jsonl(path), 1):
        try:
            records.append(ManifestRecord.model_validate(line))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "line"
            raise RunDirError(f"{path}: record {n} ({line.get('name', '?')}): {where}: {first['msg']}; "
                              "the ledger was not written by this castbook version or is damaged") from None
    return records


def load_run(run_dir: Path) -> Run:
    """Load run.json, plan.jsonl and manifest.jsonl. The last ledger line per key wins."""
    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise RunDirError(f"{run_dir}: no run.json here; pass a run directory such as runs/20261130T031500Z-luca")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{info_path}:{e.lineno}: not valid JSON ({e.msg})") from e
    plan = read_jsonl(run_dir / "plan.jsonl")
    ledger: dict[str, ManifestRecord] = {}
    for record in _read_ledger(run_dir / "manifest.jsonl"):
        ledger[record.key] = record
    # Two planned jobs may share a key (same pixels); they share its ledger line.
    entries = [Entry(job, ledger.get(job["key"])) for job in plan]
    planned = {job["key"] for job in plan}
    extra = [line for k, line in ledger.items() if k not in planned]
    return Run(path=run_dir, info=info, entries=entries, extra_ledger=extra)


def previous_runs(run: Run, same_spec: bool = True) -> list[Path]:
    """Earlier runs in the same output root, oldest first.

    Run ids start with a UTC timestamp, so name order is time order. With
    `same_spec`, only runs of the same spec files count (their jobs are comparable).
    """
    out: list[Path] = []
    for d in sorted(run.path.parent.iterdir()):
        if d == run.path or not d.is_dir() or d.name.startswith(".") or d.name >= run.path.name:
            continue
        info_path = d / "run.json"
        if not info_path.is_file():
            continue
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if same_spec and info.get("spec_files") != run.info.get("spec_files"):
            continue
        out.append(d)
    return out
