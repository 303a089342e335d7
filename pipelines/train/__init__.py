"""Training on Ray Train. Callers import from here:

    from pipelines.train import train
    outcome = train(cfg)   # a TrainConfig (pipelines.train.train_config) -> TrainOutcome

The modules: `config` (the job config), `setup` (model, vocabulary, tasks; what an init bundle contributes),
`driver` (`train`: fits, scaling, the best bundle), `worker` (the loop each Ray Train worker runs), `step`
(forward-and-loss, optimizer update), `optim` (optimizer, schedule, EMA, freezing) and `checkpointing`
(checkpoint contents, where a run resumes).

The names below are imported on first use (PEP 562), so that importing `pipelines.train.train_config` does not
import Ray (~2 s of CPU).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "driver", "TrainOutcome": "driver", "task_specs": "setup", "steps_per_epoch": "worker",
    "latest_state_summary": "checkpointing", "read_state": "checkpointing", "BUNDLE_DIR": "checkpointing",
    "STATE_JSON": "checkpointing", "CheckpointStorageError": "checkpointing", "state_summaries": "checkpointing",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
