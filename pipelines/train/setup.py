"""What a run trains: the model, its vocabulary, its tasks, and what an init bundle contributes to the config.

A fine-tune starts from a bundle (`model.init`), which carries the preprocessing and the custom tasks it was
trained with. The rule (`with_init_bundle`, applied by the driver before anything starts):

* preprocessing: `patch_image_size` is always the fine-tune config's (OFA fine-tunes at another resolution
  than it pretrains: 480 for VQA after 384 in pretraining). Every other field is the config's where it differs
  from `PreprocessConfig`'s default, else the bundle's: normalisation and text lengths follow the weights
  unless the YAML says otherwise. The config loader does not record which keys a YAML wrote, so a field set to
  its default value reads as "not set".
* custom tasks: the bundle's, plus the config's; a task both define takes the config's instruction.

Where the result differs from the YAML, it is logged at INFO, field by field.

Image codes belong to the image tokenizer that made them. Before anything starts, the driver compares what every
corpus of a code task (text_to_image, image_infilling) records of its tokenizer (`pipelines.data.image_codes.
codes_record`) with the run's tokenizer, model.image_tokenizer else the init bundle's (`run_image_tokenizer`, from
config files alone), and with the run's code_image_size (`check_code_corpora`): another tokenizer's codes train a
model whose pictures are noise, so that is a ConfigError; a corpus or tokenizer without the record is a warning.

Answer and label files (`answers`, `labels.<task>`: a local path or s3:// URI) are read once, on the driver
(`with_answer_sets`), and replaced by their answers: the workers get the lists (their config is the driver's),
so no worker needs the file, and every bundle the run saves stores them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ofa_model import OFAModel
from ofa_model.answer_sets import MAX_FILE_BYTES, AnswerSetError, parse_answer_set
from ofa_model.architecture import OFAConfig
from ofa_model.bundle import bundle_tokenizer_dir, check_image_tokenizer, load_bundle, read_bundle_config
from ofa_model.config_files import build, to_dict
from ofa_model.errors import ConfigError
from ofa_model.instructions import parse_instruction
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, TaskSpec, codes_per_image, for_code_image_size
from ofa_model.vocab import Vocabulary
from ofa_model.vqgan import DIGEST_KEY, Tokenizer, load_tokenizer, tokenizer_digest
from pipelines import storage
from pipelines.data.dataset import corpora
from pipelines.data.image_codes import codes_record
from pipelines.data.shards import Manifest
from pipelines.storage import S3Options
from pipelines.tracking.registry import resolve_model
from pipelines.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

CONFIG_RESOLUTION = ("patch_image_size",)  # preprocessing fields a fine-tune config always sets


@dataclass
class Setup:
    model: OFAModel
    vocab: Vocabulary
    specs: dict[str, TaskSpec]
    init: str  # where the weights came from ("scratch:<arch>" or the bundle/URI)
    image_tokenizer: Tokenizer | None = None  # what the run's bundles carry (model.image_tokenizer, else the init's)


def task_specs(cfg: TrainConfig, code_image_size: int | None = None) -> dict[str, TaskSpec]:
    """Built-in tasks plus the config's custom ones (which may not replace a built-in name). `code_image_size`:
    the trained model's (`run_code_image_size`); image-code rows must then hold its (code_image_size // 8)^2
    codes (`ofa_model.tasks.for_code_image_size`), else they are bad rows. None: the count is not checked."""
    specs = dict(TASKS)
    for name, line in cfg.custom_tasks.items():
        if name in TASKS:
            raise ValueError(f"custom_tasks.{name}: a custom task cannot replace the built-in task {name!r}")
        specs[name] = parse_instruction(line, name)
    names = [cfg.task] + list(cfg.mixture or {})
    unknown = sorted(n for n in names if n not in specs)
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(specs)}")
    return specs if code_image_size is None else for_code_image_size(specs, code_image_size)


def run_code_image_size(cfg: TrainConfig) -> int:
    """The code_image_size of the model the run trains: the init bundle's (read without building its model), else
    the from-scratch architecture's."""
    if cfg.model.init:
        bundle_config = OFAConfig.from_dict(read_bundle_config(_init_bundle(cfg))["model"])
        return cfg.model.init_architecture(bundle_config).code_image_size
    return cfg.model.architecture().code_image_size


@dataclass(frozen=True)
class RunTokenizer:
    """The image tokenizer a run's bundles carry, as the driver checks corpora against it."""

    where: str  # for messages: "model.image_tokenizer <uri>" or "the init bundle <uri>'s image_tokenizer/"
    uri: str  # what `jobs.prepare_data image-codes --tokenizer` takes to encode with it (redacted)
    digest: str | None  # its `ofa_model.vqgan.weights_digest` (None: saved before tokenizers recorded one)


