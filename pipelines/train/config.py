"""`TrainConfig`: everything a pretraining or fine-tuning job needs, as nested frozen dataclasses.

Loaded from YAML by `pipelines.job_config.load_config(TrainConfig, path, overrides)`: unknown keys and bad
values are errors naming the dotted key. Architecture is not configured here: it comes from the bundle a run
starts from (`model.init`), or from a named size (`model.arch`) when training from scratch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ofa_model.config import ConfigError, OFAConfig, Regularization, get_config
from ofa_model.config_text import check as _check
from ofa_model.config_text import check_finite as _finite
from ofa_model.tasks import TASKS
from pipelines.data.config import DataConfig

DIMS = ("embed_dim", "ffn_dim", "encoder_layers", "decoder_layers", "attention_heads")


@dataclass(frozen=True)
class ModelSection:
    """arch: a named size (`ofa_model.get_config`) for training from scratch. dims: Transformer sizes that
    replace the named size's (keys of DIMS, e.g. {embed_dim: 128, ffn_dim: 512}); the architecture is then
    named `arch[key=value,...]` in the bundle. init: a bundle directory or a `models:/name@alias` URI to start
    from (its architecture, vocabulary and weights; `arch` and `dims` must then be left at their defaults)."""

    arch: str = "ofa-micro"
    dims: dict[str, int] = field(default_factory=dict)
    init: str | None = None
    regularization: Regularization = field(default_factory=Regularization)

    def __post_init__(self) -> None:
        for key, value in self.dims.items():
            _check(key in DIMS, f"model.dims.{key}: not a Transformer size; choose from {', '.join(DIMS)}")
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"model.dims.{key} must be a positive integer, got {value!r}")
        _check(not (self.dims and self.init), "model.dims: the sizes of a model trained from scratch; a model "
               "started from model.init has its bundle's architecture")
        try:
            self.architecture()
        except ConfigError as exc:
            raise ValueError(f"model.arch / model.dims: {exc}") from None

    def architecture(self, **fixed) -> OFAConfig:
        """The from-scratch architecture: the named size with `dims` (and the vocabulary's `fixed` fields)."""
        name = self.arch + ("[" + ",".join(f"{k}={v}" for k, v in sorted(self.dims.items())) + "]" if self.dims
                            else "")
        return dataclasses.replace(get_config(self.arch, **self.dims, **fixed), name=name)


@dataclass(frozen=True)
class OptimSection:
    """AdamW with polynomial decay after a linear warmup (OFA's recipe), and what is updated how.

    warmup_ratio: fraction of all updates spent warming up. end_lr: the rate decayed to; power: 1 is linear.
    clip_norm: max gradient norm (0: off). grad_accum: micro-batches per update. ema_decay: exponential moving
    average of the weights, used for validation and the saved bundle (0: off; OFA's VQA uses 0.9999).
    label_smoothing, drop_worst_ratio / drop_worst_after: see `ofa_model.losses`. freeze_embeddings: the shared
    token embedding (and so the tied output projection); freeze_resnet: the image backbone.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    end_lr: float = 0.0
    power: float = 1.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.0
    label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    freeze_embeddings: bool = False
    freeze_resnet: bool = False

    def __post_init__(self) -> None:
        _finite("optim.lr", self.lr, 1e-12, 10.0)
        for i, b in enumerate(self.betas):
            _finite(f"optim.betas[{i}]", b, 0.0, 0.999999)
        _finite("optim.eps", self.eps, 1e-16, 1.0)
        _finite("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        _finite("optim.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _finite("optim.end_lr", self.end_lr, 0.0, self.lr)
        _finite("optim.power", self.power, 0.1, 10.0)
        _finite("optim.clip_norm", self.clip_norm, 0.0, 1e6)
        _check(1 <= self.grad_accum <= 1024, f"optim.grad_accum must lie in [1, 1024], got {self.grad_accum}")
        _finite("optim.ema_decay", self.ema_decay, 0.0, 0.999999)
        _finite("optim.label_smoothing", self.label_smoothing, 0.0, 0.99)
        _finite("optim.drop_worst_ratio", self.drop_worst_ratio, 0.0, 0.99)
        _check(self.drop_worst_after >= 0, "optim.drop_worst_after must be >= 0")


@dataclass(frozen=True)
class ScalingSection:
    """Ray Train workers: how many, the resources of each (GPUs only when use_gpu), and how they are placed:
    PACK fills nodes first, SPREAD spreads them, STRICT_SPREAD puts each on its own node.
    threads_per_worker: PyTorch's intra-op threads in each worker; null: the CPUs it reserves
    (cpus_per_worker, rounded down, at least 1), as Ray gives its tasks. PyTorch's own default, every core of
    the node, oversubscribes a node shared with other workers or the data pipeline: on 2 cores, a worker of
    0.5 CPU beside its data actors trained faster with 1 thread than with 2 (`bench/learning_curve.py`)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        _check(1 <= self.num_workers <= 4096, f"scaling.num_workers must lie in [1, 4096], got {self.num_workers}")
        _finite("scaling.cpus_per_worker", self.cpus_per_worker, 0.0, 1024.0)
        _finite("scaling.gpus_per_worker", self.gpus_per_worker, 0.0, 64.0)
        _check(self.threads_per_worker is None or 1 <= self.threads_per_worker <= 1024,
               f"scaling.threads_per_worker must be null or lie in [1, 1024], got {self.threads_per_worker}")

    @property
    def threads(self) -> int:
        """The intra-op threads a worker runs (threads_per_worker, else its CPUs)."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


@dataclass(frozen=True)
class RunSection:
    """name: identifies the run: rerunning with the same name (and storage_path) continues it from its latest
    checkpoint. storage_path: local directory or s3:// prefix for checkpoints. max_failures: worker-group
    restarts after a failure, per fit (per epoch with several workers, per run with one; pipelines.train.loop).
    keep_checkpoints: the best N by the validation metric (the latest is kept too).
    checkpoint_every_steps: also checkpoint mid-epoch (0: at epoch ends only). precision (training and the
    validation through the predictor alike; `ofa_model.precision`): "auto" is bf16 autocast where the hardware runs
    bf16 natively (CPUs with AVX-512 BF16/AMX, Ampere+ GPUs), fp32 elsewhere; "fp16" (CUDA only) adds a grad
    scaler. memory_format: "auto" is channels_last for the ResNet. log_every_s: seconds between progress lines."""

    name: str = "ofa-run"
    storage_path: str = "./ray_results"
    max_failures: int = 0
    keep_checkpoints: int = 2
    checkpoint_every_steps: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    log_every_s: float = 30.0

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name and len(self.name) <= 200,
               f"run.name must be a non-empty name without '/', got {self.name!r}")
        _check(self.max_failures >= -1, "run.max_failures must be >= -1 (-1: unlimited)")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.checkpoint_every_steps >= 0, "run.checkpoint_every_steps must be >= 0")
        _finite("run.log_every_s", self.log_every_s, 0.0, 86400.0)


@dataclass(frozen=True)
class TrackingSection:
    """MLflow. tracking_uri: None reads MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    registered_model: register the best bundle under this name (None: do not register); the `champion` alias
    moves only when its validation metric beats the current champion's."""

    tracking_uri: str | None = None
    experiment: str = "ofa-ray"
    registered_model: str | None = None


@dataclass(frozen=True)
class ValidationSection:
    """Validation after every epoch through `OFAPredictor`: `max_rows` rows of `split` (None: all).
    mode: VQA inference mode (open / trie / allcand; None: the task's default). full_at_end: the run's last
    epoch validates every row of the split, the epochs before it `max_rows` (a cheap curve and a final figure
    on the whole split; the best-checkpoint choice then compares the last epoch's whole-split score with the
    earlier epochs' subset scores)."""

    split: str = "val"
    max_rows: int | None = 500
    batch_size: int = 16
    mode: Literal["open", "trie", "allcand"] | None = None
    full_at_end: bool = False

    def __post_init__(self) -> None:
        _check(self.max_rows is None or self.max_rows >= 1, "validation.max_rows must be >= 1 or null")
        _check(1 <= self.batch_size <= 1024, "validation.batch_size must lie in [1, 1024]")


@dataclass(frozen=True)
class ScstSection:
    """Self-critical sequence training (caption stage 2): `samples` hypotheses per image from beam search
    (or sampling), CIDEr-D reward, leave-one-out baseline."""

    enabled: bool = False
    samples: int = 5
    sampling: bool = False
    max_len_b: int = 16
    no_repeat_ngram_size: int = 3

    def __post_init__(self) -> None:
        _check(2 <= self.samples <= 32, "scst.samples must lie in [2, 32] (the baseline needs another sample)")


@dataclass(frozen=True)
class TrainConfig:
    """task: the task trained (a key of TASKS or of custom_tasks); mixture: task -> weight for multi-task
    pretraining (then `task` names the one validated). answers: the closed answer set of VQA-style tasks
    (trie-constrained loss and `allcand` validation, as OFA's ans2label); empty: unconstrained. labels: the
    closed label sets of the mixture's other tasks (task -> labels; built-in label tasks such as itm and
    visual_entailment have theirs). In a mixture every row trains under its own task's constraint, as alone."""

    data: DataConfig
    task: str = "vqa"
    mixture: dict[str, float] | None = None
    custom_tasks: dict[str, str] = field(default_factory=dict)
    answers: tuple[str, ...] = ()
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    epochs: int = 1
    max_steps_per_epoch: int | None = None
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    scst: ScstSection = field(default_factory=ScstSection)

    def __post_init__(self) -> None:
        _check(1 <= self.epochs <= 100_000, f"epochs must lie in [1, 100000], got {self.epochs}")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
               "max_steps_per_epoch must be >= 1 or null")
        if self.mixture is not None:
            _check(bool(self.mixture), "mixture must name at least one task")
            for name, w in self.mixture.items():
                _finite(f"mixture.{name}", w, 1e-9, 1e9)
        clash = sorted(set(self.custom_tasks) & set(TASKS))
        _check(not clash, f"custom_tasks.{clash[0] if clash else ''}: a custom task cannot replace a built-in task")
        known = set(TASKS) | set(self.custom_tasks)
        for name in [self.task, *(self.mixture or {})]:
            _check(name in known, f"unknown task {name!r}; known: {', '.join(sorted(known))}")
        for name, labels in self.labels.items():
            _check(name in (self.mixture or {}) and name != self.task,
                   f"labels.{name}: labels are for the mixture's other tasks ({name!r} is not one; the main "
                   f"task's closed set is `answers`)")
            _check(bool(labels) and all(isinstance(x, str) and x.strip() for x in labels),
                   f"labels.{name}: a non-empty list of non-empty labels expected")
