"""The render driver: plan → (cache | Ray actors) → run directory.

Steps of `run_render`:
  1. lock the output root (a second run on it is refused);
  2. create `<run-id>/` with run.json and plan.jsonl;
  3. resolve cached jobs first — when every job is cached, neither Ray nor torch is touched;
  4. order the rest by (base model, control models, LoRA stack) so switches are rare;
  5. start the actors (Ray, or one in-process with executor="local");
  6. keep ≤ 2 jobs in flight per actor (`ray.wait`), writing each result as it arrives;
  7. finish run.json.

Imports of ray / torch happen inside functions, only when something must be rendered.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import atomic_write_json, link_or_copy
from core.jsonl import append_jsonl
from renderer.outputs import (
    ImageCache,
    RootLock,
    base_environment,
    castbook_version,
    git_commit,
    image_relpath,
    new_run_dir,
    safe_name,
    spec_digest,
    utc_now,
    write_plan_jsonl,
)
from schemas.job import RenderJob

MAX_IN_FLIGHT_PER_ACTOR = 2  # one rendering, one queued: the actor never idles, memory stays bounded
MAX_ATTEMPTS = 2  # a job whose actor died is retried once
MAX_ACTOR_RESTARTS = 2  # per actor slot, before the slot is given up
ACTOR_START_TIMEOUT_S = float(os.environ.get("CASTBOOK_ACTOR_START_TIMEOUT", "600"))
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # results are PNG bytes: the 7.5 GB default is waste


@dataclass
class RunResult:
    run_dir: Path
    run_id: str
    counts: dict[str, int]
    exit_code: int
    startup: dict[str, float] = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)  # per-actor renderer stats (model/LoRA loads)


def group_key(job: RenderJob) -> tuple:
    """Jobs with equal keys share a loaded base model, ControlNets and LoRA stack."""
    return (
        job.base_model.digest,
        tuple(c.model.digest for c in job.controls),
        tuple(sorted((l.name, l.digest) for l in job.loras)),
        tuple(sorted((l.name, l.weight) for l in job.loras)),
    )


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


def worker_env() -> dict[str, str]:
    """Environment of Ray workers: offline always, and the driver's CASTBOOK_* settings."""
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "CASTBOOK_IN_RAY": "1",
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("CASTBOOK_")})
    return env


# ---------------------------------------------------------------------------
# Writing results
# ---------------------------------------------------------------------------


class _Writer:
    """Writes every finished job once: image (cache, then run dir), then one ledger line."""

    def __init__(self, out_dir: Path, run_dir: Path, on_update=None):
        self.cache = ImageCache(out_dir)
        self.run_dir = run_dir
        self.manifest = run_dir / "manifest.jsonl"
        self.counts = {"rendered": 0, "cached": 0, "failed": 0}
        self.written: set[str] = set()  # job names already in the ledger
        self.first_result: dict | None = None
        self.on_update = on_update

    def _line(self, job: RenderJob, status: str, **kw: Any) -> None:
        if job.name in self.written:  # never write a job twice (e.g. a late retry result)
            return
        rec = {
            "key": job.key,
            "name": job.name,
            "status": status,
            "image": None,
            "seconds": 0.0,
            "steps": job.num_inference_steps,
            "peak_memory_bytes": None,
            "timings": {},
            "lora_switched": False,
            "fallback": None,
            "error": None,
            "control_maps": [],
            "actor": None,
        }
        rec.update(kw)
        rec["finished_at"] = utc_now()
        append_jsonl(self.manifest, rec)
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

    def result(self, job: RenderJob, res: dict) -> None:
        if res.get("error") or not res.get("png"):
            self.failed(job, res.get("error") or "the actor returned no image", res.get("actor"), res.get("seconds", 0))
            return
        if self.first_result is None:
            self.first_result = res
        names = []
        for name, data in res.get("control_maps") or []:
            self.cache.put_control(name, data)
            names.append(name)
        self.cache.put(job.key, res["png"], names)
        rel = image_relpath(job)
        link_or_copy(self.cache.png(job.key), self.run_dir / rel)
        self._line(
            job,
            "rendered",
            image=rel,
            seconds=round(float(res.get("seconds") or 0.0), 4),
            peak_memory_bytes=res.get("peak_memory_bytes"),
            timings={k: round(float(v), 5) for k, v in (res.get("timings") or {}).items()},
            lora_switched=bool(res.get("lora_switched")),
            fallback=res.get("fallback"),
            control_maps=self._link_controls(names),
            actor=res.get("actor"),
        )


