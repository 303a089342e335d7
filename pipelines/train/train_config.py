"""`TrainConfig`: everything a pretraining or fine-tuning job needs, as nested frozen dataclasses.

Loaded from YAML by `ofa_model.config_files.load_config(TrainConfig, path, overrides)`: unknown keys and bad
values are errors naming the dotted key. Ranges are on the fields; `__post_init__` holds only the rules that relate
several fields. Architecture is not configured here: it comes from the bundle a run
starts from (`model.init`), or from a named size (`model.arch`) when training from scratch.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag

from ofa_model.architecture import OFAConfig, Regularization, get_config
from ofa_model.config_files import config_dataclass
from ofa_model.derived import DERIVED
from ofa_model.errors import ConfigError
from ofa_model.instructions import parse_instruction
from ofa_model.tasks import TASKS
from pipelines.data.data_config import DataConfig

# model.dims keys; code_image_size sets the image-code grid (code_image_size // 8 a side) of text-to-image and
# image infilling targets, e.g. 64 for easy-VQA's 64 px images (64 codes)
Dim = Literal["embed_dim", "ffn_dim", "encoder_layers", "decoder_layers", "attention_heads", "resnet_width",
              "code_image_size"]
Rate = Annotated[float, Field(ge=0.0, le=0.99)]  # a probability or fraction that must leave something
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^/]+$")]  # no '/': it names directories


@config_dataclass
class ModelSection:
    """arch: a named size (`ofa_model.get_config`) for training from scratch. dims: Transformer sizes, the ResNet's
    width and the image-code grid that replace the named size's (keys of Dim, e.g. {embed_dim: 128, ffn_dim: 512,
    resnet_width: 32}); the architecture is then
    named `arch[key=value,...]` in the bundle. init: a bundle directory, an `s3://bucket/prefix` bundle (reached
    with `data.s3`) or a `models:/name@alias` URI to start from (its architecture, vocabulary and weights; `arch`
    and `dims` must then be left at their defaults, but for dims.code_image_size, which sizes no weight). image_tokenizer: an image tokenizer bundle (a directory,
    `s3://bucket/prefix` or `models:/` URI; `ofa_model.vqgan.save_tokenizer`) that every bundle the run saves
    carries, so a text_to_image model answers with images; None: the init bundle's tokenizer, if it has one."""

    arch: str = "ofa-micro"
    dims: dict[Dim, Annotated[int, Field(ge=1)]] = field(default_factory=dict)
    init: str | None = None
    image_tokenizer: str | None = None
    regularization: Regularization = field(default_factory=Regularization)

    def __post_init__(self) -> None:
        if set(self.dims) - {"code_image_size"} and self.init:
            raise ValueError("model.dims / model.init: dims are the sizes of a model trained from scratch; a model "
                             "started from model.init has its bundle's architecture (only code_image_size, which "
                             "sizes no weight, may be set)")
        try:
            self.architecture()
        except ConfigError as exc:
            raise ValueError(f"model.arch / model.dims: {exc}") from None

    def init_architecture(self, bundle_config: OFAConfig) -> OFAConfig:
        """The init bundle's architecture, with `dims.code_image_size` if set: it sizes no weight, only the image-code
        grid, so a fine-tune may change it (OFA pretrains at 128 and fine-tunes text-to-image at 256)."""
        if "code_image_size" not in self.dims:
            return bundle_config
        return dataclasses.replace(bundle_config, code_image_size=self.dims["code_image_size"])

    def architecture(self, **fixed) -> OFAConfig:
        """The from-scratch architecture: the named size with `dims` (and the vocabulary's `fixed` fields)."""
        name = self.arch + ("[" + ",".join(f"{k}={v}" for k, v in sorted(self.dims.items())) + "]" if self.dims
                            else "")
        return dataclasses.replace(get_config(self.arch, **self.dims, **fixed), name=name)


