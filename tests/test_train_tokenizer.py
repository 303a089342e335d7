"""Training the image tokenizer (`jobs.train_tokenizer`, `pipelines.train.tokenizer`) on the real stack: the job's
`main` on the session's local Ray, an easy-VQA corpus and the output on SeaweedFS (S3), MLflow on sqlite.

The run is small (32 px images, a few dozen steps of 8); it must still learn: the held-out PSNR, recomputed here
from the saved bundle and the corpus's images, rises well above the untrained tokenizer's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from mlflow import MlflowClient

from jobs import train_tokenizer as job
from ofa_model.config_files import load_config
from ofa_model.preprocess import PreprocessConfig, decode_image
from ofa_model.vqgan import VQGAN, load_tokenizer, resized_uint8, to_uint8
from pipelines import storage
from pipelines.data.converters import prepare
from pipelines.data.shards import iter_rows
from pipelines.job_env import SETTINGS_VARS
from pipelines.train.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from pipelines.train.tokenizer import _step, code_usage, plan_steps, usage_loss
from pipelines.train.tokenizer_config import TokenizerTrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/tokenizer/vqgan_easyvqa_micro.yaml"
STEPS, SIZE, VAL = 40, 32, 32


@pytest.fixture(scope="module")
def corpus(s3_server) -> str:
    uri = s3_server.uri("tokenizer-corpus")
    prepare("easy-vqa", {}, uri, limit=60)
    return uri


@pytest.fixture
def job_settings(monkeypatch):
    """The job's `init_ray` writes its settings into os.environ: restore them after the test."""
    for name in SETTINGS_VARS:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def _overrides(corpus: str, storage_path: str, db: Path, name: str) -> list[str]:
    return [f"data.uri={corpus}", "data.batch_size=8", f"model.overrides={{resolution: {SIZE}}}", f"steps={STEPS}",
            "gumbel.decay=0.05", "optim.warmup_ratio=0.1", f"validation.max_images={VAL}", "validation.every=20",
            f"run.name={name}", f"run.storage_path={storage_path}", "run.log_every=10",
            "scaling.cpus_per_worker=0.5", "scaling.threads_per_worker=1",
            f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=test-tokenizer",
            "tracking.system_metrics_every_s=0"]


def _held_out(corpus: str, n: int) -> np.ndarray:
    """The first n test-split images of the corpus's image_classification rows, (n, SIZE, SIZE, 3) uint8."""
    rows = iter_rows(corpus, columns=["id", "image"], splits=["test"], tasks=["image_classification"])
    images = [decode_image(r["image"], PreprocessConfig(), r["id"]) for _, r in zip(range(n), rows, strict=False)]
    return resized_uint8(images, SIZE)


