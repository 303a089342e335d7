"""Training the image tokenizer (`ofa_model.vqgan.VQGAN`) from scratch on Ray Train, tracked in MLflow.

    outcome = train_tokenizer(load_config(TokenizerTrainConfig, "configs/tokenizer/vqgan_easyvqa_micro.yaml", o))

* The driver plans the training images from the corpus's manifest (`plan_shards`: the shards of data.splits and
  data.tasks), reads them with the ingest's own reader (`ShardSource`: unreadable shards become marker rows, not
  failures) and decodes them on Ray Data (`_decode`: OFA's image limits, a Lanczos resize to the tokenizer's
  resolution, uint8). With data.cache the decoded images are materialized once in the object store, so the later
  epochs cost no reading or decoding. Ray Train splits the Dataset across the workers (`streaming_split`, equal
  shares), and each worker repeats its share epoch after epoch, locally shuffled, until `steps` updates are done.
* A step (`_step`): a Gumbel-softmax sample of the codebook at temperature tau(step) (annealed, `GumbelSection`),
  the reconstruction loss l1 |x - x'| + l2 (x - x')^2 plus the quantizer's KL, optionally a PatchGAN hinge loss
  (`pipelines.train.discriminator`) from `adversarial.start` on; Adam(W) under DDP when there are several workers.
* Every `run.log_every` steps rank 0 logs the means of the loss parts over the window, the batch's PSNR, the
  codebook usage of the window (the argmax codes of every worker's images, all-reduced: perplexity exp(H) of
  their histogram, and the codes never used), tau, learning rate and progress (rate, ETA: `pipelines.progress`)
  to the console and MLflow.
* Held-out images of `validation.split` are reconstructed through the tokenizer's own path (argmax codes, then
  `decode`) before the first step, every `validation.every` steps and after the last (`val/psnr`, `val/perplexity`, `val/dead_codes`, ...).
  Rank 0 then saves the tokenizer bundle (`ofa_model.vqgan.save_tokenizer`; metadata: the job's config, steps,
  final metrics, the data fingerprint) to `<run.storage_path>/<run.name>/tokenizer`, local or s3://; the driver
  logs it as the MLflow artifact `tokenizer` and tags the run with its URI.

A restarted worker group (run.max_failures) trains from the start: the job keeps no checkpoints of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import FailureConfig, RunConfig
from ray.train.torch import TorchTrainer

from ofa_model.config_files import build, flatten, to_dict
from ofa_model.errors import BAD_IMAGE, EMPTY_IMAGE, ConfigError, InputError
from ofa_model.preprocess import PreprocessConfig, decode_image
from ofa_model.vqgan import VQGAN, from_uint8, psnr, resized_uint8, save_tokenizer
from pipelines import storage
from pipelines.data.schema import FIELDS
from pipelines.data.shards import Manifest, iter_rows, read_manifest
from pipelines.data.source import ShardSource, plan_shards
from pipelines.job_env import job_tracking_uri
from pipelines.progress import Progress
from pipelines.tracking.runs import (
    MetricLogger,
    end_run,
    patiently,
    run_key,
    start_or_resume_run,
    system_metrics,
)
from pipelines.train.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from pipelines.train.driver import scaling_of
from pipelines.train.optim import build_optimizer, build_scheduler
from pipelines.train.tokenizer_config import TokenizerTrainConfig
from pipelines.train.worker import metrics_delivered

logger = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # under <storage_path>/<name>/, and the MLflow artifact's path


@dataclass(frozen=True)
class TokenizerOutcome:
    run_name: str
    mlflow_run_id: str
    tokenizer: str  # the bundle's URI (local path or s3://)
    steps: int
    images: int  # training images in the plan (one epoch)
    metrics: dict[str, float]  # the final ones: val/psnr, val/perplexity, ... and val/psnr_init
    data_fingerprint: str


def output_uri(cfg: TokenizerTrainConfig) -> str:
    """Where the run's tokenizer bundle goes: <run.storage_path>/<run.name>/tokenizer."""
    return storage.join(cfg.run.storage_path, cfg.run.name, TOKENIZER_DIR)


