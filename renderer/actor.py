"""The render actor: one per GPU, holds a loaded pipeline, renders jobs to PNG bytes.

A plain class. The runner wraps it with `ray.remote` (one Ray actor per GPU/slot); with
`--executor local` the same class runs in-process. Following the Ray pattern, the model
loads in the constructor and the work happens in `render`. Every argument is keyword-only,
and a job's outcome comes back as a typed `schemas.records.RenderResult`.

The actor returns bytes (PNG with metadata already embedded, control maps): the driver
writes every file, so nothing assumes a disk shared between nodes.

Process-wide settings (torch threads, library progress bars) are changed only inside a Ray
worker (`CASTBOOK_IN_RAY=1`), a process the actor owns. In-process (`--executor local`,
`castbook reproduce`, `castbook bench`) the actor changes neither: the caller decides
(`renderer.executors` wraps the local run in `quiet_loading_bars`).
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from renderer import test_hooks
from renderer.library_logs import capture_library_output
from renderer.outputs import castbook_version
from renderer.png_metadata import encode_png
from schemas.job import RenderJob, ResolvedModel
from schemas.records import RenderResult


def _in_ray() -> bool:
    return os.environ.get("CASTBOOK_IN_RAY") == "1"


def _configure_threads() -> None:
    """Ray forces OMP_NUM_THREADS=1 in workers; give torch the threads an in-process run gets.

    Same thread count in the actor and in `castbook reproduce` keeps reductions (and so
    pixels) identical, and one actor per machine should use the machine. Ray workers only.
    """
    import torch

    n = os.environ.get("CASTBOOK_TORCH_THREADS")
    if n:
        threads = int(n)
    else:
        try:
            import psutil

            threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        except ImportError:
            threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))


@contextmanager
def quiet_loading_bars() -> Iterator[None]:
    """diffusers/transformers loading bars off inside the block, restored after.

    They would interleave with the driver's progress bar.
    """
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    was = (dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled())
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dl.enable_progress_bar()
        if was[1]:
            tl.enable_progress_bar()


def _ray_node_id() -> str | None:
    if not _in_ray():
        return None
    import ray

    return ray.get_runtime_context().get_node_id()


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _lora_stack(job: RenderJob) -> tuple:
    return tuple(sorted((l.name, l.digest, l.weight) for l in job.loras))


class RenderActor:
    """Loads the base pipeline once; `render(job=...)` returns a `RenderResult`, never raises."""

    def __init__(
        self,
        *,
        root: str | Path,
        performance: dict | None = None,
        base_model: ResolvedModel | None = None,
        index: int = 0,
        device: str | None = None,
        dtype: str = "auto",
        warmup_job: RenderJob | None = None,
        vae: ResolvedModel | None = None,
    ):
        t0 = time.perf_counter()
        if _in_ray():  # this worker process is ours: set it up like an in-process run
            _configure_threads()
        from renderer.pipeline import JobRenderer  # torch/diffusers import happens here

        if _in_ray():
            import diffusers.utils.logging as dl
            import transformers.utils.logging as tl

            dl.disable_progress_bar()
            tl.disable_progress_bar()

        self.index = index
        self.performance = dict(performance or {})
        self.renderer = JobRenderer(Path(root), performance, device=device)
        t1 = time.perf_counter()
        # Load the first job's base model now (Ray pattern: the model loads in the constructor).
        # A load error is kept, not raised: the jobs needing that model fail one by one with
        # the message, and the actor stays up for jobs on other models.
        self.load_error: str | None = None
        self._pending_log: list[str] = []
        if base_model is not None:
            with capture_library_output(self._pending_log):
                try:
                    self.renderer.load_base_model(base_model, dtype, vae)
                except Exception as e:
                    self.load_error = f"{type(e).__name__}: {e}"
        t2 = time.perf_counter()
        self.startup = {"import_s": t1 - t0, "model_load_s": t2 - t1}
        # With torch.compile the first render builds the graphs (minutes on SDXL): do it here,
        # so it is reported as start-up and not counted in any job's seconds.
        if warmup_job is not None and self.performance.get("compile") and self.load_error is None:
            try:
                self.startup["warmup_s"] = self.renderer.warmup(warmup_job)
            except Exception as e:  # the job itself will fail with the message later
                self.startup["warmup_error"] = f"{type(e).__name__}: {e}"
        self._last_stack: tuple | None = None

    def info(self) -> dict:
        """Where this actor runs and what its start cost (for run.json)."""
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        return {
            "index": self.index,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "gpu": gpu,
            "torch_threads": torch.get_num_threads(),
            "node_id": _ray_node_id(),
            "startup": dict(self.startup),
            "load_error": self.load_error,
        }

    def stats(self) -> dict:
        return dict(getattr(self.renderer, "stats", {}) or {})

    def environment(self, *, device: str, dtype: str) -> dict:
        """The environment stored in each PNG: only what changes pixels, so bytes reproduce."""
        import diffusers
        import torch

        return {
            "castbook": castbook_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": device,
            "dtype": dtype,
        }

    def render(self, *, job: RenderJob) -> RenderResult:
        """Render one job. Errors come back in `RenderResult.error`; the actor lives on."""
        test_hooks.before_job(job.key)
        t0 = time.perf_counter()
        fields: dict = {}
        log, self._pending_log = self._pending_log, []  # the model load's lines come with the first job
        with capture_library_output(log):
            fields = self._render_fields(job)
        return RenderResult(key=job.key, actor=self.index, pid=os.getpid(), seconds=time.perf_counter() - t0,
                            log=tuple(log), **fields)

    def _render_fields(self, job: RenderJob) -> dict:
        try:
            stack = _lora_stack(job)
            switched = self._last_stack is not None and stack != self._last_stack
            out = self.renderer.render(job)
            self._last_stack = stack
            fields = dict(
                lora_switched=bool(getattr(out, "lora_switched", switched)),
                png=encode_png(out.image, job, self.environment(device=out.device, dtype=out.dtype),
                               self.performance, root=self.renderer.root),
                control_maps=tuple((name, _png_bytes(img)) for name, img in out.control_maps),
                timings={k: float(v) for k, v in out.timings.items()},
                peak_memory_bytes=out.peak_memory_bytes,
                device=out.device,
                dtype=out.dtype,
                fallback=out.fallback,
            )
        except Exception as e:  # one job's failure must never take the actor down
            from core.errors import JobError

            self._last_stack = None
            fields = {"error": e.message if isinstance(e, JobError) else f"{type(e).__name__}: {e}"}
        return fields
