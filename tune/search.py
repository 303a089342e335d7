"""A sweep's configuration: the fine-tune it starts from, the search space, the search and the stopping rule.

    cfg = load_sweep_config("configs/tune/vqa.yaml", ["num_samples=16", "train.epochs=3"])
    plan = plan_sweep(cfg)           # every check done: base config, space keys and corners, optuna present
    plan.trial_config(params, "vqa-sweep-abc12_00003")    # one trial's TrainConfig

A sweep YAML names a fine-tune YAML (`base`, relative to the working directory) and a mapping `train` merged
onto it (the same keys as the fine-tune YAML; `train.epochs` is also ASHA's max_t). `space` maps dotted
`TrainConfig` keys to exactly one distribution each:

    space:
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      optim.warmup_ratio: {uniform: [0.0, 0.1]}
      data.batch_size: {choice: [16, 32]}
      optim.freeze_embeddings: {choice: [true, false]}
      model.regularization.encoder_drop_path: {grid: [0.0, 0.1]}    # every value, num_samples times each
    tie: {model.regularization.decoder_drop_path: model.regularization.encoder_drop_path}

`tie` gives a key the value sampled for another (one drop-path rate for encoder and decoder). Integer keys
take `choice` or `grid` only. Every value a distribution can produce (range ends, each choice) is applied to the
base config and validated before anything starts, so a bad range fails here, naming the key, not in trial 7.

The metric is the task's validation metric (`val/<name>`, `ofa_model.evaluation.primary_metric`), never
configured. `search: optuna` (TPE) needs the optional dependency (`pip install 'ofa-ray[tune]'`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ofa_model.config_files import (
    build,
    config_dataclass,
    merge,
    parse_overrides,
    read_config,
    read_config_file,
    required_keys,
    to_dict,
)
from ofa_model.errors import ConfigError
from pipelines.train.train_config import TrainConfig

Scalar = bool | int | float | str
KINDS = ("loguniform", "uniform", "choice", "grid")
Values = Annotated[tuple[Scalar, ...], Field(min_length=1)]


@config_dataclass
class Dist:
    """One hyperparameter's distribution: exactly one field is set.

    loguniform / uniform: [low, high] (floats; loguniform needs low > 0). choice: values sampled uniformly.
    grid: every value, each in num_samples trials (random search only)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: Values | None = None
    grid: Values | None = None

    def __post_init__(self) -> None:
        kinds = [k for k in KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"exactly one distribution of {', '.join(KINDS)} must be given, got {kinds or 'none'}")
        lo_hi = self.loguniform or self.uniform
        if lo_hi is not None:
            lo, hi = lo_hi
            if not lo < hi:
                raise ValueError(f"{self.kind}: low < high is needed, got [{lo}, {hi}]")
            if self.loguniform is not None and lo <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {lo}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def corners(self) -> tuple[Scalar, ...]:
        """Every value the distribution can produce at its extremes: range ends, or each listed value."""
        return tuple(getattr(self, self.kind))

    def describe(self) -> str:
        """"loguniform(1e-05, 0.001)", "choice(16, 32)"."""
        return f"{self.kind}({', '.join(format_value(v) for v in self.corners())})"

    def to_tune(self):
        """The Ray Tune search-space object."""
        from ray import tune as ray_tune

        if self.loguniform is not None:
            return ray_tune.loguniform(*self.loguniform)
        if self.uniform is not None:
            return ray_tune.uniform(*self.uniform)
        if self.choice is not None:
            return ray_tune.choice(list(self.choice))
        return ray_tune.grid_search(list(self.grid))


@config_dataclass
class AshaSection:
    """Asynchronous successive halving on the validation metric, one time unit per epoch (max_t: the trials'
    `epochs`). A trial reaching a rung (grace_period, grace_period * reduction_factor, ...) below the
    1 - 1/reduction_factor quantile of the trials already recorded there stops."""

    grace_period: Annotated[int, Field(ge=1)] = 1  # epochs
    reduction_factor: Annotated[float, Field(gt=1.0)] = 2.0


@config_dataclass
class TrialSection:
    """What Tune reserves per trial: the trial is a small driver (driver_cpus) that runs `train()`; its Ray
    Train workers take the resources of the trial config's `scaling` (set it under `train.scaling`).
    max_failures: restarts of a failed trial (each continues its training run from its last checkpoint)."""

    driver_cpus: Annotated[float, Field(ge=0.0, le=64.0)] = 0.25
    max_failures: Annotated[int, Field(ge=-1)] = 0  # -1: unlimited


