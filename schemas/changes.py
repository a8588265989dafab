"""What a plan changes against the last run of the same spec: `castbook plan --changes`.

`plan_changes` is pure: it compares the new jobs with the jobs of a previous run (its `plan.jsonl`),
by output name, and says for each job whether it is new, unchanged (its key is cached, so it will
not render) or re-rendered, and why: the pixel fields that differ (`num_inference_steps 30 → 40`,
`loras.luca digest 1a2b… → 9f8e…`, `prompt`). `find_previous_run` is the edge that reads run
folders. Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import InputError
from core.jsonl import read_jsonl
from schemas.job import RenderJob

Status = Literal["new", "unchanged", "rerender"]
# Long values (prompts, digests) are shortened in reasons; the JSON output keeps them whole.
_SHORT = 12


@dataclass(frozen=True)
class JobChange:
    name: str
    key: str
    status: Status
    previous_key: str | None = None
    reasons: tuple[str, ...] = ()  # human-readable, one per changed pixel field
    fields: dict = field(default_factory=dict)  # path -> {"before": ..., "after": ...}
    cached: bool = False  # its image is in the output root's cache: it will not render


@dataclass(frozen=True)
class ChangeSet:
    previous_run: str | None
    jobs: tuple[JobChange, ...]
    removed: tuple[str, ...]  # names in the previous run that the plan no longer has

    def count(self, status: Status) -> int:
        return sum(1 for c in self.jobs if c.status == status)

    def to_json(self) -> dict:
        return {
            "previous_run": self.previous_run,
            "counts": {s: self.count(s) for s in ("new", "unchanged", "rerender")} | {"removed": len(self.removed)},
            "jobs": [{"name": c.name, "key": c.key, "status": c.status, "cached": c.cached,
                      "previous_key": c.previous_key, "reasons": list(c.reasons), "fields": c.fields}
                     for c in self.jobs],
            "removed": list(self.removed),
        }


def _flatten(value, prefix: str = "") -> dict[str, object]:
    """Pixel fields as dotted paths; LoRAs and controls are keyed by name/type, not position."""
    out: dict[str, object] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and all(isinstance(v, dict) and ("name" in v or "type" in v) for v in value):
        for v in value:
            label = v.get("name", v.get("type"))
            rest = {k: x for k, x in v.items() if k not in ("name",)}
            out.update(_flatten(rest, f"{prefix}.{label}"))
    elif isinstance(value, list) and not value:
        pass  # an empty stack contributes no fields; a LoRA added later shows as its own fields
    else:
        out[prefix] = value
    return out


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:_SHORT] + "…" if len(text) > 2 * _SHORT else text


def _reason(path: str, before, after) -> str:
    if path in ("prompt", "negative_prompt"):
        return path  # whole prompts are too long for a line; --json has them
    if before is _MISSING:
        return f"{path} added ({_show(after)})"
    if after is _MISSING:
        return f"{path} removed (was {_show(before)})"
    return f"{path} {_show(before)} → {_show(after)}"


_MISSING = object()


def field_changes(before: dict, after: dict) -> dict[str, tuple[object, object]]:
    """Dotted pixel-field path -> (before, after) for every field that differs."""
    a, b = _flatten(before), _flatten(after)
    return {p: (a.get(p, _MISSING), b.get(p, _MISSING)) for p in sorted(set(a) | set(b)) if a.get(p, _MISSING) != b.get(p, _MISSING)}


def plan_changes(jobs: list[RenderJob], previous: list[RenderJob] | None, cached_keys: set[str],
                 previous_run: str | None = None) -> ChangeSet:
    """Compare a plan with the previous run's jobs. Pure.

    A job whose key is cached, or that the previous run planned with the same key, is `unchanged`
    (`cached` says whether its image is still there to reuse); a job whose name existed with another
    key is `rerender` with the fields that changed; the rest are `new`.
    """
    before = {j.name: j for j in previous or []}
    changes = []
    for job in jobs:
        old = before.get(job.name)
        cached = job.key in cached_keys
        if cached or (old is not None and old.key == job.key):
            changes.append(JobChange(job.name, job.key, "unchanged", old.key if old else None, cached=cached))
        elif old is None:
            changes.append(JobChange(job.name, job.key, "new"))
        else:
            diff = field_changes(old.pixel_fields(), job.pixel_fields())
            reasons = tuple(_reason(p, x, y) for p, (x, y) in diff.items()) or ("castbook render recipe",)
            changes.append(JobChange(
                job.name, job.key, "rerender", old.key, reasons,
                {p: {"before": None if x is _MISSING else x, "after": None if y is _MISSING else y}
                 for p, (x, y) in diff.items()}))
    names = {j.name for j in jobs}
    removed = tuple(sorted(n for n in before if n not in names))
    return ChangeSet(previous_run, tuple(changes), removed)


# --- the edge: run folders ----------------------------------------------------------------------


def _run_info(run_dir: Path) -> dict | None:
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def find_previous_run(out_root: Path, spec_files: list[str]) -> Path | None:
    """The newest run under `out_root` whose run.json names the same main spec file."""
    out_root = Path(out_root)
    if not out_root.is_dir() or not spec_files:
        return None
    main = str(spec_files[0])
    runs = []
    for run_dir in out_root.iterdir():
        info = _run_info(run_dir) if run_dir.is_dir() else None
        if info and [str(s) for s in info.get("spec_files", [])][:1] == [main]:
            runs.append((str(info.get("started") or ""), run_dir.name, run_dir))
    return max(runs)[2] if runs else None


def load_run_jobs(run_dir: Path) -> list[RenderJob]:
    """The jobs a run planned (`plan.jsonl`); InputError when the folder is not a run."""
    run_dir = Path(run_dir)
    if _run_info(run_dir) is None:
        raise InputError(f"{run_dir} is not a castbook run folder (no readable run.json); "
                         f"give a folder written by `castbook render`, e.g. runs/20261130T031500Z-luca")
    jobs = []
    for record in read_jsonl(run_dir / "plan.jsonl"):
        try:
            jobs.append(RenderJob.model_validate(record))
        except ValueError:
            continue  # a job written by an older castbook: it shows as new, which is what will happen
    return jobs