class _Progress:
    """A rich progress bar with rendered/cached/failed counts and ETA (nothing when quiet)."""

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

    def update(self, counts: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=sum(counts.values()), **counts)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------
# Work queue grouped by model/LoRA stack
# ---------------------------------------------------------------------------


class _Queue:
    """Jobs grouped by `group_key`; each actor keeps to one group while it has work."""

    def __init__(self, jobs: list[RenderJob]):
        self.groups: OrderedDict[tuple, deque[RenderJob]] = OrderedDict()
        for j in jobs:
            self.groups.setdefault(group_key(j), deque()).append(j)

    def __len__(self) -> int:
        return sum(len(q) for q in self.groups.values())

    def next_for(self, current: tuple | None, busy: set[tuple]) -> RenderJob | None:
        if current in self.groups and self.groups[current]:
            return self._pop(current)
        for g, q in self.groups.items():  # a group no other actor is on
            if q and g not in busy:
                return self._pop(g)
        for g, q in self.groups.items():  # else share one
            if q:
                return self._pop(g)
        return None

    def _pop(self, g: tuple) -> RenderJob:
        job = self.groups[g].popleft()
        if not self.groups[g]:
            del self.groups[g]
        return job

    def retry(self, job: RenderJob) -> None:
        g = group_key(job)
        self.groups.setdefault(g, deque()).appendleft(job)
        self.groups.move_to_end(g, last=False)


# ---------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------


def _run_local(todo: list[RenderJob], plan, writer: _Writer, startup: dict, info: dict) -> list[dict]:
    from renderer.actor import RenderActor

    t0 = time.perf_counter()
    actor = RenderActor(plan.root, _performance(plan), todo[0].base_model.model_dump(mode="json"), index=0,
                        dtype=todo[0].dtype, warmup_job=todo[0].model_dump(mode="json"),
                        vae=todo[0].vae.model_dump(mode="json") if todo[0].vae else None)
    startup["actor_start_s"] = round(time.perf_counter() - t0, 4)
    a_info = actor.info()
    startup["model_load_s"] = round(a_info["startup"]["model_load_s"], 4)
    info["actors"] = [a_info]
    queue = _Queue(todo)
    current = None
    while (job := queue.next_for(current, set())) is not None:
        current = group_key(job)
        writer.result(job, actor.render(job.model_dump(mode="json")))
    return [actor.stats()]


def _actor_options(ray, actors: int, we_started: bool) -> tuple[dict, int, str | None]:
    """Resources for each actor, the actor count that fits, and a warning (or None)."""
    res = ray.cluster_resources()
    opts: dict = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0}
    warning = None
    # An actor asking for a GPU on a cluster without one stays PENDING forever (STACK.md).
    if res.get("GPU"):
        opts["num_gpus"] = 1
    if res.get("render_slot"):
        opts["resources"] = {"render_slot": 1}
        slots = int(res["render_slot"])
        if opts.get("num_gpus"):
            slots = min(slots, int(res["GPU"]))
        if actors > slots:
            warning = f"--actors {actors} but the cluster has {slots} render slot(s); using {slots}"
            actors = slots
    elif opts.get("num_gpus"):
        if actors > int(res["GPU"]):
            warning = f"--actors {actors} but the cluster has {int(res['GPU'])} GPU(s); using {int(res['GPU'])}"
            actors = int(res["GPU"])
    elif not we_started and actors > 1:
        warning = (
            "the cluster has neither GPUs nor a 'render_slot' resource, so actors may share a node; "
            "start nodes with --resources='{\"render_slot\": 1}' to place one actor per node"
        )
    return opts, max(1, actors), warning


