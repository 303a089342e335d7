"""Grounding learns through the whole path (issue 30: the demo's grounding scored Acc@0.5 0.0, every box the same
and without area).

* A micro model trained by `pipelines.train.train` (Ray Train, data through Ray Data from S3, MLflow) on a
  handful of easy-VQA grounding rows finds every one of their boxes, predicted by `OFAPredictor` from the bundle and
  scored by the project's Acc@0.5. It covers everything between a canonical row and a scored box: box ->
  location-token targets under the training crops, the loss, the checkpointed bundle, the constrained decoding of 4
  location tokens and bins back to image pixels. A slip anywhere (coordinate order, normalisation by the wrong
  side, a shifted bin, an unordered or empty box) keeps a model from fitting even these rows.
* The recipes quantise boxes at OFA's density. With max_image_size equal to easy-VQA's 64-pixel side the image
  spread over all 1000 bins (15.6 a pixel): under the crops each bin was a target 8x less often and a neighbouring
  bin earns nothing in the loss, so the fit above stayed at Acc@0.5 0.06 after 300 updates where 512 gives 0.88.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ofa_model.config_files import build, load_config
from ofa_model.metrics import grounding_accuracy
from ofa_model.predictor import OFAPredictor
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines.data.converters.easyvqa import convert_easy_vqa
from pipelines.data.shards import ShardWriter
from pipelines.train import train
from pipelines.train.train_config import TrainConfig
from tests.recipes import supplied

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ROWS = 16  # grounding rows to fit
COPIES = 64  # each row appears this many times an epoch (distinct ids): 64 updates an epoch, few epoch ends


def _grounding_rows(n: int) -> list[dict]:
    rows = (r for r in convert_easy_vqa(splits=["train"], limit=2 * n) if isinstance(r, dict))
    return [r for r in rows if r["task"] == "grounding"][:n]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return _grounding_rows(ROWS)


@pytest.fixture(scope="module")
def corpus(s3_server, rows) -> str:
    """The rows COPIES times in the train split and once, as they are, in the test split that validates."""
    uri = s3_server.uri("grounding-fit")
    with ShardWriter(uri, created_by="tests/test_grounding_learns.py") as writer:
        for copy in range(COPIES):
            for r in rows:
                writer.write({**r, "id": f"{r['id']}/copy{copy}"})
        for r in rows:
            writer.write({**r, "split": "test"})
        writer.close()
    return uri


def _trains_grounding(cfg: TrainConfig) -> bool:
    return cfg.task == "grounding" or "grounding" in (cfg.mixture or {})


def test_recipes_quantise_boxes_at_ofas_bin_density(rows):
    recipes = {p.relative_to(CONFIGS).as_posix(): load_config(TrainConfig, p, supplied(p))
               for p in sorted([*CONFIGS.glob("finetune/*.yaml"), *CONFIGS.glob("pretrain/*.yaml")])}
    grounding = {name: cfg for name, cfg in recipes.items() if _trains_grounding(cfg)}
    assert {"finetune/grounding_easyvqa.yaml", "pretrain/easyvqa_micro.yaml", "finetune/grounding.yaml"} <= set(grounding)
    for name, cfg in grounding.items():  # bins a resized pixel: 999 / max_image_size; OFA's 512 gives 1.95
        assert 999 / cfg.data.preprocess.max_image_size < 2, name
    # the demo fine-tunes from its pretraining's bundle: a bin must mean the same place in both
    pre, fine = (grounding[n].data.preprocess for n in ("pretrain/easyvqa_micro.yaml", "finetune/grounding_easyvqa.yaml"))
    assert (pre.patch_image_size, pre.max_image_size) == (fine.patch_image_size, fine.max_image_size) == (64, 512)
    vocab = Vocabulary.gpt2()  # so the demo's 64-pixel images span bins 0..125
    whole = build_example(TASKS["grounding"], {**rows[0], "box": [0, 0, 64, 64]}, vocab, fine)["target"]
    assert [t - vocab.bin_offset for t in whole[:4]] == [0, 0, 125, 125]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_micro_model_fits_a_handful_of_grounding_rows(corpus, rows, tmp_path: Path, ray_cluster):
    """640 updates at a constant 1e-3, no dropout or smoothing, validated every 64; `train` returns the best
    epoch's bundle. Measured (2 shared cores): Acc@0.5 0.94 from update 320, 1.0 at 512, 576 and 640; 4.5 min."""
    cfg = build(TrainConfig, {
        "task": "grounding", "epochs": 10, "seed": 0,
        "data": {"uri": corpus, "tasks": ["grounding"], "batch_size": 16, "num_actors": [1, 1],
                 "actor_num_cpus": 0.25, "read_num_cpus": 0.25, "preprocess_on": "tasks", "progress_every_s": 600.0,
                 "preprocess": {"patch_image_size": 64, "max_image_size": 512, "max_src_length": 16,
                                "max_tgt_length": 8}},
        "model": {"arch": "ofa-micro", "regularization": {"dropout": 0.0}},
        "optim": {"lr": 1e-3, "end_lr": 1e-3, "warmup_ratio": 0.05, "label_smoothing": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "run": {"name": "grounding-fit", "storage_path": str(tmp_path / "ray-results"), "keep_checkpoints": 1,
                "log_every_s": 10.0, "precision": "fp32"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test-grounding"},
        "validation": {"split": "test", "max_rows": None, "batch_size": 16},
    })
    out = train(cfg, output_dir=tmp_path / "out")
    assert out.metrics["val/acc50"] == 1.0 and out.metrics["val/rows"] == ROWS

    predictor = OFAPredictor.from_bundle(out.bundle)
    got = predictor.predict("grounding", [{"image": r["image"], "text": r["text"]} for r in rows])
    boxes = [g["box"] for g in got]
    assert all(x0 < x1 and y0 < y1 for x0, y0, x1, y1 in boxes)
    assert grounding_accuracy(boxes, [r["box"] for r in rows]) == 1.0
