"""`DataConfig`: how a corpus becomes training batches, validated on construction (YAML via `from_dict`).

Kept free of Ray, so a job can parse and check its config before starting a cluster.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ofa_model.config import check_keys
from ofa_model.preprocess import PreprocessConfig
from pipelines.storage import S3Options

__all__ = ["IMAGE_DTYPES", "PREPROCESS_ON", "DataConfig", "read_block_rows"]

# image_dtype -> (numpy dtype, Arrow type) of the shipped image; "uint8" ships pixels, normalised by the consumer
IMAGE_DTYPES = {"uint8": (np.uint8, pa.uint8()), "float32": (np.float32, pa.float32()),
                "float16": (np.float16, pa.float16())}
PREPROCESS_ON = ("actors", "tasks")  # where build_dataset runs preprocessing (DataConfig.preprocess_on)


@dataclass(frozen=True)
class DataConfig:
    """How a corpus becomes training batches. Validated on construction; `from_dict` rejects unknown keys.

    uri: corpus directory (local, file:// or s3://). splits / tasks: what `build_dataset` reads by default
    (tasks None: every task in the manifest). batch_size: rows per training batch. seed: shard order,
    local shuffle and per-row augmentation. shuffle_files: permute shards per epoch when training.
    local_shuffle_buffer: rows in the consumer's shuffle buffer (0: off). preserve_order: deterministic
    block order (same seed -> same id order) at some throughput cost. bad_row_threshold: max bad fraction
    of an epoch, checked at its end; before the end (once early_check_rows rows were seen) an epoch fails
    only when it can no longer stay under the threshold, or, when its size is unknown, when the bad fraction
    is early_factor times the threshold (see `pipelines.data.rowstats.BadRowRule`). image_dtype: what the actors
    ship per image: "uint8" resized pixels (normalised by the consumer; 1/4 of float32's bytes), "float32" or
    "float16" normalised tensors.
    preprocess_on: "actors" (a pool of long-lived preprocessing actors, each building the vocabulary once:
    for corpora that take minutes or more) or "tasks" (preprocessing fused into the read tasks, which run in
    Ray's pooled worker processes, reused across epochs and runs: no actor start per dataset, ~0.2 s to
    rebuild the vocabulary per task; for short runs on small corpora: tests, the quick demo).
    num_actors: (min, max) preprocessing actors; actor_num_cpus: CPUs each; rows_per_map_batch: rows per
    preprocessing call; rows_per_read_block: rows per block handed from reading to preprocessing (the unit
    of work of an actor); null sizes blocks by their preprocessed bytes (`read_block_rows`: ~24 MB of
    images, a multiple of rows_per_map_batch, at most 256 rows), so large images do not hold one actor's
    output beyond the object store's budget while the others wait (at 480x480 uint8: 32 rows).
    read_num_cpus: CPUs per read task; read_concurrency: most read tasks at once (None: Ray decides);
    read_retries: extra attempts on I/O errors.
    max_object_store_bytes: cap on this dataset's object-store use (None: Ray's default). prefetch_batches:
    batches fetched ahead by the consumer. progress_every_s: seconds between progress log lines.
    log_bad_rows: bad rows logged at WARNING per reason (the rest at DEBUG). s3: endpoint / region overrides.
    """

    uri: str
    splits: tuple[str, ...] = ("train",)
    tasks: tuple[str, ...] | None = None
    batch_size: int = 32
    seed: int = 0
    shuffle_files: bool = True
    local_shuffle_buffer: int = 0
    preserve_order: bool = True
    bad_row_threshold: float = 0.01
    early_check_rows: int = 1000
    early_factor: float = 3.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    image_dtype: str = "uint8"
    preprocess_on: str = "actors"
    num_actors: tuple[int, int] = (1, 4)
    actor_num_cpus: float = 1.0
    rows_per_map_batch: int = 16
    rows_per_read_block: int | None = None
    read_num_cpus: float = 0.5
    read_concurrency: int | None = None
    read_retries: int = 2
    max_object_store_bytes: int | None = None
    prefetch_batches: int = 1
    progress_every_s: float = 30.0
    log_bad_rows: int = 20
    s3: S3Options | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"DataConfig.uri must be a non-empty string, got {self.uri!r}")
        for name in ("splits", "tasks"):
            value = getattr(self, name)
            if value is None and name == "tasks":
                continue
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"DataConfig.{name} must be a non-empty list of names, got {value!r}")
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"DataConfig.{name} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("batch_size", "rows_per_map_batch", "early_check_rows", "prefetch_batches"):
            _check_int(self, name, minimum=1)
        if self.rows_per_read_block is not None:
            _check_int(self, "rows_per_read_block", minimum=1)
        for name in ("seed", "local_shuffle_buffer", "read_retries", "log_bad_rows"):
            _check_int(self, name, minimum=0)
        for name in ("shuffle_files", "preserve_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        _check_number(self, "bad_row_threshold", 0.0, 1.0)
        _check_number(self, "early_factor", 1.0, math.inf)
        _check_number(self, "actor_num_cpus", 0.0, math.inf, open_low=True)
        _check_number(self, "read_num_cpus", 0.0, math.inf, open_low=True)
        _check_number(self, "progress_every_s", 0.0, math.inf, open_low=True)
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"DataConfig.image_dtype must be one of {list(IMAGE_DTYPES)}, got {self.image_dtype!r}")
        if self.preprocess_on not in PREPROCESS_ON:
            raise ValueError(f"DataConfig.preprocess_on must be one of {list(PREPROCESS_ON)}, got "
                             f"{self.preprocess_on!r}")
        actors = self.num_actors
        if (not isinstance(actors, (tuple, list)) or len(actors) != 2
                or not all(isinstance(a, int) and not isinstance(a, bool) for a in actors)
                or not 1 <= actors[0] <= actors[1]):
            raise ValueError(f"DataConfig.num_actors must be (min, max) with 1 <= min <= max, got {actors!r}")
        object.__setattr__(self, "num_actors", tuple(actors))
        for name in ("max_object_store_bytes", "read_concurrency"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"DataConfig.preprocess must be a PreprocessConfig, got {type(self.preprocess).__name__}")
        if self.s3 is not None and not isinstance(self.s3, S3Options):
            raise ValueError(f"DataConfig.s3 must be S3Options or None, got {type(self.s3).__name__}")

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict; `from_dict(to_dict())` round-trips."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["splits"] = list(self.splits)
        out["tasks"] = None if self.tasks is None else list(self.tasks)
        out["num_actors"] = list(self.num_actors)
        out["preprocess"] = self.preprocess.to_dict()
        out["s3"] = None if self.s3 is None else dataclasses.asdict(self.s3)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a parsed YAML/JSON mapping; unknown keys (here, in `preprocess` or `s3`) raise ValueError."""
        check_keys(cls, d)
        kw = dict(d)
        if isinstance(kw.get("preprocess"), Mapping):
            kw["preprocess"] = PreprocessConfig.from_dict(dict(kw["preprocess"]))
        if isinstance(kw.get("s3"), Mapping):
            check_keys(S3Options, kw["s3"], "DataConfig.s3")
            kw["s3"] = S3Options(**kw["s3"])
        return cls(**kw)


def _check_int(cfg: Any, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= {minimum}, got {value!r}")


def _check_number(cfg: Any, name: str, low: float, high: float, open_low: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{type(cfg).__name__}.{name} must be a number in {bound}, got {value!r}")


READ_BLOCK_BYTES = 24 * 2**20  # preprocessed image bytes per read block when rows_per_read_block is null
MAX_READ_BLOCK_ROWS = 256


def read_block_rows(cfg: DataConfig) -> int:
    """Rows per read block: `cfg.rows_per_read_block`, or (null) as many as make ~READ_BLOCK_BYTES of
    preprocessed images, rounded down to a multiple of rows_per_map_batch, within [rows_per_map_batch, 256].

    Measured (bench/data.py --realistic, 480x480 uint8, 2 actors on 2 cores): 256-row blocks (177 MB each) kept
    one actor busy and the other idle, 0.35 of the bare loop per core; 64 rows 0.70, 32 rows 0.88."""
    if cfg.rows_per_read_block is not None:
        return cfg.rows_per_read_block
    itemsize = np.dtype(IMAGE_DTYPES[cfg.image_dtype][0]).itemsize
    row_bytes = 3 * cfg.preprocess.patch_image_size ** 2 * itemsize
    step = cfg.rows_per_map_batch
    rows = (READ_BLOCK_BYTES // row_bytes) // step * step
    return max(step, min(rows, MAX_READ_BLOCK_ROWS))