def _run_ray(
    todo: list[RenderJob], plan, writer: _Writer, startup: dict, info: dict, *,
    ray_address: str | None, actors: int, quiet: bool,
) -> list[dict]:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # older Ray
        ActorUnavailableError = RayActorError

    # 1. connect or start a local Ray (loopback only, small object store, no dashboard)
    t0 = time.perf_counter()
    we_started = False
    if not ray.is_initialized():
        common = dict(ignore_reinit_error=True, log_to_driver=bool(os.environ.get("CASTBOOK_RAY_LOGS")),
                      runtime_env={"env_vars": worker_env()})
        if ray_address:
            ray.init(address=ray_address, **common)
        else:
            ray.init(
                # "local": never join a cluster some `ray start` left running (plain init() would).
                address="local",
                num_cpus=max(1, os.cpu_count() or 1),
                resources={"render_slot": actors},
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                **common,
            )
        we_started = True
    startup["ray_init_s"] = round(time.perf_counter() - t0, 4)
    opts, actors, warning = _actor_options(ray, actors, we_started or ray_address is None)
    if warning and not quiet:
        print(f"castbook: {warning}", file=sys.stderr)
    info["actor_resources"] = {k: v for k, v in opts.items() if k in ("num_gpus", "resources")}

    Actor = ray.remote(_remote_actor_class())
    root, perf = str(plan.root), _performance(plan)
    first_model, first_dtype = todo[0].base_model.model_dump(mode="json"), todo[0].dtype
    first_vae = todo[0].vae.model_dump(mode="json") if todo[0].vae else None

    def start(index: int):
        return Actor.options(runtime_env={"env_vars": worker_env()}, **opts).remote(
            root, perf, first_model, index, None, first_dtype, todo[0].model_dump(mode="json"), first_vae)

    class Slot:
        def __init__(self, index: int):
            self.index, self.handle, self.gen, self.restarts = index, start(index), 0, 0
            self.group: tuple | None = None
            self.inflight = 0
            self.dead = False

    n = min(actors, len(todo))
    info["actors_requested"], info["actors_used"] = actors, n
    slots: list[Slot] = []
    try:
        # 2. start actors and wait until each has loaded its model
        t1 = time.perf_counter()
        slots = [Slot(i) for i in range(n)]
        ready_refs = [s.handle.info.remote() for s in slots]
        done, pending = ray.wait(ready_refs, num_returns=len(ready_refs), timeout=ACTOR_START_TIMEOUT_S)
        if pending:
            raise RuntimeError(
                f"render actors did not start within {ACTOR_START_TIMEOUT_S:.0f}s (asked for {opts}); "
                f"cluster resources: {ray.cluster_resources()}. Check --actors and the nodes' resources"
            )
        try:
            infos = ray.get(done)
        except RayActorError as e:
            raise RuntimeError(f"a render actor failed to start: {e}") from None
        startup["actor_start_s"] = round(time.perf_counter() - t1, 4)
        startup["model_load_s"] = round(max(i["startup"]["model_load_s"] for i in infos), 4)
        info["actors"] = infos

        # 3. dispatch: ≤ MAX_IN_FLIGHT_PER_ACTOR per actor, results written as they arrive
        queue = _Queue(todo)
        inflight: dict[Any, tuple[Slot, int, RenderJob]] = {}
        attempts: dict[str, int] = {}

        def fill() -> None:
            for s in slots:
                while not s.dead and s.inflight < MAX_IN_FLIGHT_PER_ACTOR:
                    busy = {o.group for o in slots if o is not s and o.inflight}
                    job = queue.next_for(s.group, busy)
                    if job is None:
                        return
                    s.group = group_key(job)
                    attempts[job.name] = attempts.get(job.name, 0) + 1
                    ref = s.handle.render.remote(job.model_dump(mode="json"))
                    inflight[ref] = (s, s.gen, job)
                    s.inflight += 1

        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                s, gen, job = inflight.pop(ref)
                s.inflight -= 1
                try:
                    writer.result(job, ray.get(ref))
                except (RayActorError, ActorUnavailableError) as e:
                    if gen == s.gen:  # first report of this death: replace the actor
                        s.gen += 1
                        s.restarts += 1
                        try:
                            ray.kill(s.handle, no_restart=True)
                        except Exception:
                            pass
                        if s.restarts > MAX_ACTOR_RESTARTS:
                            s.dead = True
                        else:
                            s.handle = start(s.index)
                        s.group = None
                    if attempts.get(job.name, 0) < MAX_ATTEMPTS and not all(o.dead for o in slots):
                        queue.retry(job)
                    else:
                        writer.failed(job, f"the render actor died while rendering this job ({type(e).__name__}); "
                                           "it was retried once. Check memory and the actor logs (CASTBOOK_RAY_LOGS=1)",
                                      actor=s.index)
            fill()
        for job in _drain(queue):  # only when every actor slot died
            writer.failed(job, "no render actor left: every actor died and was restarted "
                               f"{MAX_ACTOR_RESTARTS} times")
        stats = []
        live = [s for s in slots if not s.dead]
        try:
            for s, st in zip(live, ray.get([s.handle.stats.remote() for s in live], timeout=60)):
                stats.append({"actor": s.index, "restarts": s.restarts, **st})
        except (GetTimeoutError, RayActorError):
            pass  # stats are informational; the images and ledger are already written
        return stats
    finally:
        for s in slots:
            try:
                ray.kill(s.handle, no_restart=True)
            except Exception:
                pass
        if we_started:
            ray.shutdown()