def _psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of 10 log10(255^2 / MSE), on uint8 pixels (the job's is on [-1, 1]: the same figure)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / mse)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_job_trains_a_tokenizer_that_reconstructs_held_out_images(corpus, s3_server, tmp_path, ray_cluster,
                                                                     job_settings, capsys):
    db, out_root = tmp_path / "mlflow.db", s3_server.uri("tokenizer-runs")
    job.main(["--config", str(CONFIG), *_overrides(corpus, out_root, db, "tok1")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"] == storage.join(out_root, "tok1", "tokenizer") and summary["steps"] == STEPS
    m = summary["metrics"]

    # the bundle, from S3, reconstructs the held-out images as well as the job says, far better than at init
    local = tmp_path / "bundle"
    local.mkdir()
    fs, path = storage.resolve(summary["tokenizer"])
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    tok = load_tokenizer(local)
    assert tok.config.resolution == SIZE and tok.metadata["steps"] == STEPS
    assert tok.metadata["data_fingerprint"] == summary["data_fingerprint"] and tok.metadata["metrics"] == m
    images = _held_out(corpus, VAL)
    codes = tok.model.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert codes.shape == (VAL, (SIZE // 8) ** 2)
    after = _psnr_uint8(tok.decode_codes(codes), images)
    assert after == pytest.approx(m["val/psnr"], abs=0.1)
    torch.manual_seed(0)  # run.seed: the worker's initial weights
    untrained = VQGAN(tok.config).eval()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        before = _psnr_uint8(to_uint8(untrained.decode(untrained.encode(x))), images)
    assert before == pytest.approx(m["val/psnr_init"], abs=0.1)
    assert after > before + 4.0, (before, after)
    used = np.unique(codes.numpy())
    assert m["val/used_codes"] == len(used) and m["val/dead_codes"] == tok.config.n_embed - len(used)
    hist = np.bincount(codes.numpy().ravel(), minlength=tok.config.n_embed) / codes.numel()
    assert m["val/perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in hist if p > 0)), rel=1e-6)

    # MLflow: the run's metrics every log_every steps, validation every 20, progress to 1, the bundle as artifact
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["tokenizer_uri"] == summary["tokenizer"]
    assert run.data.params["steps"] == str(STEPS) and run.data.params["model.arch"] == "vqgan-micro"
    for key in ("train/loss", "train/l1", "train/l2", "train/kl", "train/psnr", "train/perplexity",
                "train/dead_codes", "train/dead_share", "train/temperature", "train/lr", "train/steps_per_s",
                "progress/fraction", "progress/eta_s"):
        assert [h.step for h in client.get_metric_history(run.info.run_id, key)] == [10, 20, 30, 40], key
    assert [h.value for h in client.get_metric_history(run.info.run_id, "progress/fraction")][-1] == 1.0
    taus = [h.value for h in client.get_metric_history(run.info.run_id, "train/temperature")]
    assert taus == sorted(taus, reverse=True)
    assert taus[-1] == pytest.approx(math.exp(-0.05 * (STEPS - 1)))  # the last step's: exp(-decay * step)
    dead = client.get_metric_history(run.info.run_id, "train/dead_codes")
    used_train = client.get_metric_history(run.info.run_id, "train/used_codes")
    assert all(d.value + u.value == tok.config.n_embed for d, u in zip(dead, used_train, strict=True))
    psnr_curve = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "val/psnr"))
    assert [s for s, _ in psnr_curve] == [20, STEPS] and psnr_curve[-1][1] == m["val/psnr"]
    assert [h.step for h in client.get_metric_history(run.info.run_id, "val/psnr_init")] == [0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "tokenizer")}
    assert artifacts == {"tokenizer/config.json", "tokenizer/model.safetensors"}

    # the same run name again is refused before anything starts, naming the key and the way out
    with pytest.raises(SystemExit) as exc:
        job.main(["--config", str(CONFIG), *_overrides(corpus, out_root, db, "tok1")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "run.name: a tokenizer is already at" in err and "run.overwrite=true" in err


@pytest.mark.parametrize("override,message", [
    ("gumbel.floor=2.0", "gumbel.floor (2.0) must not exceed gumbel.start (1.0)"),
    ("optim.betas=[0.9, 1.5]", "optim.betas.1: Input should be less than or equal to 0.999999"),
    ("model.overrides={n_embed: 1}", "model.arch / model.overrides: VQGANConfig.n_embed"),
    ("model.overrides={colour: 3}", "model.arch / model.overrides:"),
    ("model.arch=vqgan-huge", "unknown tokenizer architecture 'vqgan-huge'"),
    ("loss={l1: 0.0, l2: 0.0}", "loss.l1 / loss.l2: at least one reconstruction weight must be positive"),
    ("validation.split=train", "validation.split: 'train' is also trained on"),
    ("epochs=3", "steps / epochs: set exactly one of them"),
    ("data.batch_size=0", "data.batch_size: Input should be greater than or equal to 1"),
    ("adversarial.weight=-1", "adversarial.weight: Input should be greater than or equal to 0"),
    ("data.shuffle_bufer=3", "data.shuffle_bufer: unknown key"),
])
def test_bad_config_values_are_refused_naming_the_key(override, message, capsys):
    with pytest.raises(SystemExit) as exc:
        job.main(["--config", str(CONFIG), "data.uri=/nonexistent", override])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{CONFIG}: " in err and message in err, err


def test_the_shipped_config_needs_its_corpus_and_refuses_a_missing_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        job.main(["--config", str(CONFIG)])
    assert "data.uri is required: pass data.uri=..." in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked before Ray starts
        job.main(["--config", str(CONFIG), f"data.uri={tmp_path}"])
    assert f"data.uri: no manifest.json in {tmp_path}" in capsys.readouterr().err
    cfg = load_config(TokenizerTrainConfig, CONFIG, ["data.uri=s3://test-bucket/easy-vqa", "steps=null", "epochs=2"])
    assert plan_steps(cfg, 3837) == 2 * (3837 // 16) and cfg.model.architecture().num_codes == 64


def test_codebook_usage_and_the_temperature_schedule():
    usage = code_usage(torch.tensor([3, 1, 0, 0]))
    assert usage["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert (usage["used_codes"], usage["dead_codes"], usage["dead_share"]) == (2, 2, 0.5)
    assert code_usage(torch.ones(8, dtype=torch.long))["perplexity"] == pytest.approx(8.0)
    cfg = load_config(TokenizerTrainConfig, CONFIG, ["data.uri=x", "gumbel={start: 1.0, floor: 0.25, decay: 0.01}"])
    assert cfg.gumbel.temperature(0) == 1.0
    assert cfg.gumbel.temperature(50) == pytest.approx(math.exp(-0.5))
    assert cfg.gumbel.temperature(1000) == 0.25


def test_the_usage_loss_is_the_kl_of_the_average_code_distribution_to_uniform():
    """0 when the batch uses every code alike (whatever each position prefers), log n when all pick one code."""
    n = 16
    spread = torch.full((2, n, 4, 4), -30.0)  # 32 positions, each sure of its own code, two per code
    for i in range(32):
        spread[i // 16, i % n, (i % 16) // 4, i % 4] = 30.0
    assert float(usage_loss(spread)) == pytest.approx(0.0, abs=1e-5)
    collapsed = torch.full((2, n, 4, 4), -30.0)
    collapsed[:, 3] = 30.0
    assert float(usage_loss(collapsed)) == pytest.approx(math.log(n), abs=1e-4)
    p = torch.softmax(torch.randn(n), 0)
    logits = p.log()[None, :, None, None].expand(1, n, 2, 2)
    assert float(usage_loss(logits)) == pytest.approx(float((p * (p * n).log()).sum()), abs=1e-5)


def test_an_adversarial_step_trains_the_discriminator_with_hinge_losses():
    d = PatchDiscriminator(layers=2, channels=8)
    assert d(torch.zeros(3, 3, 32, 32)).shape == (3, 1, 8, 8)
    for layers, channels in ((3, 36), (4, 3), (3, 64)):  # widths 144, 24 or 512: groups divide every one
        out = PatchDiscriminator(layers=layers, channels=channels)(torch.zeros(1, 3, 64, 64))
        assert out.shape == (1, 1, 64 >> layers, 64 >> layers)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_g_loss(fake)) == pytest.approx(1.0)

    cfg = load_config(TokenizerTrainConfig, CONFIG, [
        "data.uri=x", f"model.overrides={{resolution: {SIZE}}}", "adversarial={enabled: true, start: 1, layers: 2, "
        "channels: 8}"])
    torch.manual_seed(0)
    model = VQGAN(cfg.model.architecture())
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    disc = PatchDiscriminator(2, 8)
    d_opt = torch.optim.Adam(disc.parameters(), 1e-3)
    x = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    before = [p.detach().clone() for p in disc.parameters()]
    parts, codes = _step(cfg, model, model, opt, sched, (disc, disc, d_opt), x, step=0)
    assert "d_loss" not in parts and codes.shape == (2, SIZE // 8, SIZE // 8)  # before adversarial.start
    assert all(torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
    parts, _ = _step(cfg, model, model, opt, sched, (disc, disc, d_opt), x, step=1)
    assert {"d_loss", "g_adv"} <= set(parts) and parts["loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters(), strict=True))
    assert all(p.requires_grad for p in disc.parameters())


def test_an_overwritten_s3_tokenizer_is_uploaded_before_the_old_files_go(s3_server, tmp_path):
    """run.overwrite on S3: the new bundle replaces the old one file by file, a file only the old bundle had is
    removed afterwards, and the result loads; the old bundle stays whole until the upload starts."""
    from pipelines.train.tokenizer import _save

    out = s3_server.uri("tokenizer-overwrite") + "/tok/tokenizer"
    cfg = load_config(TokenizerTrainConfig, CONFIG, ["data.uri=x", f"model.overrides={{resolution: {SIZE}}}",
                                                     "run.overwrite=true"])
    fs, path = storage.resolve(out)
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/stale.bin") as f:
        f.write(b"old")
    torch.manual_seed(0)
    raw = VQGAN(cfg.model.architecture())
    _save(cfg, raw, {"output": out, "data_fingerprint": "f"}, 1, {})
    names = sorted(i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    assert names == ["config.json", "model.safetensors"]
    local = tmp_path / "bundle"
    local.mkdir()
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    tok = load_tokenizer(local)
    assert all(torch.equal(a, b) for a, b in zip(tok.model.state_dict().values(), raw.state_dict().values(),
                                                  strict=True))