@config_dataclass
class OptimSection:
    """AdamW with polynomial decay after a linear warmup (OFA's recipe), and what is updated how.

    warmup_ratio: fraction of all updates spent warming up; warmup_updates: the warm-up in updates instead (for a
    run whose length run.time_budget_s decides). end_lr: the rate decayed to; power: 1 is linear.
    clip_norm: max gradient norm (0: off). grad_accum: micro-batches per update. ema_decay: exponential moving
    average of the weights, used for validation and the saved bundle (0: off; OFA's VQA uses 0.9999).
    label_smoothing, drop_worst_ratio / drop_worst_after: see `ofa_model.losses`. freeze_embeddings: the shared
    token embedding (and so the tied output projection); freeze_resnet: the image backbone.
    """

    lr: Annotated[float, Field(ge=1e-12, le=10.0)] = 1e-4
    betas: tuple[Annotated[float, Field(ge=0.0, le=0.999999)], Annotated[float, Field(ge=0.0, le=0.999999)]] = (
        0.9, 0.999)
    eps: Annotated[float, Field(ge=1e-16, le=1.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.06
    warmup_updates: Annotated[int, Field(ge=0, le=10**9)] | None = None
    end_lr: Annotated[float, Field(ge=0.0)] = 0.0
    power: Annotated[float, Field(ge=0.1, le=10.0)] = 1.0
    clip_norm: Annotated[float, Field(ge=0.0, le=1e6)] = 1.0
    grad_accum: Annotated[int, Field(ge=1, le=1024)] = 1
    ema_decay: Annotated[float, Field(ge=0.0, le=0.999999)] = 0.0
    label_smoothing: Rate = 0.1
    drop_worst_ratio: Rate = 0.0
    drop_worst_after: Annotated[int, Field(ge=0)] = 0
    freeze_embeddings: bool = False
    freeze_resnet: bool = False

    def __post_init__(self) -> None:
        if self.end_lr > self.lr:
            raise ValueError(f"optim.end_lr ({self.end_lr}) must not exceed optim.lr ({self.lr})")


@config_dataclass
class ScalingSection:
    """Ray Train workers: how many, the resources of each (GPUs only when use_gpu), and how they are placed:
    PACK fills nodes first, SPREAD spreads them, STRICT_SPREAD puts each on its own node.
    min_workers: the fewest workers the run may go on with (null: num_workers, a fixed world size). Below
    num_workers the run is elastic (Ray Train's num_workers=(min, max)): it starts with as many workers as the
    cluster has room for, between the two, and when a worker or its node is lost (with run.max_failures >= 1)
    it restarts from its last checkpoint with as many as are left, and grows again when room comes back (Ray
    looks every minute). The rows of the interrupted epoch not yet trained are shared out among the new world
    (`pipelines.data.source.plan_part`), so each row is still trained once an epoch. resources_per_worker:
    custom Ray resources each worker reserves besides its CPUs and GPUs, e.g. {train_slot: 1} on nodes started
    with `ray start --resources='{"train_slot": 1}'`: one worker a node. Ray counts the workers a cluster has
    room for from the per-worker resources, so an elastic run on CPU nodes needs such a resource to keep one
    worker a node (fractional CPUs alone fit every worker on one node).
    threads_per_worker: PyTorch's intra-op threads in each worker; null: the CPUs it reserves
    (cpus_per_worker, rounded down, at least 1), as Ray gives its tasks. PyTorch's own default, every core of
    the node, oversubscribes a node shared with other workers or the data pipeline: on 2 cores, a worker of
    0.5 CPU beside its data actors trained faster with 1 thread than with 2 (`bench/learning_curve.py`)."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] = 1
    min_workers: Annotated[int, Field(ge=1, le=4096)] | None = None
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(ge=0.0, le=1024.0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0.0, le=64.0)] = 1.0
    resources_per_worker: dict[Annotated[str, Field(min_length=1, max_length=200)],
                               Annotated[float, Field(gt=0.0, le=1e6)]] = field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    threads_per_worker: Annotated[int, Field(ge=1, le=1024)] | None = None

    def __post_init__(self) -> None:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers ({self.min_workers}) must not exceed scaling.num_workers "
                             f"({self.num_workers})")
        own = sorted(set(self.resources_per_worker) & {"CPU", "GPU", "memory", "object_store_memory"})
        if own:
            raise ValueError(f"scaling.resources_per_worker.{own[0]}: CPUs and GPUs are cpus_per_worker and "
                             "gpus_per_worker; this map is for custom resources")

    @property
    def least_workers(self) -> int:
        """The fewest workers the run may go on with: min_workers, else num_workers."""
        return self.num_workers if self.min_workers is None else self.min_workers

    @property
    def threads(self) -> int:
        """The intra-op threads a worker runs (threads_per_worker, else its CPUs)."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


@config_dataclass
class RunSection:
    """name: identifies the run: rerunning with the same name (and storage_path) continues it from its latest
    checkpoint. storage_path: local directory or s3:// prefix for checkpoints. max_failures: worker-group
    restarts after a failure, per fit (one fit trains all the epochs a call has left; pipelines.train.driver).
    max_start_failures: worker groups that could not start (Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S
    for their resources, 60 s by default) before the run fails; -1: it waits for its resources without end, as
    on an autoscaling cluster that brings a lost node back. A run that lost a node and may not go on with fewer
    workers (scaling.min_workers) fails after max_start_failures + 1 such waits, naming the node.
    keep_checkpoints: the best N by the validation metric (the latest is kept too).
    checkpoint_every_steps: also checkpoint mid-epoch (0: at epoch ends only). precision (training and the
    validation through the predictor alike; `ofa_model.precision`): "auto" is bf16 autocast where the hardware runs
    bf16 natively (CPUs with AVX-512 BF16/AMX, Ampere+ GPUs), fp32 elsewhere; "fp16" (CUDA only) adds a grad
    scaler. memory_format: "auto" is channels_last for the ResNet. log_every_s: seconds between progress lines.
    time_budget_s: a wall-clock budget from the `train()` call (None: none): after each epoch, the run stops when
    one more would end past it, judged from the epoch just trained, its validation, and the whole validation
    split's extra time when validation.full_at_end (every estimate measured, plus a 5% margin on the training);
    the epoch it stops after validates as the last. The rate schedule is planned over `epochs` and is cut where
    the run stops (set optim.end_lr = optim.lr for a constant rate). Rerunning the run continues it."""

    name: Name = "ofa-run"
    storage_path: str = "./ray_results"
    max_failures: Annotated[int, Field(ge=-1)] = 0  # -1: unlimited
    max_start_failures: Annotated[int, Field(ge=-1)] = -1  # -1: unlimited
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    checkpoint_every_steps: Annotated[int, Field(ge=0)] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    log_every_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 30.0
    time_budget_s: Annotated[float, Field(gt=0.0, le=1e7)] | None = None


@config_dataclass
class TrackingSection:
    """MLflow. tracking_uri: None reads the driver's MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working
    directory (refused in a job submitted to a cluster); the driver hands the one it resolves to every worker.
    registered_model: register the best bundle under this name (None: do not register); the `champion` alias
    moves only when its validation metric beats the current champion's, measured on the same split of the same
    data (else it stays, with a warning). system_metrics_every_s: seconds between two samples of MLflow's system
    metrics (CPU, memory, disk, network, NVIDIA GPUs) of rank 0's machine during training, one more at each
    fit's end (0: none). server_wait_s: how long the end of a run (the last buffered metrics, the bundle
    artifact, registration, the run's status) waits for a tracking server that is away before the run fails
    (metrics still undelivered then are dropped with a warning); metrics logged during training are buffered
    and sent in the background, so training never waits for the server."""

    tracking_uri: str | None = None
    experiment: str = "ofa-ray"
    registered_model: str | None = None
    system_metrics_every_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 10.0
    server_wait_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 300.0


@config_dataclass
class ValidationSection:
    """Validation after every epoch through `OFAPredictor`: `max_rows` rows of `split` (None: all).
    mode: VQA inference mode (open / trie / allcand; None: the task's default). full_at_end: the run's last
    epoch validates every row of the split, the epochs before it `max_rows` (a cheap curve and a final figure
    on the whole split; the best-checkpoint choice then compares the last epoch's whole-split score with the
    earlier epochs' subset scores)."""

    split: str = "val"
    max_rows: Annotated[int, Field(ge=1)] | None = 500
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    mode: Literal["open", "trie", "allcand"] | None = None
    full_at_end: bool = False


@config_dataclass
class ScstSection:
    """Self-critical sequence training (caption stage 2): `samples` hypotheses per image from beam search
    (or sampling), CIDEr-D reward, leave-one-out baseline."""

    enabled: bool = False
    samples: Annotated[int, Field(ge=2, le=32)] = 5  # >= 2: the leave-one-out baseline needs another sample
    sampling: bool = False
    max_len_b: int = 16
    no_repeat_ngram_size: int = 3


AnswerFile = Annotated[str, Field(pattern=r"\S")]  # a local path (from the cwd) or an s3:// URI
AnswerList = tuple[Annotated[str, Field(pattern=r"\S")], ...]


def _file_or_list(value: object) -> str | None:
    """Which form of an answer set `value` is: a file or a list are told apart by type, so that an error names
    the one that was meant (`answers.list.0: ...`)."""
    return "file" if isinstance(value, str) else "list" if isinstance(value, list | tuple) else None


_BY_TYPE = Discriminator(_file_or_list, custom_error_type="answer_set",
                         custom_error_message="expected an answer file (a path or s3:// URI) or a list of answers")
Answers = Annotated[Annotated[AnswerFile, Tag("file")] | Annotated[AnswerList, Tag("list")], _BY_TYPE]
Labels = Annotated[Annotated[AnswerFile, Tag("file")] | Annotated[AnswerList, Field(min_length=1), Tag("list")],
                   _BY_TYPE]


@config_dataclass
class TrainConfig:
    """task: the task trained (a key of TASKS or of custom_tasks); mixture: task -> weight for multi-task
    pretraining (then `task` names the one validated). answers: the main task's closed answer or label set
    (trie-constrained loss, `allcand`/`trie` validation, candidate-ranking tasks such as image_classification),
    as a file (a local path or s3:// URI of a .txt file, one answer a line; a .json list or answer -> index
    object; OFA's trainval_ans2label.pkl) or, for a few answers, a list; empty: unconstrained. labels: the closed
    label sets of the mixture's other tasks (task -> file or list; built-in label tasks such as itm and
    visual_entailment have theirs). In a mixture every row trains under its own task's constraint, as alone.
    The driver reads each file once (`pipelines.train.setup.with_answer_sets`): workers get the answers, and
    every bundle the run saves stores them (the predictor's candidates by default)."""

    data: DataConfig
    task: str = "vqa"
    mixture: Annotated[dict[str, Annotated[float, Field(ge=1e-9, le=1e9)]], Field(min_length=1)] | None = None
    custom_tasks: dict[str, str] = field(default_factory=dict)
    answers: Answers = ()
    labels: dict[str, Labels] = field(default_factory=dict)
    epochs: Annotated[int, Field(ge=1, le=100_000)] = 1
    max_steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    scst: ScstSection = field(default_factory=ScstSection)

    def __post_init__(self) -> None:
        clash = sorted(set(self.custom_tasks) & set(TASKS))
        if clash:
            raise ValueError(f"custom_tasks.{clash[0]}: a custom task cannot replace a built-in task")
        known = set(TASKS) | set(self.custom_tasks)
        for name in [self.task, *(self.mixture or {})]:
            if name not in known:
                raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(known))}")
        mixed = set(self.mixture or {})
        for key, names in (("data.derive", set(self.data.derive)), ("data.sources", set(self.data.sources))):
            strays = sorted(names - mixed - ({DERIVED[t] for t in self.data.derive} if key == "data.sources" else set()))
            if strays:
                raise ValueError(f"{key}: {strays[0]} is not a task of the mixture "
                                 f"({', '.join(sorted(mixed)) or 'none: this run trains one task'})")
        for name in self.labels:
            if name not in (self.mixture or {}) or name == self.task:
                raise ValueError(f"labels.{name}: labels are for the mixture's other tasks ({name!r} is not one; "
                                 f"the main task's closed set is `answers`)")
        spec = TASKS.get(self.task) or parse_instruction(self.custom_tasks[self.task], self.task)
        if not self.answers and not spec.labels and (self.validation.mode in ("allcand", "trie")
                                                     or spec.inference != "generate"):
            why = (f"validation.mode {self.validation.mode}" if self.validation.mode in ("allcand", "trie")
                   else f"task {self.task} (it ranks candidates)")
            raise ValueError(f"answers: {why} needs the closed answer set: name a file (answers: path or "
                             "s3://...: one answer a line, a JSON list, or OFA's trainval_ans2label.pkl) or list "
                             "the answers")
        if spec.metric == "caption" and shutil.which("java") is None:
            raise ValueError(f"task {self.task}: validation scores captions with pycocoevalcap's PTB tokenizer, "
                             "which runs Java, and `java` is not on PATH: install a Java runtime (the Dockerfile "
                             "installs openjdk-17-jre-headless)")

    def answer_sets(self) -> dict[str, tuple[str, ...]]:
        """The closed sets the run trains with, task -> answers: the main task's `answers` and the mixture's
        `labels` (what every bundle of the run stores). The files must have been read (the driver's
        `pipelines.train.setup.with_answer_sets`): a set still named by its file is a ValueError."""
        if self.answer_files():
            raise ValueError(f"{sorted(self.answer_files())} still name files; the driver reads them first "
                             "(pipelines.train.setup.with_answer_sets)")
        sets = {task: tuple(labels) for task, labels in self.labels.items()}
        if self.answers:
            sets[self.task] = tuple(self.answers)
        return sets

    def answer_files(self) -> dict[str, str]:
        """The answer and label files this config names, by key ("answers", "labels.<task>")."""
        files = {"answers": self.answers} if isinstance(self.answers, str) else {}
        return files | {f"labels.{task}": ref for task, ref in self.labels.items() if isinstance(ref, str)}