def _drain(queue: _Queue) -> list[RenderJob]:
    out = []
    while (job := queue.next_for(None, set())) is not None:
        out.append(job)
    return out


def _remote_actor_class():
    from renderer.actor import RenderActor

    return RenderActor


def _performance(plan) -> dict:
    performance = dict(getattr(plan, "performance", None) or {})
    # LoRA hotswap pads every adapter to one rank: the registry's largest, known before any load.
    performance.setdefault("max_lora_rank", getattr(plan, "max_lora_rank", None))
    return performance


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def _run_stem(plan) -> str:
    files = list(getattr(plan, "spec_files", None) or [])
    return Path(files[0]).stem if files else "run"


def run_render(
    plan,
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
    root = Path(getattr(plan, "root", ".")).absolute()
    jobs = order_jobs(select_jobs(list(plan.jobs), only))

    # 1. lock the output root
    with RootLock(out_dir):
        # 2. the run directory
        run_dir = new_run_dir(out_dir, _run_stem(plan))
        spec_files = [str(p) for p in (getattr(plan, "spec_files", None) or [])]
        run: dict = {
            "run_id": run_dir.name,
            "castbook_version": castbook_version(),
            "root": str(root),
            "spec_files": spec_files,
            "spec_digest": spec_digest(root, spec_files),
            "git_commit": git_commit(root),
            "started": utc_now(),
            "finished": None,
            "status": "running",
            "counts": {"total": len(jobs), "rendered": 0, "cached": 0, "failed": 0},
            "environment": base_environment(),
            "executor": executor,
            "actors": actors,
            "startup": {"ray_init_s": None, "actor_start_s": None, "model_load_s": None},
            "characters": dict(getattr(plan, "characters", None) or {}),
            "scoring": getattr(plan, "scoring", None) or {"model": "builtin:tiny-clip", "weights": None},
            "only": only,
            "force": force,
        }
        atomic_write_json(run_dir / "run.json", run)
        write_plan_jsonl(run_dir / "plan.jsonl", jobs)

        bar = _Progress(len(jobs), enabled=progress and not quiet)
        writer = _Writer(out_dir, run_dir, on_update=bar.update)
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

            # 4-6. render the rest
            if todo:
                t = time.perf_counter()
                if executor == "local":
                    stats = _run_local(todo, plan, writer, run["startup"], info)
                else:
                    stats = _run_ray(todo, plan, writer, run["startup"], info,
                                     ray_address=ray_address, actors=actors, quiet=quiet)
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
            run["finished"] = utc_now()
            run["status"] = status
            run["counts"] = {"total": len(jobs), **writer.counts}
            if writer.first_result:
                r = writer.first_result
                run["environment"].update(device=r.get("device"), dtype=r.get("dtype"))
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


__all__ = ["RunResult", "run_render", "order_jobs", "group_key", "select_jobs"]
