"""Training speed on CPU: one ofa-tiny step under candidate fast configurations, and Ray Train scaling.

* Step speed: one training step of ofa-tiny (batch 8, 256x256 images, source 32, target 16 tokens; forward,
  `ofa_model.losses.label_smoothed_nll`, backward, AdamW step) for the plain eager fp32 step (foreach AdamW, as
  `pipelines.train.optim.build_optimizer` picks on CPU) against channels-last ResNet input and weights, bf16 autocast,
  fused AdamW, `torch.compile` and combinations. Every configuration has its own copy of the same initial
  model and its own optimizer; after warm-up they are timed one step each in turn, round after round (the order
  rotated every round), so a noisy machine slows every side of a ratio alike. The speed-up is the median over
  rounds of (baseline step / candidate step) of the same round. Then the loss after N identical steps (same
  init, same batch) of fp32 against the fastest eager bf16 configuration, beside two yardsticks: an fp32 run
  from another init seed and the loss drop over the N steps, so the choice of bf16 is honest.
* Scaling: samples/s of real `pipelines.train.train` runs (ofa-micro, easy-VQA converted to a temporary local
  directory, a fixed number of steps, 16 validation rows) on a local Ray with 4 logical CPUs: 1 worker with
  1 CPU (1 torch thread), 2 workers with 1 CPU each (DDP over gloo) and 1 worker with 2 CPUs (2 threads).
  Steady samples/s come from the MLflow per-step metrics (`run.log_every_s=0`: timestamps of steps after the
  first few) beside the trainer's own `train/samples_per_s` (a cumulative average since the epoch's first
  batch was asked for) and end-to-end samples/s over the wall time of the whole `train()` call.

    python -m bench train                       # both parts (as `python -m bench` runs it)
    python -m bench.train --part step --repeat 7 --no-compile
    python -m bench.train --part scaling --scaling-steps 60
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ofa_model.architecture import get_config
from ofa_model.losses import label_smoothed_nll
from ofa_model.model import OFAModel
from ofa_model.precision import cpu_flags
from pipelines.local.ray_settings import TEST_OBJECT_STORE_BYTES, init_local_ray

BATCH, SIZE, SRC_LEN, TGT_LEN, PAD = 8, 256, 32, 16, 1
ROOT = Path(__file__).resolve().parents[1]


# =============================================================================================================
# The machine


def cpu_report() -> str:
    """What the CPU offers for bf16 (flags from /proc/cpuinfo, and what torch dispatches to)."""
    flags = cpu_flags()
    want = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in want) if flags else "flags unknown"
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    if {"amx_bf16", "amx_tile"} <= flags:
        verdict = "AMX-BF16 tiles (bf16 matmuls/convs on AMX through oneDNN)"
    elif "avx512_bf16" in flags:
        verdict = "AVX-512 BF16 (no AMX)"
    else:
        verdict = "no native bf16 (bf16 is emulated: expect no speed-up)"
    return (f"cpu: {have}; torch capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
            f"{'yes' if mkldnn_bf16 else 'no'} -> {verdict}")


# =============================================================================================================
# Step speed


@dataclass(frozen=True)
class StepConfig:
    name: str
    channels_last: bool = False
    bf16: bool = False
    fused: bool = False
    compile: bool = False


BASELINE = StepConfig("eager fp32, foreach AdamW")
EAGER = (
    BASELINE,
    StepConfig("fused AdamW", fused=True),
    StepConfig("channels-last", channels_last=True),
    StepConfig("bf16 autocast", bf16=True),
    StepConfig("bf16 + channels-last", channels_last=True, bf16=True),
    StepConfig("bf16 + channels-last + fused", channels_last=True, bf16=True, fused=True),
)
COMPILED = (
    StepConfig("compile fp32", compile=True),
    StepConfig("compile + bf16 + channels-last + fused", channels_last=True, bf16=True, fused=True, compile=True),
)
FASTEST_EAGER_BF16 = EAGER[-1]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"src": torch.randint(4, 50000, (BATCH, SRC_LEN), generator=g),
            "img": torch.randn(BATCH, 3, SIZE, SIZE, generator=g),
            "prev": torch.randint(4, 50000, (BATCH, TGT_LEN), generator=g),
            "target": torch.randint(4, 50000, (BATCH, TGT_LEN), generator=g)}


class Stepper:
    """One configuration: its own model copy, optimizer and (channels-last) input; `step()` returns the loss."""

    def __init__(self, base: OFAModel, cfg: StepConfig, batch: dict[str, torch.Tensor], lr: float = 1e-4):
        self.cfg = cfg
        model = copy.deepcopy(base)
        model.train()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)  # 4-D weights (the ResNet's convs)
        self.model = model
        self.forward = torch.compile(model) if cfg.compile else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=cfg.fused, foreach=None if cfg.fused else True)
        img = batch["img"]
        self.img = img.contiguous(memory_format=torch.channels_last) if cfg.channels_last else img
        self.batch = batch
        self.masks = torch.ones(BATCH, dtype=torch.bool)

    def step(self) -> float:
        b = self.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.forward(b["src"], self.img, self.masks, b["prev"])
        out = label_smoothed_nll(logits, b["target"], pad_id=PAD, epsilon=0.1)
        self.opt.zero_grad(set_to_none=True)
        (out.loss / max(1, out.ntokens)).backward()
        self.opt.step()
        return float(out.loss.detach()) / max(1, out.ntokens)

    @torch.no_grad()
    def final_loss(self) -> float:
        """fp32 loss of the current weights on the batch (no autocast; training mode, so batch-norm uses the
        batch's statistics as the steps did, and there is no dropout in these models)."""
        b = self.batch
        out = label_smoothed_nll(self.model(b["src"], self.img, self.masks, b["prev"]), b["target"], pad_id=PAD,
                                 epsilon=0.1)
        return float(out.loss) / max(1, out.ntokens)


@contextmanager
def time_limit(seconds: float):
    """TimeoutError after `seconds` (SIGALRM, main thread only; elsewhere no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"took more than {seconds:.0f} s")

    try:
        old = signal.signal(signal.SIGALRM, _raise)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(steppers: dict[str, Stepper], repeat: int) -> dict[str, list[float]]:
    """Seconds of one step per configuration per round; each round times every configuration once, the order
    rotated by one each round (no configuration always runs first or after the same neighbour)."""
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_timed(steppers[name].step))
    return times


def step_speed(repeat: int = 5, *, compile_: bool = True, compile_timeout_s: float = 900.0,
               loss_steps: int = 10) -> None:
    torch.manual_seed(0)
    base = OFAModel(get_config("ofa-tiny"))
    batch = make_batch(0)
    print(f"step: ofa-tiny ({base.num_parameters() / 1e6:.1f} M parameters), batch {BATCH}, {SIZE}x{SIZE}, "
          f"src {SRC_LEN}, tgt {TGT_LEN}, label-smoothed NLL, AdamW; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    steppers: dict[str, Stepper] = {}
    for cfg in EAGER:
        s = Stepper(base, cfg, batch)
        s.step(), s.step()  # warm-up: oneDNN primitive caches, AdamW state allocation
        steppers[cfg.name] = s
    compile_s: dict[str, float | str] = {}
    if compile_:
        # The encoder's `bool(pad.any())` breaks the graph (a data-dependent branch); dynamo warns at length.
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        for cfg in COMPILED:
            s = Stepper(base, cfg, batch)
            try:
                with time_limit(compile_timeout_s):
                    first = _timed(s.step)  # compiles forward (and backward: AOTAutograd)
                    second = _timed(s.step)  # a recompile or a guard miss shows here
                steady = statistics.median(_timed(s.step) for _ in range(2))
                compile_s[cfg.name] = first + second - 2 * steady
                steppers[cfg.name] = s
            except Exception as exc:  # noqa: BLE001 - any compiler failure means "skip", reported
                compile_s[cfg.name] = f"skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                torch._dynamo.reset()
                if isinstance(exc, TimeoutError):
                    break  # the next one would take as long
    times = side_by_side(steppers, repeat)
    base_t = times[BASELINE.name]
    print(f"{'configuration':42s} {'s/step (median)':>16s} {'min':>7s} {'speed-up':>9s}")
    ratios = {name: statistics.median(b / t for b, t in zip(base_t, ts, strict=True)) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:42s} {statistics.median(ts):16.2f} {min(ts):7.2f} {ratios[name]:8.2f}x")
    best = max(ratios.items(), key=lambda x: x[1])
    eager = max(((n, r) for n, r in ratios.items() if not n.startswith("compile")), key=lambda x: x[1])
    for name, c in compile_s.items():
        print(f"compile time, {name}: " + (f"{c:.0f} s (first two steps minus two steady steps; inductor's cache "
                                           f"in {_inductor_cache()} makes later runs faster)"
                                           if isinstance(c, float) else c))
    goal = "met" if best[1] >= 1.5 else "NOT met"
    print(f"fastest: {best[0]}, {best[1]:.2f}x the eager fp32 step (goal >= 1.5x: {goal}); fastest without "
          f"compile: {eager[0]}, {eager[1]:.2f}x", flush=True)
    del steppers
    bf16_loss_check(base, batch, loss_steps)


def _inductor_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return cache_dir()
    except Exception:  # noqa: BLE001 - only for the message
        return "the inductor cache directory"


def bf16_loss_check(base: OFAModel, batch: dict[str, torch.Tensor], steps: int) -> None:
    """Loss after `steps` identical steps (same init, same batch, lr 1e-4): fp32 vs the fastest eager bf16
    configuration; yardsticks: fp32 from another init seed, and how far the loss falls over the steps."""
    torch.manual_seed(1)
    other = OFAModel(get_config("ofa-tiny"))
    runs = {"fp32": Stepper(base, BASELINE, batch), "bf16 (+ channels-last + fused)":
            Stepper(base, FASTEST_EAGER_BF16, batch), "fp32, other init seed": Stepper(other, BASELINE, batch)}
    print(f"loss check: {steps} identical steps on one fixed batch (memorising it), train loss per token at "
          f"step 1 / step {steps}, then the fp32 loss of the final weights", flush=True)
    out = {}
    for name, s in runs.items():
        losses = [s.step() for _ in range(steps)]
        out[name] = (losses[0], losses[-1], s.final_loss())
        print(f"  {name:32s} step 1 {losses[0]:.4f}  step {steps} {losses[-1]:.4f}  final (fp32) "
              f"{out[name][2]:.4f}", flush=True)
    f32, b16, seed = out["fp32"], out["bf16 (+ channels-last + fused)"], out["fp32, other init seed"]
    drop = f32[0] - f32[1]
    d_bf16 = abs(b16[2] - f32[2])
    d_seed = abs(seed[2] - f32[2])
    print(f"  |bf16 - fp32| final loss {d_bf16:.4f} ({d_bf16 / max(abs(f32[2]), 1e-9):.2%}); fp32 other seed "
          f"{d_seed:.4f}; loss drop over the steps {drop:.4f} -> bf16 "
          f"{'does not change the loss meaningfully' if d_bf16 <= max(0.05 * drop, d_seed) else 'CHANGES the loss'}"
          f" (criterion: within 5% of the drop or within the seed-to-seed spread)")


# =============================================================================================================
# Scaling on Ray Train

SCENARIOS = (("1 worker x 1 CPU", 1, 1.0), ("2 workers x 1 CPU", 2, 1.0), ("1 worker x 2 CPUs", 1, 2.0))


@dataclass(frozen=True)
class ScalingResult:
    name: str
    steady: float  # samples/s from the per-step metric timestamps, after the first `skip` steps
    metric_last: float  # the trainer's train/samples_per_s at the last step (cumulative since the first batch)
    metric_mean: float  # mean of train/samples_per_s after the first `skip` steps
    end_to_end: float  # samples / wall time of the whole train() call
    wall_s: float
    steps: int


def start_local_ray(num_cpus: int = 4) -> bool:
    """A fresh local Ray (True) unless one is already up in this process (False)."""
    import ray

    if ray.is_initialized():
        return False
    init_local_ray(num_cpus, object_store_bytes=TEST_OBJECT_STORE_BYTES)
    return True


def _scaling_run(corpus: str, tmp: Path, name: str, workers: int, cpus: float, steps: int, batch: int,
                 skip: int) -> ScalingResult:
    from mlflow import MlflowClient

    from ofa_model.config_files import load_config
    from pipelines.train import train
    from pipelines.train.train_config import TrainConfig

    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    run = name.replace(" ", "").replace("x", "-")
    cfg = load_config(TrainConfig, ROOT / "configs/finetune/vqa_easyvqa.yaml", [
        f"data.uri={corpus}", f"data.batch_size={batch}", "data.progress_every_s=600", "epochs=1",
        f"max_steps_per_epoch={steps}", f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}",
        f"run.name={run}", f"run.storage_path={tmp / 'ray-results'}", "run.log_every_s=0",
        f"tracking.tracking_uri={tracking}", "tracking.experiment=bench-train-scaling",
        "tracking.registered_model=null", "validation.max_rows=16"])
    t = time.perf_counter()
    out = train(cfg, output_dir=tmp / f"out-{run}")
    wall = time.perf_counter() - t
    client = MlflowClient(tracking_uri=tracking)
    hist = sorted(client.get_metric_history(out.mlflow_run_id, "train/samples_per_s"), key=lambda m: m.step)
    if len(hist) <= skip + 1:
        raise RuntimeError(f"{name}: only {len(hist)} per-step metrics; raise --scaling-steps above {skip + 1}")
    later = hist[skip:]
    span_s = (later[-1].timestamp - later[0].timestamp) / 1000
    samples = batch * workers * (later[-1].step - later[0].step)
    return ScalingResult(name, samples / max(span_s, 1e-3), hist[-1].value,
                         statistics.fmean(m.value for m in later), batch * workers * out.step / wall, wall, out.step)


def scaling(steps: int = 40, limit: int | None = None, batch: int = 32, skip: int = 5) -> None:
    """`limit` easy-VQA images per split; default: enough for `steps` steps of the widest scenario (~9.7 VQA
    questions an image)."""
    import ray

    from pipelines.data.converters import prepare

    logical = 4
    widest = max(w for _, w, _ in SCENARIOS)
    limit = limit or math.ceil(steps * batch * widest / 9) + 10
    started = start_local_ray(logical)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as d:
            tmp = Path(d)
            corpus = str(tmp / "corpus")
            t = time.perf_counter()
            summary = prepare("easy-vqa", {}, corpus, limit=limit, log_every_s=600)
            print(f"scaling: easy-VQA ({limit} images per split, {summary['counts']['train'].get('vqa', 0)} train "
                  f"VQA rows) converted in {time.perf_counter() - t:.1f} s; ofa-micro, 64 px, batch {batch} per "
                  f"worker, {steps} steps, 16 validation rows; Ray with {logical} logical CPUs on "
                  f"{os.cpu_count()} cores", flush=True)
            results = []
            for name, workers, cpus in SCENARIOS:
                r = _scaling_run(corpus, tmp, name, workers, cpus, steps, batch, skip)
                results.append(r)
                print(f"  {name:18s} steady {r.steady:6.1f} samples/s (steps {skip + 1}-{r.steps}, per-step "
                      f"metric timestamps); train/samples_per_s last {r.metric_last:6.1f}, mean after step {skip} "
                      f"{r.metric_mean:6.1f}; end to end {r.end_to_end:5.1f} samples/s ({r.wall_s:.0f} s for "
                      f"train())", flush=True)
            one, two, wide = results
            print(f"  2 workers vs 1 worker x 1 CPU: steady {two.steady / one.steady:.2f}x, end to end "
                  f"{two.end_to_end / one.end_to_end:.2f}x; 2 workers vs 1 worker x 2 CPUs: steady "
                  f"{two.steady / wide.steady:.2f}x, end to end {two.end_to_end / wide.end_to_end:.2f}x")
            print(f"  caveats: {os.cpu_count()} physical cores shared by the workers, the Ray Data preprocessing "
                  "actor and read tasks, Ray's own processes and the driver; each worker's torch uses "
                  "floor(cpus_per_worker) threads; 2 workers also pay a gloo all-reduce of every gradient per step "
                  "and each does its own batches (global batch doubles); end to end includes worker-group start, "
                  "validation, checkpoint and bundle copy.")
    finally:
        if started:
            ray.shutdown()


# =============================================================================================================


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "step", "scaling"), default="all")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds of every step configuration")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--compile-timeout", type=float, default=900.0, help="seconds a compile may take before it "
                   "is skipped")
    p.add_argument("--loss-steps", type=int, default=10, help="steps of the fp32-vs-bf16 loss check")
    p.add_argument("--scaling-steps", type=int, default=40)
    p.add_argument("--scaling-limit", type=int, default=None, help="easy-VQA images per split in the corpus "
                   "(default: enough for the steps)")
    args = p.parse_args(argv or [])
    # As the trainer does (pipelines.train.worker.train_loop): denormals slow CPU matmuls after some updates.
    torch.set_flush_denormal(True)
    print(cpu_report(), flush=True)
    if args.part in ("all", "step"):
        step_speed(args.repeat, compile_=not args.no_compile, compile_timeout_s=args.compile_timeout,
                   loss_steps=args.loss_steps)
    if args.part in ("all", "scaling"):
        scaling(args.scaling_steps, args.scaling_limit)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
