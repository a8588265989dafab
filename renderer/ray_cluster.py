"""The one Ray start-up used by `castbook render` and `castbook train`.

`start_ray` either joins the cluster at `ray_address` or starts a private local Ray (loopback
only, no dashboard, small object store). Workers always run offline (HF_HUB_OFFLINE etc., see
`worker_env`). It returns whether this process started Ray, i.e. whether the caller must call
`ray.shutdown()` when done.
"""

from __future__ import annotations

import os

# Results cross the object store as PNG bytes or small dicts: Ray's 7.5 GB default is waste.
OBJECT_STORE_BYTES = 300 * 1024 * 1024


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


def start_ray(
    ray_address: str | None,
    *,
    num_cpus: int | None = None,
    resources: dict[str, float] | None = None,
    log_to_driver: bool = True,
    quiet: bool = False,
) -> bool:
    """Connect to `ray_address`, or start a private local Ray when it is None.

    Returns True when this call started (or connected) Ray, so the caller owns it and must call
    `ray.shutdown()`; False when Ray was already initialised in this process (e.g. a test's
    session fixture), which the caller must leave running.

    `num_cpus` (default: every core) and `resources` (custom resources such as `render_slot`)
    apply only to a local Ray; a cluster's nodes declare their own. `log_to_driver` shows the
    workers' prints on this terminal. `quiet` keeps Ray's own start-up messages (info and
    warnings) off the terminal: errors only.
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    common = dict(ignore_reinit_error=True, log_to_driver=log_to_driver, runtime_env={"env_vars": worker_env()},
                  logging_level=logging.ERROR if quiet else logging.INFO)
    if ray_address:
        ray.init(address=ray_address, **common)
    else:
        ray.init(
            # "local": never join a cluster some `ray start` left running (plain init() would).
            address="local",
            num_cpus=num_cpus if num_cpus is not None else max(1, os.cpu_count() or 1),
            resources=resources or None,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            **common,
        )
    return True


__all__ = ["OBJECT_STORE_BYTES", "start_ray", "worker_env"]