def run_image_tokenizer(cfg: TrainConfig) -> RunTokenizer | None:
    """The run's image tokenizer (`Setup.image_tokenizer`'s): model.image_tokenizer, else the init bundle's; None
    when neither names one. Reads config.json files only, never weights (the tokenizer and the init bundle are
    fetched to this node's cache when remote, as the workers fetch them)."""
    if cfg.model.image_tokenizer:
        uri = storage.redact(cfg.model.image_tokenizer)
        path = resolve_model(cfg.model.image_tokenizer, tracking=cfg.tracking.tracking_uri, s3=cfg.data.s3).path
        return RunTokenizer(f"model.image_tokenizer {uri}", uri, tokenizer_digest(path))
    if cfg.model.init:
        directory = bundle_tokenizer_dir(_init_bundle(cfg))
        if directory is not None:
            init = storage.redact(cfg.model.init)
            return RunTokenizer(f"the image tokenizer of model.init {init}", str(directory),
                                tokenizer_digest(directory))
    return None


def check_code_corpora(cfg: TrainConfig, manifests: Mapping[str, Manifest], specs: Mapping[str, TaskSpec],
                       code_image_size: int) -> None:
    """ConfigError, naming the corpus's key (`data.uri` or `data.sources.<task>.uri`), when a corpus that a code
    task of the run reads (`specs`' target_kind "codes") records image codes made by another tokenizer than the
    run's (`run_image_tokenizer`; both digests named) or at another code_image_size than the run's
    (`run_code_image_size`). A logged warning, not a failure, where it cannot be told: a corpus without the record
    (older, or converted from OFA's image_examples.tsv), a tokenizer without a digest, a run without a tokenizer.
    `manifests`: every corpus's, by URI (`pipelines.data.dataset.read_manifests`)."""
    readers: dict[tuple[str, str], list[str]] = {}  # (key, uri) -> the code tasks reading it
    for name, corpus in corpora(cfg.data, cfg.mixture).items():
        task = name if cfg.mixture else cfg.task  # one corpus alone is named SINGLE
        if specs[task].target_kind != "codes":
            continue
        key = f"data.sources.{task}.uri" if cfg.mixture and task in cfg.data.sources else "data.uri"
        readers.setdefault((key, corpus.uri), []).append(task)
    if not readers:
        return
    run = run_image_tokenizer(cfg)
    for (key, uri), tasks in sorted(readers.items()):
        where = f"{key}: the corpus {storage.redact(uri)} ({', '.join(tasks)})"
        try:
            record = codes_record(manifests[uri], storage.redact(uri))
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if record is None:
            logger.warning("%s keeps no record of the image tokenizer that made its codes (written before "
                           "`jobs.prepare_data image-codes` kept one, or by another conversion): not checked against "
                           "the run's tokenizer", where)
            continue
        if record.code_image_size != code_image_size:
            raise ConfigError(
                f"{where} holds codes made at code_image_size {record.code_image_size} "
                f"({codes_per_image(record.code_image_size)} a target); this run's model trains at {code_image_size} "
                f"({codes_per_image(code_image_size)}), so every row would be a bad row (wrong_code_count). Encode "
                f"the corpus again with `python -m jobs.prepare_data image-codes --code-image-size {code_image_size}`, "
                f"or train at model.dims.code_image_size={record.code_image_size}")
        if run is None:
            logger.warning("%s holds codes of the image tokenizer %s, and the run carries no image tokenizer "
                           "(model.image_tokenizer, or the init bundle's): not checked", where, record.tokenizer)
        elif run.digest is None or record.tokenizer_sha256 is None:
            older = "the run's tokenizer" if run.digest is None else f"the corpus's tokenizer {record.tokenizer}"
            logger.warning("%s: %s records no %s (saved before tokenizers did), so the corpus cannot be checked "
                           "against %s; save the tokenizer again (ofa_model.vqgan.save_tokenizer)", where, older,
                           DIGEST_KEY, run.where)
        elif run.digest != record.tokenizer_sha256:
            raise ConfigError(
                f"{where} holds codes of the image tokenizer {record.tokenizer} ({DIGEST_KEY} "
                f"{record.tokenizer_sha256}), not of this run's, {run.where} ({DIGEST_KEY} {run.digest}); a model "
                f"trained on another tokenizer's codes draws noise. Encode the corpus again with the run's tokenizer "
                f"(`python -m jobs.prepare_data image-codes --tokenizer {run.uri} ...`), or train with the one that "
                f"made it (model.image_tokenizer={record.tokenizer})")


def merged_preprocess(config: PreprocessConfig, bundle: PreprocessConfig) -> PreprocessConfig:
    """The preprocessing a fine-tune trains with (see the module docstring)."""
    default = PreprocessConfig()
    changes = {f.name: getattr(bundle, f.name) for f in dataclasses.fields(PreprocessConfig)
               if f.name not in CONFIG_RESOLUTION and getattr(config, f.name) == getattr(default, f.name)}
    return dataclasses.replace(config, **changes)


