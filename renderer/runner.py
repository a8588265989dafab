"""The render driver: plan → (cache | actors) → run directory.

Steps of `run_render`:
  1. lock the output root (a second run on it is refused);
  2. create `<run-id>/` with run.json and plan.jsonl;
  3. resolve cached jobs first — when every job is cached, neither Ray nor torch is touched;
  4. order the rest by (base model, control models, LoRA stack) so switches are rare;
  5. start the actors (Ray, or one in-process with executor="local": `renderer.executors`);
  6. keep ≤ 2 jobs in flight per actor (`ray.wait`), writing each result as it arrives (`renderer.writer`);
  7. finish run.json.

Imports of ray / torch happen inside functions, only when something must be rendered.
"""

from __future__ import annotations

import fnmatch
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.files import atomic_write_json
from renderer.executors import group_key, run_local, run_ray
from renderer.library_logs import append_log, capture_library_output
from renderer.outputs import RootLock, finish_run_info, new_run_dir, new_run_info, write_plan_jsonl
from renderer.writer import LOG_NAME, Progress, RunWriter
from schemas.job import RenderJob
from schemas.plan import Plan


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    counts: dict[str, int]
    exit_code: int
    startup: dict[str, float] = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)  # per-actor renderer stats (model/LoRA loads)


def order_jobs(jobs: list[RenderJob]) -> list[RenderJob]:
    """Stable sort by group: plan order is kept inside a group."""
    first_seen: dict[tuple, int] = {}
    for j in jobs:
        first_seen.setdefault(group_key(j), len(first_seen))
    return sorted(jobs, key=lambda j: first_seen[group_key(j)])


def select_jobs(jobs: list[RenderJob], only: str | list[str] | None) -> list[RenderJob]:
    if not only:
        return list(jobs)
    patterns = [only] if isinstance(only, str) else list(only)
    # Same rule as `castbook plan --only`: the job's name or its job-matrix name matches.
    return [j for j in jobs if any(fnmatch.fnmatchcase(j.name, p) or fnmatch.fnmatchcase(j.job, p) for p in patterns)]


def _run_stem(plan: Plan) -> str:
    return Path(plan.spec_files[0]).stem if plan.spec_files else "run"


def run_render(
    plan: Plan,
    *,
    out_dir: Path | str,
    executor: str = "ray",
    ray_address: str | None = None,
    actors: int = 1,
    force: bool = False,
    quiet: bool = False,
    progress: bool = True,
    only: str | list[str] | None = None,
) -> RunResult:
    """Render a plan into a new run directory under `out_dir`; see the module docstring.

    Raises `renderer.outputs.RunLocked` when another render holds `out_dir`. The result's
    exit_code is 0 when every job succeeded (rendered or cached), 1 when any failed.
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor {executor!r} is not known; use 'ray' or 'local'")
    if actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    out_dir = Path(out_dir).absolute()
    root = Path(plan.root).absolute()
    jobs = order_jobs(select_jobs(list(plan.jobs), only))

    # 1. lock the output root
    with RootLock(out_dir):
        # 2. the run directory
        run_dir = new_run_dir(out_dir, _run_stem(plan))
        run = new_run_info(
            run_dir, kind="render", root=root, spec_files=[str(p) for p in plan.spec_files], total=len(jobs),
            executor=executor, actors=actors, characters=plan.characters,
            scoring=plan.scoring or {"model": "builtin:tiny-clip", "weights": None}, only=only, force=force,
        )
        atomic_write_json(run_dir / "run.json", run)
        write_plan_jsonl(run_dir / "plan.jsonl", jobs)

        bar = Progress(len(jobs), enabled=progress and not quiet)
        writer = RunWriter(out_dir, run_dir, on_update=bar.update)
        info: dict = {}
        stats: list[dict] = []
        status = "interrupted"
        previous_term = _raise_on_sigterm()
        try:
            # 3. cached jobs first: with all cached, no Ray, no model, no torch import
            todo: list[RenderJob] = []
            primary: dict[str, RenderJob] = {}
            duplicates: list[RenderJob] = []
            for job in jobs:
                if not force and writer.cache.has(job.key):
                    writer.cached(job)
                elif job.key in primary:
                    duplicates.append(job)  # same pixels as an earlier job: render once
                else:
                    primary[job.key] = job
                    todo.append(job)

            # 4-6. render the rest; the libraries' own warnings go to castbook.log
            if todo:
                t = time.perf_counter()
                driver_log: list[str] = []
                try:
                    with capture_library_output(driver_log):
                        if executor == "local":
                            stats = run_local(todo, plan, writer, run["startup"], info)
                        else:
                            stats = run_ray(todo, plan, writer, run["startup"], info,
                                            ray_address=ray_address, actors=actors, quiet=quiet)
                finally:
                    append_log(run_dir / LOG_NAME, "driver", driver_log)
                run["render_s"] = round(time.perf_counter() - t, 4)
                for job in todo:  # anything not written (e.g. actors never started) failed
                    if job.name not in writer.written:
                        writer.failed(job, info.get("error", "the job was not rendered"))
            for job in duplicates:
                if writer.cache.has(job.key):
                    writer.cached(job)
                else:
                    writer.failed(job, f"same key as job {primary[job.key].name}, which failed")
            status = "finished"
        except RuntimeError as e:  # actors could not start: every remaining job fails with the reason
            for job in jobs:
                if job.name not in writer.written:
                    writer.failed(job, str(e))
            status = "finished"
            run["error"] = str(e)
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            bar.stop()
            # 7. finish run.json
            finish_run_info(run, status=status, counts=writer.counts)
            if writer.first_result:
                r = writer.first_result
                run["environment"].update(device=r.device, dtype=r.dtype)
            if info.get("actors"):
                run["environment"]["gpu"] = info["actors"][0].get("gpu")
                run["actors_info"] = info["actors"]
            for k in ("actors_used", "actor_resources"):
                if k in info:
                    run[k] = info[k]
            run["renderer_stats"] = stats
            atomic_write_json(run_dir / "run.json", run)

    failed = writer.counts["failed"]
    return RunResult(
        run_dir=run_dir,
        run_id=run_dir.name,
        counts=run["counts"],
        exit_code=1 if failed else 0,
        startup={k: v for k, v in run["startup"].items() if v is not None},
        stats=stats,
    )


def _raise_on_sigterm():
    """SIGTERM → KeyboardInterrupt, so run.json is closed as 'interrupted'. Main thread only."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


__all__ = ["RunResult", "group_key", "order_jobs", "run_render", "select_jobs"]
