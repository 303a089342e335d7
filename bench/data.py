"""Data ingest throughput: rows/s of read + decode + preprocess from a local S3 server into training batches.

The Ray Data pipeline (`pipelines.dataset`: read tasks -> preprocessing actor pool -> BatchIterator ->
`collate`) against a bare single-process loop doing the same work (pyarrow reads of the same shards from
the same server, `tasks.build_example` per row, `collate` per batch) with one torch thread. Corpus: easy-VQA
rows (64x64 PNGs; vqa, visual_entailment, itm, caption, grounding, image_classification) written as
canonical shards to a SeaweedFS server started for the run (`pipelines.local_s3`).

Image dtypes: "uint8" ships resized pixels from the actors and normalises them in the consumer (the default),
"float32" / "float16" ship normalised tensors. Ray figures are steady state (rows/s over the second half of the epoch; end to end, with the actors'
start-up of ~5-10 s importing torch, is printed beside it). Ratio per core = (Ray rows/s / cores) / (bare rows/s): 1.0 means the pipeline uses
every core as well as the bare loop uses one.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from ofa_model.preprocess import PreprocessConfig, collate
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines import storage
from pipelines.converters.easyvqa import convert_easy_vqa
from pipelines.dataset import DataConfig, build_dataset, iter_train_batches, plan_epoch
from pipelines.local_s3 import CONFLICTING_ENV, local_s3
from pipelines.readers import BadRow
from pipelines.shards import canonical_schema, write_corpus

IMAGES = 300  # easy-VQA train images -> ~6,500 rows
BATCH = 32
SIZES = (128, 256)


def make_corpus(uri: str) -> int:
    rows = [r for r in convert_easy_vqa(splits=["train"], limit=IMAGES) if not isinstance(r, BadRow)]
    manifest = write_corpus(rows, uri, shard_bytes=256 * 2**10, row_group_rows=128)
    return manifest.num_rows


def bare_loop(uri: str, vocab: Vocabulary, pcfg: PreprocessConfig) -> tuple[int, float]:
    """(rows, seconds): read every shard, build_example per row, collate per batch, one process."""
    plan = plan_epoch(DataConfig(uri=uri), train=False)
    rows, batch = 0, []
    t0 = time.perf_counter()
    for shard in plan.shards:
        fs, path = storage.resolve(shard.uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                for row in table.cast(canonical_schema(table.column_names)).to_pylist():
                    batch.append(build_example(TASKS[row["task"]], row, vocab, pcfg))
                    if len(batch) == BATCH:
                        collate(batch, vocab.pad_id)
                        rows += len(batch)
                        batch = []
    if batch:
        collate(batch, vocab.pad_id)
        rows += len(batch)
    return rows, time.perf_counter() - t0


def ray_pipeline(cfg: DataConfig, vocab: Vocabulary) -> tuple[float, float, float]:
    """(steady rows/s over the second half of the rows, end-to-end rows/s, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = iter_train_batches(build_dataset(cfg, vocab, train=False), vocab, BATCH, bad_row_threshold=None,
                            prefetch_batches=cfg.prefetch_batches)
    stamps, rows = [], []
    for batch in it:
        stamps.append(time.perf_counter() - t0)
        rows.append(len(batch["target"]))
    half = len(stamps) // 2
    steady = sum(rows[half + 1 :]) / (stamps[-1] - stamps[half])
    return steady, sum(rows) / stamps[-1], stamps[0]


def main() -> None:
    import ray

    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # the bare loop is one core; Ray gives each actor OMP threads = its CPUs
    with tempfile.TemporaryDirectory() as tmp, local_s3(Path(tmp)) as server:
        for name in CONFLICTING_ENV:
            os.environ.pop(name, None)
        os.environ.update(server.env())  # before ray.init: workers inherit it
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        uri = server.uri("bench-data")
        t = time.perf_counter()
        num_rows = make_corpus(uri)
        print(f"corpus: {num_rows} easy-VQA rows (64x64 PNG) on local SeaweedFS S3, {time.perf_counter() - t:.1f} s")
        ray.init(address="local", num_cpus=cores, object_store_memory=1 * 2**30, include_dashboard=False,
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            vocab = Vocabulary.gpt2()
            actors = cores
            for size in SIZES:
                pcfg = PreprocessConfig(patch_image_size=size)
                bare_rows, bare_s = bare_loop(uri, vocab, pcfg)
                bare = bare_rows / bare_s
                for dtype in ("uint8", "float32", "float16"):
                    cfg = DataConfig(uri=uri, preprocess=pcfg, batch_size=BATCH, image_dtype=dtype,
                                     num_actors=(actors, actors), actor_num_cpus=(cores - 0.25) / actors,
                                     read_num_cpus=0.25, read_concurrency=1, rows_per_map_batch=32, rows_per_read_block=256,
                                     prefetch_batches=2)
                    steady, overall, first = ray_pipeline(cfg, vocab)
                    print(f"S={size} {dtype}: bare 1 process {bare:.0f} rows/s | Ray Data {actors} actors on "
                          f"{cores} cores {steady:.0f} rows/s steady ({overall:.0f} end to end, first batch "
                          f"after {first:.1f} s) | ratio per core {steady / cores / bare:.2f}")
        finally:
            ray.shutdown()
