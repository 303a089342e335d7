"""`jobs.evaluate` throughput: the single process against Ray Data actor pools, side by side in one run.

    python -m bench.evaluate [--rows 2000] [--arch ofa-micro] [--mode allcand] [--batch-size 16] [--workers 1,2]

Converts easy-VQA's test split (`pipelines.data.converters.prepare`, enough images for `--rows` VQA rows) into a
temporary corpus, saves a bundle of `--arch` with fresh weights (throughput does not depend on what the weights
learnt), and evaluates the first `--rows` VQA rows with `evaluate_corpus` (one process, what `jobs.evaluate`
runs without --workers) and with `evaluate_on_ray` for each pool size in `--workers` (one CPU per actor) on a
fresh local Ray of `--ray-cpus` logical CPUs. Rows/s is rows over the whole call's wall time, model loading,
actor start-up and scoring included, as a user waits for it. Each run's metrics must be equal; the table says
so. Torch threads: the single process uses torch's default (every core); Ray gives each actor
OMP_NUM_THREADS = its CPUs (1).

Measured on this project's 2-core CPU, quiet, after the warm-up described below (allcand over the easy-VQA
answer set, batch 16, fresh weights):

    --rows 2000 (ofa-micro)      rows   wall s   rows/s  vs one
    one process (2 threads)      2000      6.8   294.30   1.00x
    Ray Data, 1 actor            2000     13.1   152.53   0.52x
    Ray Data, 2 actors           2000     11.4   175.03   0.59x
    --rows 600 --arch ofa-tiny
    one process (2 threads)       600      9.6    62.53   1.00x
    Ray Data, 1 actor             600     19.9    30.10   0.48x
    Ray Data, 2 actors            600     14.3    41.90   0.67x
    metrics equal in every scenario: True (both runs)

On two cores the pool cannot win: the one process already runs two torch threads, and each pool pays its
actors' start and model load, Ray Data's scheduling, the Parquet file and the MLflow run. Two actors beat one
(1.15x micro, 1.39x tiny); the pool is for nodes and GPUs, one actor each, where the single process has no way
to use them. An earlier run on a loaded machine had the 1-actor scenario pay the cluster's cold start; an
untimed warm-up evaluation of a few rows on the largest pool now runs first, so every pool is timed on a warm
cluster (each still starts its own actors and loads the model, as a user's run does).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from pipelines.local.ray_settings import TEST_OBJECT_STORE_BYTES, init_local_ray

IMAGES_PER_ROW = 0.2  # easy-VQA test: ~5 questions per image; ask for a margin of images


def _bundle(arch: str, path: Path) -> Path:
    from ofa_model.architecture import get_config
    from ofa_model.bundle import save_bundle
    from ofa_model.model import OFAModel
    from ofa_model.preprocess import PreprocessConfig
    from ofa_model.vocab import Vocabulary

    torch.manual_seed(0)
    return save_bundle(path, OFAModel(get_config(arch)).eval(), Vocabulary.gpt2(),
                       preprocess=PreprocessConfig(patch_image_size=64))


def run(rows: int, arch: str, mode: str, batch_size: int, workers: list[int], ray_cpus: int) -> list[dict]:
    """One result per scenario: name, rows, wall_s, rows_per_s, the primary metric."""
    import ray

    from pipelines.data.converters import prepare
    from pipelines.data.converters.easyvqa import answer_set
    from pipelines.evaluate import Pool, evaluate_corpus, evaluate_on_ray

    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = str(tmp / "corpus")
        summary = prepare("easy-vqa", {}, corpus, splits=["test"], limit=max(10, int(rows * IMAGES_PER_ROW) + 10),
                          log_every_s=600)
        available = summary["counts"]["test"].get("vqa", 0)
        if available < rows:
            raise SystemExit(f"the corpus holds {available} easy-VQA test questions, fewer than --rows {rows}")
        bundle = str(_bundle(arch, tmp / "bundle"))
        cands = list(answer_set()) if mode != "open" else None
        common = dict(split="test", limit=rows, mode=mode, candidates=cands, batch_size=batch_size)
        torch.set_flush_denormal(True)  # as jobs.evaluate does

        start = time.perf_counter()
        single = evaluate_corpus(bundle, corpus, "vqa", **common)
        results.append(_result(f"one process ({torch.get_num_threads()} threads)", rows, start, single.metrics))
        init_local_ray(ray_cpus, object_store_bytes=TEST_OBJECT_STORE_BYTES)
        try:
            # untimed: the cluster's cold start (Ray Data's first read, worker processes importing torch) is paid
            # here, not by whichever pool runs first
            evaluate_on_ray(bundle, corpus, "vqa", **{**common, "limit": min(rows, 2 * batch_size)},
                            pool=Pool(workers=max(workers)), tracking=f"sqlite:///{tmp / 'mlflow.db'}",
                            progress_every_s=600.0)
            for n in workers:
                start = time.perf_counter()
                out = evaluate_on_ray(bundle, corpus, "vqa", **common, pool=Pool(workers=n),
                                      tracking=f"sqlite:///{tmp / 'mlflow.db'}", progress_every_s=30.0)
                results.append(_result(f"Ray Data, {n} actor{'s' * (n > 1)}", rows, start, out.metrics))
        finally:
            ray.shutdown()
    return results


def _result(name: str, rows: int, start: float, metrics: dict[str, float]) -> dict:
    wall = time.perf_counter() - start
    return {"name": name, "rows": rows, "wall_s": wall, "rows_per_s": rows / wall, "vqa_score": metrics["vqa_score"]}


def table(results: list[dict]) -> str:
    base = results[0]
    lines = [f"{'scenario':<26} {'rows':>6} {'wall s':>8} {'rows/s':>8} {'vs one':>7} {'vqa_score':>10}"]
    for r in results:
        lines.append(f"{r['name']:<26} {r['rows']:>6} {r['wall_s']:>8.1f} {r['rows_per_s']:>8.2f} "
                     f"{r['rows_per_s'] / base['rows_per_s']:>6.2f}x {r['vqa_score']:>10.6f}")
    same = all(r["vqa_score"] == base["vqa_score"] for r in results)
    lines.append(f"metrics equal in every scenario: {same}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="easy-VQA test rows to evaluate")
    p.add_argument("--arch", default="ofa-micro")
    p.add_argument("--mode", choices=("open", "trie", "allcand"), default="allcand")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="1,2", help="comma-separated actor pool sizes")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pipelines.evaluate").setLevel(logging.INFO)  # the progress lines
    results = run(args.rows, args.arch, args.mode, args.batch_size, [int(w) for w in args.workers.split(",")],
                  args.ray_cpus)
    print(table(results))


if __name__ == "__main__":
    main()