@config_dataclass
class SweepConfig:
    """name: identifies the sweep: rerunning with the same name (and storage) resumes it (Tune restore).
    storage_path: where Tune's experiment and the trials' training runs live (None: the base config's
    `run.storage_path`). search: "random" (Tune's variant generator, with `grid` values) or "optuna" (TPE).
    seed: the searcher's seed. points_to_evaluate: trials to run first (mappings of space keys), e.g. the
    published recipe. asha: null runs every trial to the end."""

    base: str
    name: Annotated[str, Field(min_length=1, max_length=120, pattern=r"^[^/]+$")]  # no '/': it names directories
    train: dict[str, Any] = field(default_factory=dict)
    space: Annotated[dict[str, Dist], Field(min_length=1)] = field(default_factory=dict)
    tie: dict[str, str] = field(default_factory=dict)
    points_to_evaluate: tuple[dict[str, Any], ...] = ()
    search: Literal["random", "optuna"] = "random"
    seed: int = 0
    num_samples: Annotated[int, Field(ge=1, le=100_000)] = 8
    max_concurrent_trials: Annotated[int, Field(ge=1, le=10_000)] = 2
    asha: AshaSection | None = field(default_factory=AshaSection)
    storage_path: str | None = None
    trial: TrialSection = field(default_factory=TrialSection)


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """The sweep config at `path` with `key=value` overrides (`train.optim.lr=...` reaches the base config), read
    and validated by the one loader (`read_config`, then `build`); a `space` override replaces the distribution of
    each key it names instead of merging into it."""
    source = str(path)
    over = parse_overrides(overrides)
    space_over = over.pop("space", None)
    raw = read_config(path, data=over, source=source)
    if space_over is not None:  # an override replaces a key's distribution (merging would keep both)
        if not isinstance(space_over, Mapping) or not isinstance(raw.get("space", {}), Mapping):
            raise ConfigError(f"{source}: space override: expected a mapping, e.g. space={{optim.lr: {{choice: [1.0e-4]}}}}")
        raw["space"] = {**raw.get("space", {}), **space_over}
    space = raw.get("space")
    if isinstance(space, Mapping):  # a misspelt distribution is named here, not lost in pydantic's defaults
        for key, dist in space.items():
            if not isinstance(dist, Mapping) or len(dist) != 1 or next(iter(dist)) not in KINDS:
                hint = ""
                if isinstance(dist, Mapping) and dist and not set(dist) & set(KINDS):
                    hint = (f" (space keys are whole dotted names: space={{{key}.<key>: {{loguniform: [1.0e-5, 1.0e-3]}}}}"
                            " on the command line)")
                raise ConfigError(f"{source}: space.{key}: expected one of {{{', '.join(f'{k}: ...' for k in KINDS)}}}"
                                  f", got {dist!r}{hint}")
    return build(SweepConfig, raw, source)


# =============================================================================================================
# The plan: everything checked against the base fine-tune config


@dataclass(frozen=True)
class SweepPlan:
    cfg: SweepConfig
    base: TrainConfig  # the base YAML with `train` merged in; tracking URI and local storage made absolute
    user_base: TrainConfig  # the same as written (for the best config a user keeps)
    metric: str  # "val/<name>", the key trials report and ASHA reads
    mode: str  # "max" or "min"
    storage_path: str  # absolute local path or URI
    fingerprint: str  # of the sweep and base configs: a resumed sweep must be the same sweep

    @property
    def max_t(self) -> int:
        return self.base.epochs

    @property
    def experiment_path(self) -> str:
        from pipelines.storage import join

        return join(self.storage_path, self.cfg.name)

    @property
    def runs_path(self) -> str:
        """Where the trials' training runs (`run.storage_path` of each trial) live."""
        from pipelines.storage import join

        return join(self.storage_path, f"{self.cfg.name}-runs")

    def trial_config(self, params: Mapping[str, Any], run_name: str, *, storage_path: str | None = None,
                     registered_model: str | None = None, source: str = "trial") -> TrainConfig:
        """The base config with `params` (space keys) and the ties applied, under `run_name`, checkpoints in
        `storage_path` (default: the sweep's runs path), registering under `registered_model` (None: off)."""
        raw = apply_params(to_dict(self.base), params, self.cfg.tie)
        raw["run"]["name"] = run_name
        raw["run"]["storage_path"] = storage_path or self.runs_path
        raw["tracking"]["registered_model"] = registered_model
        return build(TrainConfig, raw, source)


def resolve_params(params: Mapping[str, Any], tie: Mapping[str, str]) -> dict[str, Any]:
    """`params` plus each tied key with the value of the key it follows."""
    out = dict(params)
    for key, follows in tie.items():
        if follows in params:
            out[key] = params[follows]
    return out


