"""The two ways jobs reach a `RenderActor`: in this process (`run_local`) or on Ray actors (`run_ray`).

Both take jobs from a `JobQueue` grouped by (base model, control models, LoRA stack), so an actor
keeps its loaded models while it has work, and both hand every `RenderResult` to the run's
`RunWriter` as it arrives. Imports of ray / torch happen inside the functions.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict, deque
from typing import Any

from renderer.writer import RunWriter
from schemas.job import RenderJob
from schemas.plan import Plan

MAX_IN_FLIGHT_PER_ACTOR = 2  # one rendering, one queued: the actor never idles, memory stays bounded
MAX_ATTEMPTS = 2  # a job whose actor died is retried once
MAX_ACTOR_RESTARTS = 2  # per actor slot, before the slot is given up
ACTOR_START_TIMEOUT_S = float(os.environ.get("CASTBOOK_ACTOR_START_TIMEOUT", "600"))


def group_key(job: RenderJob) -> tuple:
    """Jobs with equal keys share a loaded base model, ControlNets and LoRA stack."""
    return (
        job.base_model.digest,
        tuple(c.model.digest for c in job.controls),
        tuple(sorted((l.name, l.digest) for l in job.loras)),
        tuple(sorted((l.name, l.weight) for l in job.loras)),
    )


class JobQueue:
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

    def drain(self) -> list[RenderJob]:
        """Every job left (when no actor is left to render them)."""
        out = []
        while (job := self.next_for(None, set())) is not None:
            out.append(job)
        return out


def actor_performance(plan: Plan) -> dict:
    """The spec's `performance:` settings plus the registry's largest LoRA rank.

    LoRA hotswap pads every adapter to one rank, known before any load.
    """
    performance = dict(plan.performance)
    performance.setdefault("max_lora_rank", plan.max_lora_rank)
    return performance


def run_local(todo: list[RenderJob], plan: Plan, writer: RunWriter, startup: dict, info: dict) -> list[dict]:
    """One `RenderActor` in this process (no Ray); returns its stats."""
    from renderer.actor import RenderActor, quiet_loading_bars

    first = todo[0]
    with quiet_loading_bars():
        t0 = time.perf_counter()
        actor = RenderActor(root=plan.root, performance=actor_performance(plan), base_model=first.base_model,
                            index=0, dtype=first.dtype, warmup_job=first, vae=first.vae)
        startup["actor_start_s"] = round(time.perf_counter() - t0, 4)
        a_info = actor.info()
        startup["model_load_s"] = round(a_info["startup"]["model_load_s"], 4)
        info["actors"] = [a_info]
        queue = JobQueue(todo)
        current = None
        while (job := queue.next_for(current, set())) is not None:
            current = group_key(job)
            writer.result(job, actor.render(job=job))
    return [actor.stats()]


def actor_options(cluster_resources: dict, actors: int, we_started: bool) -> tuple[dict, int, str | None]:
    """Resources for each actor, the actor count that fits, and a warning (or None)."""
    res = cluster_resources
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


class _Slot:
    """One actor position: its current handle, restarts, group and in-flight count."""

    def __init__(self, index: int, handle: Any):
        self.index, self.handle, self.gen, self.restarts = index, handle, 0, 0
        self.group: tuple | None = None
        self.inflight = 0
        self.dead = False


def run_ray(
    todo: list[RenderJob], plan: Plan, writer: RunWriter, startup: dict, info: dict, *,
    ray_address: str | None, actors: int, quiet: bool,
) -> list[dict]:
    """Render on Ray actors (one per GPU/slot), ≤ MAX_IN_FLIGHT_PER_ACTOR jobs each; returns their stats.

    A dead actor is replaced (up to MAX_ACTOR_RESTARTS per slot) and its jobs retried once.
    Raises RuntimeError when the actors cannot start.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    from renderer.actor import RenderActor
    from renderer.ray_cluster import start_ray, worker_env

    # 1. connect, or start a private local Ray (loopback only, small object store, no dashboard)
    t0 = time.perf_counter()
    we_started = start_ray(ray_address, resources=None if ray_address else {"render_slot": actors},
                           log_to_driver=bool(os.environ.get("CASTBOOK_RAY_LOGS")), quiet=quiet)
    startup["ray_init_s"] = round(time.perf_counter() - t0, 4)
    opts, actors, warning = actor_options(ray.cluster_resources(), actors, we_started or ray_address is None)
    if warning and not quiet:
        print(f"castbook: {warning}", file=sys.stderr)
    info["actor_resources"] = {k: v for k, v in opts.items() if k in ("num_gpus", "resources")}

    Actor = ray.remote(RenderActor)
    first = todo[0]
    actor_kwargs = dict(root=str(plan.root), performance=actor_performance(plan), base_model=first.base_model,
                        dtype=first.dtype, warmup_job=first, vae=first.vae)

    def start(index: int):
        return Actor.options(runtime_env={"env_vars": worker_env()}, **opts).remote(index=index, **actor_kwargs)

    n = min(actors, len(todo))
    info["actors_requested"], info["actors_used"] = actors, n
    slots: list[_Slot] = []
    try:
        # 2. start actors and wait until each has loaded its model
        t1 = time.perf_counter()
        slots = [_Slot(i, start(i)) for i in range(n)]
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
        queue = JobQueue(todo)
        inflight: dict[Any, tuple[_Slot, int, RenderJob]] = {}
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
                    ref = s.handle.render.remote(job=job)
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
                        _kill(ray, s.handle)
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
        for job in queue.drain():  # only when every actor slot died
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
            _kill(ray, s.handle)
        if we_started:
            ray.shutdown()


def _kill(ray, handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already dead, or Ray is shutting down: nothing left to stop
        pass
