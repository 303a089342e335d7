"""How a TrainConfig's `scaling` and `run` sections become Ray Train's ScalingConfig and FailureConfig (no
cluster): a fixed world, or an elastic one between scaling.min_workers and num_workers."""

from __future__ import annotations

import socket

import pytest

from ofa_model.config_files import build
from pipelines.train.driver import _answers, _trainer, scaling_of
from pipelines.train.train_config import TrainConfig


def _cfg(**scaling) -> TrainConfig:
    return build(TrainConfig, {"data": {"uri": "s3://b/c"}, "answers": ["yes", "no"],
                               "scaling": {"num_workers": 4, "cpus_per_worker": 0.5, **scaling},
                               "run": {"max_failures": 2, "max_start_failures": 1}})


def test_min_workers_below_num_workers_makes_the_world_elastic():
    fixed = scaling_of(_cfg())
    assert not fixed.elasticity_enabled and fixed.num_workers == 4
    assert _cfg().scaling.least_workers == 4 and _cfg(min_workers=4).scaling.least_workers == 4
    assert not scaling_of(_cfg(min_workers=4)).elasticity_enabled  # min = num: fixed, as the default
    elastic = scaling_of(_cfg(min_workers=1, resources_per_worker={"train_slot": 1}))
    assert elastic.elasticity_enabled and (elastic.min_workers, elastic.max_workers) == (1, 4)
    assert elastic.resources_per_worker == {"CPU": 0.5, "train_slot": 1.0}
    gpu = scaling_of(_cfg(use_gpu=True, gpus_per_worker=1, min_workers=2))
    assert gpu.resources_per_worker == {"CPU": 0.5, "GPU": 1.0} and (gpu.min_workers, gpu.max_workers) == (2, 4)


def test_restarts_and_start_failures_reach_the_failure_config():
    failure = _trainer(_cfg(), "vqa_score", "max", (), {}).run_config.failure_config
    assert (failure.max_failures, failure.controller_failure_limit) == (2, 1)


def test_min_workers_above_num_workers_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"scaling.min_workers \(5\) must not exceed scaling.num_workers \(4\)"):
        _cfg(min_workers=5)


def test_a_node_whose_raylet_takes_no_connection_counts_as_lost():
    """The driver's probe of a node Ray still counts alive (its health checks take seconds): a listening port
    answers, the same port once closed does not."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    assert _answers("127.0.0.1", port)
    server.close()
    assert not _answers("127.0.0.1", port, timeout_s=0.5)