def plan_steps(cfg: TokenizerTrainConfig, images: int) -> int:
    """`steps`, or epochs * (images // (batch_size * workers)) (at least one step an epoch)."""
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * max(1, images // (cfg.data.batch_size * cfg.scaling.num_workers))


def train_tokenizer(cfg: TokenizerTrainConfig) -> TokenizerOutcome:
    """Train a tokenizer as `cfg` says (see the module docstring); the bundle's URI and final metrics."""
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, tracking_uri=job_tracking_uri(cfg.tracking.tracking_uri)))
    manifest = check_inputs(cfg)
    out = output_uri(cfg)
    if not ray.is_initialized():
        ray.init()
    plan = plan_shards(manifest, cfg.data.uri, cfg.data.splits, cfg.data.tasks, seed=cfg.run.seed, epoch=0,
                       shuffle=True)
    steps = plan_steps(cfg, plan.total_rows)
    uri, wait_s = cfg.tracking.tracking_uri, cfg.tracking.server_wait_s
    run_id = patiently(lambda: start_or_resume_run(
        uri, cfg.tracking.experiment, name=cfg.run.name, key=run_key(cfg.run.name, uuid.uuid4().hex),
        params={**flatten(to_dict(cfg)), "steps_planned": steps},
        tags={"job": "train_tokenizer", "data_fingerprint": manifest.fingerprint, "data_uri": cfg.data.uri,
              "tokenizer_uri": out}),
        what=f"starting run {cfg.run.name}", uri=uri, deadline_s=wait_s)
    ok = False
    try:
        logger.info("tokenizer %s (%s): %d training images, %d steps of %d x %d images -> %s", cfg.run.name,
                    cfg.model.arch, plan.total_rows, steps, cfg.scaling.num_workers, cfg.data.batch_size,
                    storage.redact(out))
        ds = _images(cfg, ShardSource(plan, s3=cfg.data.s3, retries=2), plan.total_rows)
        trainer = TorchTrainer(
            tokenizer_loop,
            train_loop_config={"cfg": to_dict(cfg), "steps": steps, "mlflow_run_id": run_id,
                               "data_fingerprint": manifest.fingerprint, "output": out},
            scaling_config=scaling_of(cfg),
            run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                                 failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
            datasets={"train": ds},
            dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        metadata = json.loads(storage.read_bytes(storage.join(out, "config.json"), cfg.data.s3))["metadata"]
        _log_bundle(cfg, run_id, out)
        ok = True
        return TokenizerOutcome(cfg.run.name, run_id, out, metadata["steps"], plan.total_rows, metadata["metrics"],
                                manifest.fingerprint)
    finally:
        try:
            end_run(uri, run_id, ok, deadline_s=wait_s)
        except RuntimeError:
            if ok:
                raise
            logger.exception("run %s: its MLflow status could not be set to FAILED", cfg.run.name)


def check_inputs(cfg: TokenizerTrainConfig) -> Manifest:
    """The corpus's manifest, once the corpus, its splits, the image column and the output place are usable:
    a ConfigError naming the key otherwise, before anything starts."""
    if cfg.data.image_column not in FIELDS:
        raise ConfigError(f"data.image_column: {cfg.data.image_column!r} is not a column of a canonical corpus "
                          f"({', '.join(FIELDS)})")
    try:
        manifest = read_manifest(cfg.data.uri, s3=cfg.data.s3)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.uri: {exc}") from None
    for key, splits in (("data.splits", cfg.data.splits), ("validation.split", (cfg.validation.split,))):
        if not manifest.select(splits, cfg.data.tasks):
            raise ConfigError(f"{key}: corpus {storage.redact(cfg.data.uri)} has no shards of splits {list(splits)}"
                              f" and tasks {list(cfg.data.tasks) if cfg.data.tasks else 'all'}; it holds "
                              f"{manifest.counts}")
    out = output_uri(cfg)
    if storage.exists(storage.join(out, "config.json"), cfg.data.s3) and not cfg.run.overwrite:
        raise ConfigError(f"run.name: a tokenizer is already at {storage.redact(out)}; choose another run.name or "
                          "pass run.overwrite=true to replace it")
    return manifest


def _images(cfg: TokenizerTrainConfig, source: ShardSource, rows: int) -> ray.data.Dataset:
    """The training images as a Ray Dataset: columns pixels ((S, S, 3) uint8) and ok (False: a bad row, its
    pixels zero), in the plan's order; materialized when data.cache."""
    res = cfg.model.architecture().resolution
    blocks = max(1, min(64, math.ceil(rows / 256)))
    ds = ray.data.read_datasource(source, override_num_blocks=blocks).map_batches(
        _decode, fn_kwargs={"column": cfg.data.image_column, "size": res,
                            "limits": (cfg.data.max_image_bytes, cfg.data.max_image_pixels)},
        batch_size=64, batch_format="pyarrow")
    return ds.materialize() if cfg.data.cache else ds


def _decode(batch, column: str, size: int, limits: tuple[int, int]) -> dict[str, np.ndarray]:
    """Source rows -> {"pixels": (n, size, size, 3) uint8, "ok": (n,) bool, "reason": (n,) str}: each image
    decoded within OFA's limits and resized (`resized_uint8`); a marker row or an image that does not decode is
    ok=False with its reason (zeros for pixels)."""
    pcfg = PreprocessConfig(max_image_bytes=limits[0], max_image_pixels=limits[1])
    data, errors = batch.column(column).to_pylist(), batch.column("error").to_pylist()
    ids = batch.column("id").to_pylist()
    pixels = np.zeros((len(data), size, size, 3), np.uint8)
    ok, reasons = np.zeros(len(data), bool), np.full(len(data), "", dtype=object)
    for i, (raw, error) in enumerate(zip(data, errors, strict=True)):
        try:
            if error is not None:
                reasons[i] = error
                continue
            if not raw:
                raise InputError(f"row {ids[i]}: no image in column {column!r}", reason=EMPTY_IMAGE)
            pixels[i] = resized_uint8([decode_image(raw, pcfg, source=str(ids[i]))], size)[0]
            ok[i] = True
        except InputError as exc:
            reasons[i] = exc.reason or BAD_IMAGE
    return {"pixels": pixels, "ok": ok, "reason": reasons.astype(str)}


def _log_bundle(cfg: TokenizerTrainConfig, run_id: str, out: str) -> None:
    """The bundle as the run's MLflow artifact `tokenizer` (copied down first when it is on S3)."""
    logger_ = MetricLogger(cfg.tracking.tracking_uri, run_id, deadline_s=cfg.tracking.server_wait_s)
    fs, path = storage.resolve(out, cfg.data.s3)
    if isinstance(fs, pafs.LocalFileSystem):
        logger_.log_artifacts(path, TOKENIZER_DIR)
        return
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        logger_.log_artifacts(tmp, TOKENIZER_DIR)


# =============================================================================================================
# The worker


@dataclass
class _Window:
    """What the steps since the last log line add up: loss parts, images, the argmax-code histogram."""

    sums: dict[str, float]
    codes: torch.Tensor  # (n_embed,) counts
    steps: int = 0
    temperature: float = math.nan  # the last step's

    @classmethod
    def empty(cls, n_embed: int) -> _Window:
        return cls({}, torch.zeros(n_embed, dtype=torch.long))

    def add(self, parts: dict[str, float], codes: torch.Tensor) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.codes += torch.bincount(codes.flatten().cpu(), minlength=self.codes.numel())
        self.steps += 1
        self.temperature = parts["temperature"]


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """Codebook usage of an (n_embed,) histogram: perplexity exp(H) of the code distribution (1: one code, n_embed:
    all alike), used and dead codes (never used) and the dead share."""
    n = counts.numel()
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "used_codes": used, "dead_codes": n - used,
            "dead_share": (n - used) / n}