def apply_params(raw: Mapping[str, Any], params: Mapping[str, Any], tie: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the plain config `raw` with `params` (dotted keys) and their ties set."""
    out = copy.deepcopy(dict(raw))
    for dotted, value in resolve_params(params, tie).items():
        *sections, leaf = dotted.split(".")
        node = out
        for part in sections:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def plan_sweep(cfg: SweepConfig, *, source: str = "<sweep>") -> SweepPlan:
    """Check `cfg` against its base config (see the module docstring); ConfigError names what and where."""
    from ofa_model.evaluation import primary_metric
    from pipelines.tracking.registry import tracking_uri
    from pipelines.train import task_specs

    if not Path(cfg.base).is_file():
        raise ConfigError(f"{source}: base: {cfg.base} is not a file (paths are relative to the working "
                          f"directory, {Path.cwd()})")
    where = f"{cfg.base} + {source} train"
    raw_base = read_config_file(cfg.base, cfg.base)
    train = dict(cfg.train)
    if cfg.storage_path is not None and "run.storage_path" in required_keys(merge(raw_base, train)):
        # the trials' runs live under the sweep's storage (runs_path): it stands for the base's required one
        train = merge(train, {"run": {"storage_path": cfg.storage_path}})
    base = user_base = build(TrainConfig, merge(raw_base, train), where, override_prefix="train.")
    # pinned on the driver: a trial runs in another working directory, where a default sqlite:///<cwd>/mlflow.db
    # or a relative ./ray_results would name other files
    pinned = to_dict(base)
    pinned["tracking"]["tracking_uri"] = _absolute_sqlite(tracking_uri(base.tracking.tracking_uri))
    pinned["run"]["storage_path"] = _absolute(base.run.storage_path)
    base = build(TrainConfig, pinned, where)

    for key, dist in cfg.space.items():
        tp = _leaf_type(TrainConfig, key, f"{source}: space.{key}")
        if tp is int and dist.kind in ("loguniform", "uniform"):
            raise ConfigError(f"{source}: space.{key}: an integer key takes choice or grid values, not {dist.kind}")
        for value in dist.corners():
            _apply_checked(base, {key: value}, cfg.tie, f"{source}: space.{key}={value!r}")
    for key, follows in cfg.tie.items():
        _leaf_type(TrainConfig, key, f"{source}: tie.{key}")
        if follows not in cfg.space:
            raise ConfigError(f"{source}: tie.{key}: follows {follows!r}, which is not a key of space")
        if key in cfg.space:
            raise ConfigError(f"{source}: tie.{key}: a tied key cannot also be searched in space")
    for i, point in enumerate(cfg.points_to_evaluate):
        unknown = sorted(set(point) - set(cfg.space))
        if unknown:
            raise ConfigError(f"{source}: points_to_evaluate[{i}]: {unknown} not in space (known: {sorted(cfg.space)})")
        _apply_checked(base, point, cfg.tie, f"{source}: points_to_evaluate[{i}]")

    if cfg.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{source}: search: optuna needs the optuna package, which is not installed: "
                              "pip install 'ofa-ray[tune]' (or pip install 'optuna>=3'), or use search: random")
        grids = sorted(k for k, d in cfg.space.items() if d.kind == "grid")
        if grids:
            raise ConfigError(f"{source}: search: optuna cannot take grid values ({', '.join(grids)}); "
                              "use choice, or search: random")
    if cfg.asha is not None and cfg.asha.grace_period > base.epochs:
        raise ConfigError(f"{source}: asha.grace_period ({cfg.asha.grace_period}) exceeds the trials' epochs "
                          f"({base.epochs}, ASHA's max_t)")
    try:
        metric, mode = primary_metric(task_specs(base)[base.task])
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    storage = _absolute(cfg.storage_path or base.run.storage_path)
    blob = json.dumps({"sweep": to_dict(cfg), "base": to_dict(base)}, sort_keys=True, default=str)
    return SweepPlan(cfg, base, user_base, f"val/{metric}", mode, storage, hashlib.sha256(blob.encode()).hexdigest()[:16])


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The Tune param space: one entry per space key (dotted names kept whole)."""
    return {key: dist.to_tune() for key, dist in cfg.space.items()}


def format_value(v: Any) -> str:
    """A parameter value for tables and names: floats in 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def _absolute(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////<cwd>/relative.db; anything else unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    return uri


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _apply_checked(base: TrainConfig, params: Mapping[str, Any], tie: Mapping[str, str], source: str) -> None:
    build(TrainConfig, apply_params(to_dict(base), params, tie), source)


def _leaf_type(cls: type, dotted: str, where: str) -> Any:
    """The type of the value at `dotted` in the dataclass `cls` (its last part may name an entry of a mapping
    field: `model.dims.resnet_width`, `mixture.vqa`); ConfigError if it is not a value key."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if typing.get_origin(tp) is dict and i == len(parts) - 1:  # an entry of a mapping: model.dims.embed_dim
            key_type, tp = typing.get_args(tp)
            keys = typing.get_args(key_type) if typing.get_origin(key_type) is typing.Literal else None
            if keys is not None and part not in keys:
                raise ConfigError(f"{where}: {part!r} is not a key of {'.'.join(parts[:i])} (known: "
                                  f"{', '.join(keys)})")
            tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
            break
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a section")
        names = sorted(f.name for f in dataclasses.fields(tp) if f.init)
        if part not in names:
            raise ConfigError(f"{where}: {part!r} is not a key of {'.'.join(parts[:i]) or 'the fine-tune config'} "
                              f"(known: {', '.join(names)})")
        tp = _strip_optional(typing.get_type_hints(tp)[part])
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: {dotted} is a section; name one of its keys")
    return tp
