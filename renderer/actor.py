"""The render actor: one per GPU, holds a loaded pipeline, renders jobs to PNG bytes.

A plain class. The runner wraps it with `ray.remote` (one Ray actor per GPU/slot); with
`--executor local` the same class runs in-process. Following the Ray pattern, the model
loads in the constructor and the work happens in `render`.

The actor returns bytes (PNG with metadata already embedded, control maps): the driver
writes every file, so nothing assumes a disk shared between nodes.
"""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

from renderer.outputs import castbook_version, encode_png
from schemas.job import RenderJob, ResolvedModel

# Test-only hook: when CASTBOOK_TEST_CRASH_KEY names a job key (prefix), the actor process
# exits abruptly (os._exit) on that job, once: CASTBOOK_TEST_CRASH_MARKER is a file created
# just before exiting, so the restarted actor renders the job normally.
CRASH_KEY_ENV = "CASTBOOK_TEST_CRASH_KEY"
CRASH_MARKER_ENV = "CASTBOOK_TEST_CRASH_MARKER"
# Test-only: seconds to sleep before each job, so a test can kill a run part-way, reliably.
DELAY_ENV = "CASTBOOK_TEST_JOB_DELAY_S"


def _maybe_crash(key: str) -> None:
    prefix = os.environ.get(CRASH_KEY_ENV)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if not prefix or not marker or not key.startswith(prefix):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)


def _configure_threads() -> None:
    """Ray forces OMP_NUM_THREADS=1 in workers; give torch the threads an in-process run gets.

    Same thread count in the actor and in `castbook reproduce` keeps reductions (and so
    pixels) identical, and one actor per machine should use the machine.
    """
    if os.environ.get("CASTBOOK_IN_RAY") != "1":
        return
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


def _quiet_libraries() -> None:
    # Loading bars from diffusers/transformers would interleave with the driver's progress bar.
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.disable_progress_bar()
        tl.disable_progress_bar()
    except Exception:
        pass


def _ray_node_id() -> str | None:
    if os.environ.get("CASTBOOK_IN_RAY") != "1":
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
    """Loads the base pipeline once; `render(job_json)` returns a result dict, never raises."""

    def __init__(
        self,
        root: str | Path,
        performance: dict | None = None,
        base_model: dict | None = None,
        index: int = 0,
        device: str | None = None,
        dtype: str = "auto",
        warmup_job: dict | None = None,
        vae: dict | None = None,
    ):
        t0 = time.perf_counter()
        _configure_threads()
        from renderer.pipeline import JobRenderer  # torch/diffusers import happens here

        _quiet_libraries()

        self.index = index
        self.performance = dict(performance or {})
        self.renderer = JobRenderer(Path(root), performance, device=device)
        t1 = time.perf_counter()
        # Load the first job's base model now (Ray pattern: the model loads in the constructor).
        # A load error is kept, not raised: the jobs needing that model fail one by one with
        # the message, and the actor stays up for jobs on other models.
        self.load_error: str | None = None
        if base_model is not None:
            try:
                self._load_base(ResolvedModel.model_validate(base_model), dtype,
                                ResolvedModel.model_validate(vae) if vae else None)
            except Exception as e:
                self.load_error = f"{type(e).__name__}: {e}"
        t2 = time.perf_counter()
        self.startup = {"import_s": t1 - t0, "model_load_s": t2 - t1}
        # With torch.compile the first render builds the graphs (minutes on SDXL): do it here,
        # so it is reported as start-up and not counted in any job's seconds.
        if warmup_job is not None and self.performance.get("compile") and self.load_error is None:
            try:
                self.startup["warmup_s"] = self.renderer.warmup(RenderJob.model_validate(warmup_job))
            except Exception as e:  # the job itself will fail with the message later
                self.startup["warmup_error"] = f"{type(e).__name__}: {e}"
        self._last_stack: tuple | None = None

    def _load_base(self, model: ResolvedModel, dtype: str, vae: ResolvedModel | None = None) -> None:
        self.renderer.load_base_model(model, dtype, vae)

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

    def environment(self, device: str, dtype: str) -> dict:
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

    def render(self, job_json: dict) -> dict:
        """Render one job. Errors come back as `{"error": message}`; the actor lives on."""
        key = str(job_json.get("key", ""))
        _maybe_crash(key)
        if os.environ.get(DELAY_ENV):
            time.sleep(float(os.environ[DELAY_ENV]))
        t0 = time.perf_counter()
        result: dict = {
            "key": key,
            "actor": self.index,
            "pid": os.getpid(),
            "png": None,
            "control_maps": [],
            "timings": {},
            "peak_memory_bytes": None,
            "device": None,
            "dtype": None,
            "fallback": None,
            "lora_switched": False,
            "error": None,
        }
        try:
            job = RenderJob.model_validate(job_json)
            stack = _lora_stack(job)
            switched = self._last_stack is not None and stack != self._last_stack
            out = self.renderer.render(job)
            self._last_stack = stack
            result.update(
                lora_switched=bool(getattr(out, "lora_switched", switched)),
                png=encode_png(out.image, job, self.environment(out.device, out.dtype), self.performance),
                control_maps=[(name, _png_bytes(img)) for name, img in out.control_maps],
                timings=dict(out.timings),
                peak_memory_bytes=out.peak_memory_bytes,
                device=out.device,
                dtype=out.dtype,
                fallback=out.fallback,
            )
        except Exception as e:  # one job's failure must never take the actor down
            from core.errors import JobError

            self._last_stack = None
            result["error"] = e.message if isinstance(e, JobError) else f"{type(e).__name__}: {e}"
        result["seconds"] = time.perf_counter() - t0
        return result
