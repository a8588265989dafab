"""The run's writer: each finished job's image goes to the cache, then the run directory, then one
ledger line (`schemas.records.ManifestRecord`) is appended to `manifest.jsonl`.

The driver writes every file (actors return bytes), so nothing assumes a disk shared between nodes.
Torch-free: a fully cached run uses only this, `renderer.outputs` and the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.files import link_or_copy
from core.jsonl import append_jsonl
from renderer.library_logs import append_log
from renderer.outputs import ImageCache, image_relpath, safe_name, utc_now
from schemas.job import RenderJob
from schemas.records import ManifestRecord, RecordStatus, RenderResult

LOG_NAME = "castbook.log"  # library warnings of the run (see renderer.library_logs)


def append_record(manifest: Path, record: ManifestRecord) -> None:
    """Append one ledger line (fsync'd; core.jsonl's torn-line rule)."""
    append_jsonl(manifest, record.to_json())


class RunWriter:
    """Writes every finished job once: image (cache, then run dir), then one ledger line."""

    def __init__(self, out_dir: Path, run_dir: Path, on_update: Callable[[dict[str, int]], None] | None = None):
        self.cache = ImageCache(out_dir)
        self.run_dir = run_dir
        self.manifest = run_dir / "manifest.jsonl"
        self.counts: dict[str, int] = {"rendered": 0, "cached": 0, "failed": 0}
        self.written: set[str] = set()  # job names already in the ledger
        self.first_result: RenderResult | None = None
        self.on_update = on_update

    def _line(self, job: RenderJob, status: RecordStatus, **fields: Any) -> None:
        if job.name in self.written:  # never write a job twice (e.g. a late retry result)
            return
        record = ManifestRecord(key=job.key, name=job.name, status=status, steps=job.num_inference_steps,
                                finished_at=utc_now(), **fields)
        append_record(self.manifest, record)
        self.written.add(job.name)
        self.counts[status] += 1
        if self.on_update:
            self.on_update(self.counts)

    def _link_controls(self, names: list[str]) -> list[str]:
        rels = []
        for name in names:
            src = self.cache.control_dir / safe_name(name)
            if src.is_file():
                link_or_copy(src, self.run_dir / "control" / name)
                rels.append(f"control/{name}")
        return rels

    def cached(self, job: RenderJob) -> None:
        rel = image_relpath(job)
        link_or_copy(self.cache.png(job.key), self.run_dir / rel)
        controls = self._link_controls(self.cache.control_maps(job.key))
        self._line(job, "cached", image=rel, control_maps=controls)

    def failed(self, job: RenderJob, error: str, actor: int | None = None, seconds: float = 0.0) -> None:
        self._line(job, "failed", error=error, actor=actor, seconds=round(seconds, 4))

    def result(self, job: RenderJob, res: RenderResult) -> None:
        if job.name in self.written:  # a late result of a retried job: its files and line exist
            return
        append_log(self.run_dir / LOG_NAME, f"{job.name} (actor {res.actor})", list(res.log))
        if not res.ok:
            self.failed(job, res.error or "the actor returned no image", res.actor, res.seconds)
            return
        if self.first_result is None:
            self.first_result = res
        names = []
        for name, data in res.control_maps:
            self.cache.put_control(name, data)
            names.append(name)
        self.cache.put(job.key, res.png, names)
        rel = image_relpath(job)
        link_or_copy(self.cache.png(job.key), self.run_dir / rel)
        self._line(
            job,
            "rendered",
            image=rel,
            seconds=round(res.seconds, 4),
            peak_memory_bytes=res.peak_memory_bytes,
            timings={k: round(float(v), 5) for k, v in res.timings.items()},
            lora_switched=res.lora_switched,
            fallback=res.fallback,
            control_maps=self._link_controls(names),
            actor=res.actor,
        )


class Progress:
    """A rich progress bar with rendered/cached/failed counts and ETA (nothing when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]render"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rendered {task.fields[rendered]} · cached {task.fields[cached]} · failed {task.fields[failed]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("render", total=total, rendered=0, cached=0, failed=0)
        self.bar.start()

    def update(self, counts: dict[str, int]) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=sum(counts.values()), **counts)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
