"""The settings of a throwaway single-machine Ray cluster, in one place: the tests' session cluster, the benches,
the demo's head node (`pipelines.local.services.start_ray_head`) and `jobs.serve`'s own local Ray.

`LOCAL_RAY_ENV` is set before Ray starts, so the cluster's processes inherit it (Ray Train propagates it further,
driver to controller to workers):

* `RAY_AUTH_MODE=disabled`: Ray 2.59+ turns token auth on for a new local cluster and writes ~/.ray/auth_token,
  after which any `ray start` on the machine wants the token; a cluster that lives for one run needs neither.
* `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2`: the Train controller drains `ray.train.report` calls at this interval
  (default 2 s): 10 metric-only reports took 18.1 s at the default, 1.9 s at 0.2 (reference/ray.md). The demo
  used 0.5 before this module and the tests and benches 0.2; 0.2 is the measured one.
* `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`: the watcher (an actor per fit, ~2 CPU-seconds to start here) watches
  for nodes being drained; a single local node never is.
* `RAY_DATA_DISABLE_PROGRESS_BARS=1` and `RAY_USAGE_STATS_ENABLED=0`: nothing written to a terminal or sent out.
"""

from __future__ import annotations

import os

LOCAL_RAY_ENV: dict[str, str] = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
TEST_OBJECT_STORE_BYTES = 300 * 2**20  # the tests' and the training benches' object store


def init_local_ray(num_cpus: float | None, *, num_gpus: float | None = None, object_store_bytes: int | None = None,
                   throwaway: bool = True) -> None:
    """`ray.init` of a fresh cluster on this machine (`address="local"`: never RAY_ADDRESS's cluster nor a stale
    one) with `num_cpus` / `num_gpus` logical CPUs / GPUs (None: detected) and an object store of
    `object_store_bytes` (None: Ray's default, 30 % of RAM).

    `throwaway` (tests, benches): `LOCAL_RAY_ENV` set in this process's environment first, no dashboard, the
    workers' logs not streamed to this process, Ray Data's progress bars off. Otherwise (`jobs.serve`, a server
    others may reach): the environment untouched, so Ray's token auth stays on, and the dashboard and the
    replicas' logs as Ray gives them.
    """
    import ray

    if throwaway:
        os.environ.update(LOCAL_RAY_ENV)
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=object_store_bytes,
             include_dashboard=False if throwaway else None, log_to_driver=not throwaway)
    if throwaway:
        ray.data.DataContext.get_current().enable_progress_bars = False
