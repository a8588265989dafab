"""What a render produces, as typed records: the actor's `RenderResult` and the ledger's `ManifestRecord`.

Torch-free, so the driver, a fully cached run and the reports read them without torch.
`ManifestRecord` is the one model of a `manifest.jsonl` line (docs/INTERFACES.md): the runner
and `castbook bench` write it, `reports/rundir.py` and `castbook render`'s failure listing read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.base import Strict

RecordStatus = Literal["rendered", "cached", "failed"]


class RenderResult(Strict):
    """One job's outcome, returned by `RenderActor.render` across the Ray boundary (bytes, never files).

    `error` is set (and `png` None) when the job failed; the actor lives on.
    """

    key: str
    actor: int
    pid: int
    png: bytes | None = None  # PNG with the `parameters` and `castbook` chunks already embedded
    control_maps: tuple[tuple[str, bytes], ...] = ()  # (file name, PNG bytes)
    timings: dict[str, float] = Field(default_factory=dict)
    peak_memory_bytes: int | None = None
    device: str | None = None
    dtype: str | None = None
    fallback: str | None = None
    lora_switched: bool = False
    error: str | None = None
    seconds: float = 0.0
    log: tuple[str, ...] = ()  # library warnings while rendering it (the driver writes them to castbook.log)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.png)


class ManifestRecord(Strict):
    """One `manifest.jsonl` line: a finished job (rendered, cached or failed)."""

    key: str
    name: str
    status: RecordStatus
    image: str | None = None  # relative to the run directory
    seconds: float = 0.0
    steps: int
    peak_memory_bytes: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    lora_switched: bool = False
    fallback: str | None = None
    error: str | None = None
    control_maps: list[str] = Field(default_factory=list)  # relative to the run directory
    actor: int | None = None
    finished_at: str
    # Older `castbook bench` ledgers wrote it (always null): accepted when read, never written.
    bare_seconds: float | None = Field(default=None, exclude=True)

    def to_json(self) -> dict:
        """The ledger line as a JSON-ready dict, fields in the documented order."""
        return self.model_dump(mode="json")


__all__ = ["ManifestRecord", "RecordStatus", "RenderResult"]
