"""`TokenizerTrainConfig`: training the image tokenizer (`ofa_model.vqgan`) from scratch, as nested frozen dataclasses.

Loaded like every job config by `ofa_model.config_files.load_config(TokenizerTrainConfig, path, overrides)`: unknown
keys and bad values are errors naming the dotted key, `<required>` values must be supplied. The architecture is a
named size of `ofa_model.vqgan.VQGAN_SIZES` with field overrides (it is saved in the bundle, never a training knob);
the rest are training knobs. The training itself is `pipelines.train.tokenizer`.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Annotated

from pydantic import Field

from ofa_model.config_files import config_dataclass
from ofa_model.errors import ConfigError
from ofa_model.vqgan import VQGANConfig, tokenizer_config
from pipelines.storage import S3Options
from pipelines.train.train_config import Name, ScalingSection

Weight = Annotated[float, Field(ge=0.0, le=1e6)]
Beta = Annotated[float, Field(ge=0.0, le=0.999999)]
Override = int | float | str | tuple[int, ...]


@config_dataclass
class TokenizerModelSection:
    """arch: a named size of `ofa_model.vqgan.VQGAN_SIZES` ("vqgan-micro": 64 px -> 8 x 8 codes of 512; the
    official "vqgan_gumbel_f8": 256 px -> 32 x 32 of 8192). overrides: fields of `VQGANConfig` that replace the
    named size's (e.g. {n_embed: 256, resolution: 128}); `kl_weight` there is the weight of the quantizer's KL to a
    uniform prior (taming's 1e-8). The architecture is checked here, when the config loads."""

    arch: str = "vqgan-micro"
    overrides: dict[str, Override] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.architecture()
        except (ConfigError, TypeError) as exc:
            raise ValueError(f"model.arch / model.overrides: {exc}") from None

    def architecture(self) -> VQGANConfig:
        """The named size with `overrides`."""
        return tokenizer_config(self.arch, **self.overrides)


@config_dataclass
class TokenizerDataSection:
    """uri: a canonical corpus (`pipelines.data.shards`: Parquet shards + manifest.json; local, file:// or s3://).
    splits / tasks: the shards trained on (tasks null: all; a corpus with several rows per image, such as
    easy-VQA's, trains on images once with a task that has one row per image). image_column: the column holding
    the encoded image bytes. Images are decoded with the OFA preprocessing's limits (max_image_bytes,
    max_image_pixels: a bad image is counted and skipped, never fatal) and resized to the tokenizer's resolution
    (Lanczos, `ofa_model.vqgan.tokenizer_pixels`). batch_size: images per worker per step.
    shuffle_buffer: images in each worker's local shuffle buffer (0: off). cache: keep the decoded images of the
    training split in Ray's object store after the first pass (the later epochs then skip reading and decoding;
    for corpora that fit it). s3: the S3 endpoint / region (null: the environment's)."""

    uri: Annotated[str, Field(min_length=1)]
    splits: tuple[Annotated[str, Field(min_length=1)], ...] = ("train",)
    tasks: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    image_column: Annotated[str, Field(min_length=1, max_length=100)] = "image"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    shuffle_buffer: Annotated[int, Field(ge=0, le=1_000_000)] = 1024
    cache: bool = True
    max_image_bytes: Annotated[int, Field(ge=1, le=2**31)] = 32 * 2**20
    max_image_pixels: Annotated[int, Field(ge=1, le=2**31)] = 64 * 2**20
    s3: S3Options | None = None

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("data.splits: name at least one split")


@config_dataclass
class TokenizerOptimSection:
    """Adam(W) on every weight (the discriminator's has its own, with the same settings); the rate warms up
    linearly over `warmup_ratio` of the steps (or `warmup_updates` steps when set), then decays polynomially
    (`power` 1: linearly) to `end_lr`. clip_norm: max gradient norm (0: off)."""

    lr: Annotated[float, Field(ge=1e-12, le=10.0)] = 1e-3
    betas: tuple[Beta, Beta] = (0.5, 0.9)
    eps: Annotated[float, Field(ge=1e-16, le=1.0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    warmup_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    warmup_updates: Annotated[int, Field(ge=0, le=10**9)] | None = None
    end_lr: Annotated[float, Field(ge=0.0)] = 0.0
    power: Annotated[float, Field(ge=0.1, le=10.0)] = 1.0
    clip_norm: Annotated[float, Field(ge=0.0, le=1e6)] = 1.0

    def __post_init__(self) -> None:
        if self.end_lr > self.lr:
            raise ValueError(f"optim.end_lr ({self.end_lr}) must not exceed optim.lr ({self.lr})")


@config_dataclass
class GumbelSection:
    """The Gumbel-softmax temperature tau, annealed from `start` by exponential decay to a floor, as taming anneals
    it: tau(step) = max(floor, start * exp(-decay * step)). hard: straight-through one-hot samples (the decoder
    sees one codebook entry per position, as at inference) instead of the soft mixture."""

    start: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    floor: Annotated[float, Field(gt=0.0, le=100.0)] = 0.0625
    decay: Annotated[float, Field(ge=0.0, le=1.0)] = 1e-3
    hard: bool = False

    def __post_init__(self) -> None:
        if self.floor > self.start:
            raise ValueError(f"gumbel.floor ({self.floor}) must not exceed gumbel.start ({self.start})")

    def temperature(self, step: int) -> float:
        return max(self.floor, self.start * math.exp(-self.decay * step))


@config_dataclass
class LossSection:
    """Reconstruction loss: l1 * |x - x'| + l2 * (x - x')^2, means over pixels in [-1, 1], plus the quantizer's KL
    term (weighted by the architecture's kl_weight, `model.overrides.kl_weight`), plus usage * the KL from the
    batch's average code distribution to the uniform one (`pipelines.train.tokenizer.usage_loss`: against
    codebook collapse; 0 is taming's loss)."""

    l1: Weight = 1.0
    l2: Weight = 1.0
    usage: Weight = 0.0

    def __post_init__(self) -> None:
        if self.l1 == 0 and self.l2 == 0:
            raise ValueError("loss.l1 / loss.l2: at least one reconstruction weight must be positive")


@config_dataclass
class AdversarialSection:
    """An optional PatchGAN discriminator (`pipelines.train.discriminator`) with hinge losses: from step `start`
    on, the tokenizer's loss adds weight * (-mean D(x')) and the discriminator takes a step of its own on real
    and reconstructed images. layers: stride-2 convolutions; channels: the first one's width."""

    enabled: bool = False
    start: Annotated[int, Field(ge=0)] = 0
    weight: Annotated[float, Field(ge=0.0, le=1e3)] = 0.1
    layers: Annotated[int, Field(ge=1, le=6)] = 2
    channels: Annotated[int, Field(ge=4, le=512)] = 32
    lr: Annotated[float, Field(ge=1e-12, le=10.0)] = 2e-4


@config_dataclass
class TokenizerValidationSection:
    """Held-out images: at most `max_images` of `split` (with data.tasks), reconstructed through the tokenizer's
    own path (argmax codes, then decode) at the start, every `every` steps (0: never) and at the end: PSNR and
    codebook usage. batch_size: images per forward pass."""

    split: Annotated[str, Field(min_length=1)] = "test"
    max_images: Annotated[int, Field(ge=1, le=1_000_000)] = 500
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    every: Annotated[int, Field(ge=0)] = 0


@config_dataclass
class TokenizerRunSection:
    """name: the run (its MLflow run name; the tokenizer goes to `<storage_path>/<name>/tokenizer`).
    storage_path: local directory or s3:// prefix. overwrite: replace a tokenizer already there (else the job
    refuses before it trains). seed: weights, Gumbel noise and shuffling. log_every: steps between progress
    lines and MLflow metrics (rank 0); codebook usage is counted over the steps between two of them.
    max_failures: worker-group restarts after a failure (a restart trains from the start)."""

    name: Name = "vqgan-run"
    storage_path: Annotated[str, Field(min_length=1)] = "./ray_results"
    overwrite: bool = False
    seed: Annotated[int, Field(ge=0)] = 0
    log_every: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    max_failures: Annotated[int, Field(ge=-1)] = 0


@config_dataclass
class TokenizerTrackingSection:
    """MLflow, as for training (`TrackingSection`): tracking_uri (null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    in the working directory, refused in a submitted job), experiment, system_metrics_every_s (0: none),
    server_wait_s (how long the end of the run waits for a tracking server that is away)."""

    tracking_uri: str | None = None
    experiment: str = "ofa-tokenizer"
    system_metrics_every_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 10.0
    server_wait_s: Annotated[float, Field(ge=0.0, le=86400.0)] = 300.0


@config_dataclass
class TokenizerTrainConfig:
    """steps: optimizer updates in all (the data repeats as often as needed); epochs, when set instead, makes
    steps = epochs * (training images // (batch_size * workers)) (the driver counts the images from the
    manifest)."""

    data: TokenizerDataSection
    steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = 1000
    epochs: Annotated[int, Field(ge=1, le=100_000)] | None = None
    model: TokenizerModelSection = field(default_factory=TokenizerModelSection)
    optim: TokenizerOptimSection = field(default_factory=TokenizerOptimSection)
    gumbel: GumbelSection = field(default_factory=GumbelSection)
    loss: LossSection = field(default_factory=LossSection)
    adversarial: AdversarialSection = field(default_factory=AdversarialSection)
    validation: TokenizerValidationSection = field(default_factory=TokenizerValidationSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: TokenizerRunSection = field(default_factory=TokenizerRunSection)
    tracking: TokenizerTrackingSection = field(default_factory=TokenizerTrackingSection)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("steps / epochs: set exactly one of them (the other null)")
        if self.validation.split in self.data.splits:
            raise ValueError(f"validation.split: {self.validation.split!r} is also trained on (data.splits); "
                             "held-out images must come from another split")
