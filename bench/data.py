"""Data ingest throughput: rows/s of read + decode + preprocess from a local S3 server into training batches.

The Ray Data pipeline (`pipelines.data.dataset`: read tasks -> preprocessing actor pool -> BatchIterator ->
`collate`) against a bare single-process loop doing the same work (pyarrow reads of the same shards from
the same server, `tasks.build_example` per row, `collate` per batch) with one torch thread. Corpus: easy-VQA
rows (64x64 PNGs; vqa, visual_entailment, itm, caption, grounding, image_classification) written as
canonical shards to a SeaweedFS server started for the run (`pipelines.local.s3`).

Image dtypes: "uint8" ships resized pixels from the actors and normalises them in the consumer (the default),
"float32" / "float16" ship normalised tensors.

`--realistic [--rows 20000]` runs the same comparison on a realistic corpus instead: 640x480 JPEGs at quality 90
(crops, flips and noise of the scikit-learn photos, 256 distinct images, so payloads are ~60-100 KB as photos are),
caption rows, preprocessed to 480x480 (OFA's fine-tuning resolution), uint8 pixels. The epoch is long enough that
start-up is under 10% of it (printed). Ray figures are steady state (rows/s over the second half of the epoch; end to end, with the actors'
start-up of ~5-10 s importing torch, is printed beside it). Ratio per core = (Ray rows/s / cores) / (bare rows/s): 1.0 means the pipeline uses
every core as well as the bare loop uses one.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ofa_model.preprocess import PreprocessConfig, collate
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines import storage
from pipelines.data.converters.easyvqa import convert_easy_vqa
from pipelines.data.dataset import ConsumerOptions, DataConfig, epoch_batches
from pipelines.data.ingest import plan_epoch
from pipelines.data.readers.rows import BadRow
from pipelines.data.shards import canonical_schema, write_corpus
from pipelines.local.ray_settings import init_local_ray
from pipelines.local.s3 import CONFLICTING_ENV, local_s3

IMAGES = 300  # easy-VQA train images -> ~6,500 rows
BATCH = 32
SIZES = (128, 256)


def make_corpus(uri: str) -> int:
    rows = [r for r in convert_easy_vqa(splits=["train"], limit=IMAGES) if not isinstance(r, BadRow)]
    manifest = write_corpus(rows, uri, shard_bytes=256 * 2**10, row_group_rows=128)
    return manifest.num_rows


def realistic_rows(n: int, distinct: int = 256, seed: int = 0):
    """`n` caption rows holding 640x480 JPEGs (quality 90) cut from the scikit-learn photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(a) for a in load_sample_images().images]  # 427x640x3
    jpegs = []
    for _ in range(distinct):
        src = photos[int(rng.integers(len(photos)))]
        h, w = src.shape[:2]
        y, x = int(rng.integers(0, h // 4)), int(rng.integers(0, w // 4))
        img = Image.fromarray(src[y:, x:]).resize((640, 480), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (480, 640, 3))
        arr = np.clip(arr, 0, 255).astype(np.uint8)[:, :: 1 if rng.random() < 0.5 else -1]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    for i in range(n):
        yield {"id": f"photo/{i}", "task": "caption", "split": "train", "dataset": "photos",
               "image": jpegs[i % distinct], "target": "a photo", "targets": ["a photo"]}


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
    it = epoch_batches(cfg.replace(batch_size=BATCH), vocab, train=False,
                       options=ConsumerOptions.of(cfg).without_rule())
    stamps, rows = [], []
    for batch in it:
        stamps.append(time.perf_counter() - t0)
        rows.append(len(batch["target"]))
    half = len(stamps) // 2
    steady = sum(rows[half + 1 :]) / (stamps[-1] - stamps[half])
    return steady, sum(rows) / stamps[-1], stamps[0]


def main(argv: list[str] | None = None) -> None:
    import ray

    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--realistic", action="store_true", help="640x480 JPEG corpus at 480x480 (see the docstring)")
    p.add_argument("--rows", type=int, default=20_000, help="rows of the realistic corpus")
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # the bare loop is one core; Ray gives each actor OMP threads = its CPUs
    with tempfile.TemporaryDirectory() as tmp, local_s3(Path(tmp)) as server:
        for name in CONFLICTING_ENV:
            os.environ.pop(name, None)
        os.environ.update(server.env())  # before ray.init: workers inherit it
        uri = server.uri("bench-data")
        t = time.perf_counter()
        if a.realistic:
            manifest = write_corpus(realistic_rows(a.rows), uri, shard_bytes=64 * 2**20, row_group_rows=64)
            num_rows, what, sizes, dtypes = manifest.num_rows, "640x480 JPEG q90 photo", (480,), ("uint8",)
        else:
            num_rows, what, sizes, dtypes = make_corpus(uri), "easy-VQA (64x64 PNG)", SIZES, ("uint8", "float32",
                                                                                              "float16")
        print(f"corpus: {num_rows} {what} rows on local SeaweedFS S3, {time.perf_counter() - t:.1f} s")
        init_local_ray(cores, object_store_bytes=1 * 2**30)
        try:
            vocab = Vocabulary.gpt2()
            actors = cores
            for size in sizes:
                pcfg = PreprocessConfig(patch_image_size=size)
                bare_rows, bare_s = bare_loop(uri, vocab, pcfg)
                bare = bare_rows / bare_s
                for dtype in dtypes:
                    cfg = DataConfig(uri=uri, preprocess=pcfg, batch_size=BATCH, image_dtype=dtype,
                                     num_actors=(actors, actors), actor_num_cpus=(cores - 0.25) / actors,
                                     read_num_cpus=0.25, read_concurrency=1, rows_per_map_batch=32,
                                     prefetch_batches=2)  # rows_per_read_block: the default (sized by bytes)
                    steady, overall, first = ray_pipeline(cfg, vocab)
                    epoch_s = num_rows / overall
                    print(f"S={size} {dtype}: bare 1 process {bare:.0f} rows/s ({bare_s:.0f} s) | Ray Data {actors} "
                          f"actors on {cores} cores {steady:.0f} rows/s steady ({overall:.0f} end to end over "
                          f"{epoch_s:.0f} s, first batch after {first:.1f} s = {first / epoch_s:.0%} of the epoch) | "
                          f"ratio per core {steady / cores / bare:.2f} steady, {overall / cores / bare:.2f} end to end")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
