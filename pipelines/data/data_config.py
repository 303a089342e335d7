"""`DataConfig`: how a corpus becomes training batches, validated on construction (a `config_dataclass`: ranges on
the fields; from YAML via `ofa_model.config_files.load_config`, or `from_dict`).

Kept free of Ray, so a job can parse and check its config before starting a cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from ofa_model.config_files import build, config_dataclass, to_dict
from ofa_model.preprocess import PreprocessConfig
from pipelines.storage import S3Options

__all__ = ["IMAGE_DTYPES", "DataConfig", "read_block_rows"]

# image_dtype -> (numpy dtype, Arrow type) of the shipped image; "uint8" ships pixels, normalised by the consumer
IMAGE_DTYPES = {"uint8": (np.uint8, pa.uint8()), "float32": (np.float32, pa.float32()),
                "float16": (np.float16, pa.float16())}
ImageDtype = Literal["uint8", "float32", "float16"]  # the keys of IMAGE_DTYPES
PreprocessOn = Literal["actors", "tasks"]  # where build_dataset runs preprocessing (DataConfig.preprocess_on)
Names = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], Field(min_length=1)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


@config_dataclass
class SourceSection:
    """Another corpus a mixture draws one task from: its `uri` and `splits` (None: the main corpus's splits)."""

    uri: Annotated[str, Field(min_length=1)]
    splits: Names | None = None


@config_dataclass
class DataConfig:
    """How a corpus becomes training batches. Validated on construction; unknown keys are errors.

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
    num_actors: (min, max) preprocessing actors of a Dataset (in training: of each worker's, per corpus);
    actor_num_cpus: CPUs each; rows_per_map_batch: rows per
    preprocessing call; rows_per_read_block: rows per block handed from reading to preprocessing (the unit
    of work of an actor); null sizes blocks by their preprocessed bytes (`read_block_rows`: ~24 MB of
    images, a multiple of rows_per_map_batch, at most 256 rows), so large images do not hold one actor's
    output beyond the object store's budget while the others wait (at 480x480 uint8: 32 rows).
    read_num_cpus: CPUs per read task; read_concurrency: most read tasks at once (None: Ray decides);
    read_retries: extra attempts on I/O errors.
    max_object_store_bytes: cap on this dataset's object-store use (None: Ray's default). prefetch_batches:
    batches fetched ahead by the consumer. progress_every_s: seconds between progress log lines.
    log_bad_rows: bad rows logged at WARNING per reason (the rest at DEBUG). s3: the S3 endpoint / region (None:
    the environment's); a training or sweep job hands them to every process it starts (`pipelines.job_env`).
    sources: for a mixture, task -> the corpus that task's rows come from when it is not `uri` (its own `uri`
    and `splits`): OFA's pretraining families converted separately, or a new corpus mixed into an old one.
    derive: a mixture's tasks made from their source task's rows as they are preprocessed, as OFA's pretraining
    builds its auxiliary examples (`ofa_model.derived`: itm from captions, qa_matching from VQA,
    grounded_caption from grounding), rather than read from rows of their own.
    derived: set by `pipelines.data.dataset.corpora` on the corpus of a derived task (its rows are the source
    task's, turned into the derived task's); not for config files.
    """

    uri: Annotated[str, Field(min_length=1)]
    splits: Names = ("train",)
    tasks: Names | None = None
    batch_size: Positive = 32
    seed: NonNegative = 0
    shuffle_files: bool = True
    local_shuffle_buffer: NonNegative = 0
    preserve_order: bool = True
    bad_row_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    early_check_rows: Positive = 1000
    early_factor: Annotated[float, Field(ge=1.0)] = 3.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    image_dtype: ImageDtype = "uint8"
    preprocess_on: PreprocessOn = "actors"
    num_actors: tuple[Positive, Positive] = (1, 4)
    actor_num_cpus: PositiveFloat = 1.0
    rows_per_map_batch: Positive = 16
    rows_per_read_block: Positive | None = None
    read_num_cpus: PositiveFloat = 0.5
    read_concurrency: Positive | None = None
    read_retries: NonNegative = 2
    max_object_store_bytes: Positive | None = None
    prefetch_batches: Positive = 1
    progress_every_s: PositiveFloat = 30.0
    log_bad_rows: NonNegative = 20
    s3: S3Options | None = None
    sources: dict[Annotated[str, Field(min_length=1)], SourceSection] = field(default_factory=dict)
    derive: tuple[Literal["itm", "qa_matching", "grounded_caption"], ...] = ()
    derived: Literal["itm", "qa_matching", "grounded_caption"] | None = None

    def __post_init__(self) -> None:
        if self.num_actors[0] > self.num_actors[1]:
            raise ValueError(f"num_actors: (min, max) with min <= max, got {list(self.num_actors)}")

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict; `from_dict(to_dict())` round-trips."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a parsed YAML/JSON mapping, as the loader does (unknown keys anywhere are errors)."""
        return build(cls, d, "DataConfig")


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