def tokenizer_loop(loop_config: dict) -> None:
    """The Ray Train worker function: `steps` updates, rank 0 logging, validating and saving the bundle."""
    cfg = build(TokenizerTrainConfig, loop_config["cfg"], "train_loop_config")
    steps, run_id = int(loop_config["steps"]), loop_config["mlflow_run_id"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_flush_denormal(True)
    torch.set_num_threads(cfg.scaling.threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    mlflow = MetricLogger(cfg.tracking.tracking_uri, run_id, background=True,
                          deadline_s=cfg.tracking.server_wait_s) if rank == 0 else None
    every_s = cfg.tracking.system_metrics_every_s if rank == 0 else 0
    with metrics_delivered(mlflow), system_metrics(cfg.tracking.tracking_uri, run_id, every_s):
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        raw = VQGAN(cfg.model.architecture()).to(device)
        model = ray.train.torch.prepare_model(raw)
        optimizer = build_optimizer(raw, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, steps)
        disc = _discriminator(cfg, device)
        val = _validation_images(cfg) if rank == 0 else None
        if rank == 0:
            init = {f"val/{k}_init": v for k, v in evaluate(raw, val, cfg.validation.batch_size, device).items()}
            logger.info("tokenizer %s: %d worker(s), %d steps; at init: %s", cfg.run.name, world, steps,
                        _fmt(init))
            mlflow.log(init, 0)
        torch.manual_seed(cfg.run.seed * 1000 + rank)  # each rank's own Gumbel noise
        window = _Window.empty(raw.config.n_embed)
        progress = Progress(f"tokenizer {cfg.run.name}", steps, 0.0, unit="steps", extra_rates={"images": "images"},
                            logger=logger)
        batches = _batches(cfg, rank, device)
        images = 0
        for step in range(steps):
            x = next(batches)
            parts, codes = _step(cfg, model, raw, optimizer, scheduler, disc, x, step)
            window.add(parts, codes)
            images += x.shape[0] * world
            if (step + 1) % cfg.run.log_every == 0 or step + 1 == steps:
                _log_window(cfg, window, step + 1, world, progress, images, mlflow, scheduler.get_last_lr()[0])
                window = _Window.empty(raw.config.n_embed)
            if rank == 0 and cfg.validation.every and (step + 1) % cfg.validation.every == 0 and step + 1 < steps:
                val_m = {f"val/{k}": v for k, v in evaluate(raw, val, cfg.validation.batch_size, device).items()}
                logger.info("step %d: %s", step + 1, _fmt(val_m))
                mlflow.log(val_m, step + 1)
        if rank == 0:
            final = {f"val/{k}": v for k, v in evaluate(raw, val, cfg.validation.batch_size, device).items()}
            metrics = {**init, **final}
            logger.info("tokenizer %s: done, %d steps: %s", cfg.run.name, steps, _fmt(metrics))
            mlflow.log(final, steps)
            _save(cfg, raw, loop_config, steps, metrics)


def _discriminator(cfg: TokenizerTrainConfig, device: torch.device):
    """(model under DDP, raw model, optimizer) of the PatchGAN, or None when adversarial training is off."""
    if not cfg.adversarial.enabled:
        return None
    raw = PatchDiscriminator(cfg.adversarial.layers, cfg.adversarial.channels).to(device)
    model = ray.train.torch.prepare_model(raw)
    opt = build_optimizer(raw, dataclasses.replace(cfg.optim, lr=cfg.adversarial.lr))
    return model, raw, opt


def _step(cfg: TokenizerTrainConfig, model, raw: VQGAN, optimizer, scheduler, disc, x: torch.Tensor,
          step: int) -> tuple[dict[str, float], torch.Tensor]:
    """One update of the tokenizer (and of the discriminator when it is on): the loss parts as floats and the
    argmax codes of the batch, (B, g, g)."""
    tau = cfg.gumbel.temperature(step)
    out = model(x, temperature=tau, hard=cfg.gumbel.hard)
    l1, l2 = (out.pixels - x).abs().mean(), F.mse_loss(out.pixels, x)
    usage = usage_loss(out.logits)
    loss = cfg.loss.l1 * l1 + cfg.loss.l2 * l2 + out.kl + cfg.loss.usage * usage
    adv = disc is not None and step >= cfg.adversarial.start
    parts = {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(out.kl.detach()),
             "usage": float(usage.detach()), "psnr": float(psnr(out.pixels.detach(), x).mean()), "temperature": tau}
    if adv:
        d_model, d_raw, _ = disc
        d_raw.requires_grad_(False)  # the generator's term through the bare module: DDP's reducer waits for no grads
        g_loss = hinge_g_loss(d_raw(out.pixels))
        d_raw.requires_grad_(True)
        loss = loss + cfg.adversarial.weight * g_loss
        parts["g_adv"] = float(g_loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.clip_norm)
    optimizer.step()
    scheduler.step()
    parts["loss"] = float(loss.detach())
    if adv:
        d_model, _, d_opt = disc
        real, fake = d_model(torch.cat([x, out.pixels.detach()])).chunk(2)  # one DDP forward per backward
        d_loss = hinge_d_loss(real, fake)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        parts["d_loss"] = float(d_loss.detach())
    return parts, out.logits.detach().argmax(1)


def usage_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL from the batch's average code distribution to the uniform one, sum_k p_k log(p_k n), p the softmax of
    (B, n, h, w) logits averaged over images and positions: 0 when every code is used alike, log n when one is. It
    keeps the codebook from collapsing onto a few codes (each position may still be sure of its own)."""
    p = F.softmax(logits.float(), dim=1).mean((0, 2, 3))  # (n,)
    return (p * torch.log(p * p.numel() + 1e-10)).sum()


def _log_window(cfg: TokenizerTrainConfig, window: _Window, step: int, world: int, progress: Progress,
                images: int, mlflow: MetricLogger | None, lr: float) -> None:
    """The window's codebook usage summed over the workers (every rank), then rank 0's line and MLflow metrics."""
    counts = window.codes
    if world > 1:
        counts = counts.to(ray.train.torch.get_device())
        dist.all_reduce(counts)
        counts = counts.cpu()
    if mlflow is None:
        return
    mean = {k: v / max(1, window.steps) for k, v in window.sums.items()} | {"temperature": window.temperature}
    usage = code_usage(counts)
    f = progress.update(step, force=True, extra={
        "loss": round(mean["loss"], 4), "psnr": round(mean["psnr"], 2), "perplexity": round(usage["perplexity"], 1),
        "dead": usage["dead_codes"], "tau": round(mean["temperature"], 3), "images": images})
    m = {f"train/{k}": v for k, v in mean.items()}
    m |= {f"train/{k}": v for k, v in usage.items()}
    m |= {"train/lr": lr, "train/steps_per_s": f["rate"], "train/images_per_s": f["images_per_s"],
          "progress/fraction": step / progress.total, "progress/eta_s": f["eta_s"] if f["rate"] > 0 else math.nan}
    mlflow.log(m, step)


def _batches(cfg: TokenizerTrainConfig, rank: int, device: torch.device) -> Iterator[torch.Tensor]:
    """This worker's share of the training images as (B, 3, S, S) pixels in [-1, 1], epoch after epoch (locally
    shuffled, seeded by the epoch), bad rows dropped (counted in the log)."""
    shard = ray.train.get_dataset_shard("train")
    bad: dict[str, int] = {}
    for epoch in range(10**9):
        n = 0
        for batch in shard.iter_batches(batch_size=cfg.data.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                        local_shuffle_seed=cfg.run.seed * 1000 + epoch if cfg.data.shuffle_buffer
                                        else None):
            ok = batch["ok"]
            for reason in batch["reason"][~ok]:
                bad[str(reason)] = bad.get(str(reason), 0) + 1
            if ok.any():
                n += 1
                yield from_uint8(batch["pixels"][ok]).to(device)
        if n == 0:
            raise RuntimeError(f"worker {rank}: no usable training image in a whole epoch (bad rows: {bad}); "
                               f"data.batch_size {cfg.data.batch_size} may exceed this worker's share of the images")
        if bad and rank == 0:
            logger.warning("epoch %d: bad training rows skipped so far, by reason: %s", epoch + 1, bad)


def _validation_images(cfg: TokenizerTrainConfig) -> torch.Tensor:
    """Up to validation.max_images held-out images as (N, S, S, 3) uint8 (bad ones skipped, with a warning)."""
    res = cfg.model.architecture().resolution
    pcfg = PreprocessConfig(max_image_bytes=cfg.data.max_image_bytes, max_image_pixels=cfg.data.max_image_pixels)
    out, bad = [], 0
    for row in iter_rows(cfg.data.uri, s3=cfg.data.s3, columns=["id", cfg.data.image_column],
                         splits=[cfg.validation.split], tasks=cfg.data.tasks):
        try:
            out.append(resized_uint8([decode_image(row[cfg.data.image_column] or b"", pcfg, row["id"])], res)[0])
        except InputError:
            bad += 1
        if len(out) >= cfg.validation.max_images:
            break
    if bad:
        logger.warning("validation split %s: %d bad images skipped", cfg.validation.split, bad)
    if not out:
        raise RuntimeError(f"validation.split {cfg.validation.split!r}: no usable image")
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def evaluate(model: VQGAN, images: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, float]:
    """Held-out reconstruction through the tokenizer's own path (argmax codes, `decode`): mean PSNR (dB) over the
    (N, S, S, 3) uint8 images, and the codebook usage of their codes (`code_usage`)."""
    was = model.training
    model.eval()
    scores, counts = [], torch.zeros(model.config.n_embed, dtype=torch.long)
    try:
        for lo in range(0, len(images), batch_size):
            x = from_uint8(images[lo:lo + batch_size]).to(device)
            codes = model.encode(x)
            scores.append(psnr(model.decode(codes), x).cpu())
            counts += torch.bincount(codes.flatten().cpu(), minlength=counts.numel())
    finally:
        model.train(was)
    return {"psnr": float(torch.cat(scores).mean()), **code_usage(counts), "images": len(images)}


def _save(cfg: TokenizerTrainConfig, raw: VQGAN, loop_config: dict, steps: int, metrics: dict) -> None:
    """The bundle, written where `output_uri` says: in place on a local path, else written here and uploaded."""
    out = loop_config["output"]
    meta = {"trained_by": "jobs.train_tokenizer", "config": to_dict(cfg), "steps": steps, "metrics": metrics,
            "data_fingerprint": loop_config["data_fingerprint"], "data_uri": cfg.data.uri,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fs, path = storage.resolve(out, cfg.data.s3)
    if isinstance(fs, pafs.LocalFileSystem):
        save_tokenizer(path, raw, metadata=meta, overwrite=cfg.run.overwrite)
        return
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as tmp:
        local = save_tokenizer(Path(tmp) / TOKENIZER_DIR, raw, metadata=meta)
        # run.overwrite was checked by the driver. Upload over the old files first and only then remove the old
        # ones this bundle does not have: a failed upload leaves the old bundle in place (or a mix that the
        # loader's header check refuses), never an empty prefix.
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        new = {f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file()}
        with contextlib.suppress(FileNotFoundError):
            for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
                if info.type == pafs.FileType.File and info.path[len(path):].lstrip("/") not in new:
                    fs.delete_file(info.path)
    logger.info("tokenizer saved to %s", storage.redact(out))


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