def _init_bundle(cfg: TrainConfig) -> Path:
    """The local directory of `cfg.model.init`. Each process that needs it resolves it itself (the driver, and
    every worker on its own node), so a models:/ or s3:// init is fetched once per node into that node's cache;
    an s3:// init takes the endpoint and region of `data.s3`, else the environment."""
    return resolve_model(cfg.model.init, tracking=cfg.tracking.tracking_uri, s3=cfg.data.s3).path


def with_init_bundle(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the init bundle's preprocessing and custom tasks folded in (the module docstring's rule);
    `cfg` itself when it starts from scratch."""
    if not cfg.model.init:
        return cfg
    bundle = read_bundle_config(_init_bundle(cfg))
    theirs = PreprocessConfig.from_dict(bundle["preprocess"], complete=True)
    preprocess = merged_preprocess(cfg.data.preprocess, theirs)
    for f in dataclasses.fields(PreprocessConfig):
        ours, their, used = (getattr(p, f.name) for p in (cfg.data.preprocess, theirs, preprocess))
        if ours != their:
            logger.info("data.preprocess.%s: %r (the config has %r, the init bundle %s has %r)", f.name, used,
                        ours, cfg.model.init, their)
    custom = {**bundle.get("custom_tasks", {}), **cfg.custom_tasks}
    for name, line in bundle.get("custom_tasks", {}).items():
        if cfg.custom_tasks.get(name, line) != line:
            logger.info("custom_tasks.%s: the config's instruction, not the init bundle's (%r)", name, line)
        elif name not in cfg.custom_tasks:
            logger.info("custom_tasks.%s: from the init bundle %s", name, cfg.model.init)
    raw = to_dict(cfg)
    raw["data"]["preprocess"] = to_dict(preprocess)
    raw["custom_tasks"] = custom
    return build(TrainConfig, raw, f"run {cfg.run.name} with the init bundle {cfg.model.init}")


def read_answer_set(uri: str, s3: S3Options | None = None) -> tuple[str, ...]:
    """The answers of an answer or label file at `uri` (a local path, file:// or s3:// URI), read through
    `pipelines.storage` no further than its size cap and parsed by `ofa_model.answer_sets.parse_answer_set`."""
    try:
        fs, path = storage.resolve(uri, s3)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise AnswerSetError(f"{storage.redact(uri)}: no such file" if info.type == pafs.FileType.NotFound
                                 else f"{storage.redact(uri)}: not a file")
        if info.size is not None and info.size > MAX_FILE_BYTES:
            raise AnswerSetError(f"{storage.redact(uri)}: {info.size:,} bytes, over the limit of {MAX_FILE_BYTES:,} "
                                 "for an answer file")
        with fs.open_input_stream(path) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except AnswerSetError:
        raise
    except (OSError, ValueError) as exc:  # storage's errors for a URI it cannot reach or read
        raise AnswerSetError(f"{storage.redact(uri)}: cannot read the answer file: {storage.redact(str(exc))}") \
            from None
    return parse_answer_set(data, storage.redact(uri))


def with_answer_sets(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every answer and label file it names read (once, here) and replaced by its answers; `cfg` itself
    when it names none. A file that cannot be read or parsed is an AnswerSetError naming the key."""
    files = cfg.answer_files()
    if not files:
        return cfg
    raw = to_dict(cfg)
    for key, uri in files.items():
        try:
            answers = list(read_answer_set(uri, cfg.data.s3))
        except AnswerSetError as exc:
            raise AnswerSetError(f"{key}: {exc}") from None
        if key == "answers":
            raw["answers"] = answers
        else:
            raw["labels"][key.removeprefix("labels.")] = answers
        logger.info("%s: %d answers from %s", key, len(answers), storage.redact(uri))
    return build(TrainConfig, raw, f"run {cfg.run.name} with its answer files")


def build_setup(cfg: TrainConfig) -> Setup:
    """The model to train (training-mode regularisation), from the init bundle or from scratch. `cfg` is the
    driver's, the init bundle's preprocessing and custom tasks already folded in (`with_init_bundle`)."""
    reg = cfg.model.regularization
    tokenizer = None
    if cfg.model.init:
        bundle = load_bundle(_init_bundle(cfg))
        model = OFAModel(cfg.model.init_architecture(bundle.config), reg)
        model.load_state_dict(bundle.model.state_dict())
        vocab, init, tokenizer = bundle.vocab, cfg.model.init, bundle.image_tokenizer
    else:
        vocab = Vocabulary.gpt2()
        arch = cfg.model.architecture(vocab_size=len(vocab), pad_id=vocab.pad_id)
        model = OFAModel(arch, reg)
        init = f"scratch:{arch.name}"
    if cfg.model.image_tokenizer:
        path = resolve_model(cfg.model.image_tokenizer, tracking=cfg.tracking.tracking_uri, s3=cfg.data.s3).path
        tokenizer = load_tokenizer(path)
        check_image_tokenizer(tokenizer.config, vocab, f"model.image_tokenizer {path}")
    return Setup(model, vocab, task_specs(cfg, model.config.code_image_size), init, tokenizer)
