"""Our self-describing model bundle: written atomically, read as untrusted input.

Bundle = a directory with `config.json` (architecture, vocabulary reference, preprocessing, custom tasks, answer
sets, metadata), `model.safetensors`, for the official vocabulary layout `dict.txt`, and, for a model that
generates images, its image tokenizer as the tokenizer bundle `image_tokenizer/` (`ofa_model.vqgan`), which turns
the model's code tokens into pixels. Every bundle carries a complete `PreprocessConfig`, checked against the
architecture when it is saved and when it is loaded; a tokenizer is checked against the vocabulary likewise.

Every way a bundle can be wrong is a `BundleError` (an `InputError`) naming the file and the field, or a
`CheckpointMismatchError` for weights that do not fit the architecture. Loading reads only regular files inside
the bundle's directory, each under a size cap; config.json is validated field by field, and the safetensors
header's shapes are compared with the architecture (built on the meta device) before any weight is allocated.
Saving writes into a temporary directory beside the target and renames it into place, so no reader ever sees
half a bundle; a failed write (a full disk) is an OSError and leaves the old bundle as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ofa_model import errors
from ofa_model.answer_sets import AnswerSetError, answer_sets_of
from ofa_model.architecture import OFAConfig
from ofa_model.errors import ConfigError, InputError, check_value
from ofa_model.instructions import parse_instruction
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.safe_load import file_kind
from ofa_model.tasks import TASKS, TaskSpec
from ofa_model.vocab import Vocabulary
from ofa_model.vqgan import Tokenizer, VQGANConfig, load_tokenizer, save_tokenizer
from ofa_model.weights import TIED_KEYS, CheckpointMismatchError, dtype_mismatch, load_weights, non_finite

BUNDLE_FORMAT = "ofa-ray-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"  # the tokenizer bundle inside a model bundle (config.json names it)
# config.json keys: all required but custom_tasks and answer_sets (absent in bundles written before they were stored)
# and image_tokenizer (only a bundle that generates images has one).
_CONFIG_KEYS = frozenset({"format", "format_version", "model", "vocab", "preprocess", "metadata"})
_OPTIONAL_CONFIG_KEYS = frozenset({"custom_tasks", "answer_sets", "image_tokenizer"})

# Size caps on what a bundle may make us read.
CONFIG_MAX_BYTES = 4 * 2**20
DICT_MAX_BYTES = 16 * 2**20  # OFA's dict.txt is about 0.6 MB
WEIGHTS_MAX_BYTES = 64 * 2**30  # ofa-huge in float32 is 3.7 GB
MAX_PARAMETERS = 10_000_000_000  # ten times ofa-huge (930M)
PATCH_STRIDE = 16  # the ResNet's total stride: a side of S pixels gives ceil(S / 16) patches

_PREPROCESS_FIX = ("re-save the bundle with save_bundle(..., preprocess=PreprocessConfig(...)), or convert the "
                   "checkpoint again with python -m jobs.convert_checkpoint --patch-image-size PX "
                   "--max-src-length N --max-tgt-length N")
_TASK_NAME = re.compile(r"[A-Za-z_][\w.-]{0,63}")


class BundleError(InputError):
    """A bundle that cannot be loaded or written; the message names the file, the field and the fix."""

    reason = errors.BAD_BUNDLE


# ----------------------------------------------------------------------------------------------
# Checks shared by saving and loading


@dataclass(frozen=True)
class BundleLimits:
    """The most work a bundle's architecture and preprocessing may ask of one input, checked when a bundle is saved
    and when it is loaded, before anything is allocated.

    The encoder attends over the image's patches and the source tokens together, so one input costs
    attention_heads x max_encoder_tokens^2 scores per encoder layer (x 4 bytes in fp32): 0.5 GB at the defaults for
    ofa-huge's 16 heads. The defaults are the most the released models can take: their image_bucket_size 42 allows
    a 42x42 grid (672 px; OFA runs at 384-512 px, 576-1024 patches) and max_source_positions 1024 source tokens.
    An architecture with a larger bucket table (the field allows 256, i.e. 65,536 patches: 68 GB of attention for
    one input on ofa-micro) loads only when these are raised on purpose.
    """

    max_image_tokens: int = 42 * 42  # patches of one image: ceil(patch_image_size / 16)^2
    max_encoder_tokens: int = 42 * 42 + 1024  # image patches + source tokens (max_src_length + <s> and </s>)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f"BundleLimits.{f.name}", getattr(self, f.name), int, 1, math.inf)


def check_preprocess_fits(preprocess: PreprocessConfig, config: OFAConfig, limits: BundleLimits | None = None) -> None:
    """Raise ConfigError, naming both numbers, when `preprocess` asks for more than the model's tables hold or more
    image or encoder tokens than `limits` (default `BundleLimits()`) allow."""
    limits = BundleLimits() if limits is None else limits
    s, buckets = preprocess.patch_image_size, config.image_bucket_size
    grid = -(-s // PATCH_STRIDE)
    if grid > buckets:
        raise ConfigError(f"patch_image_size {s} gives a {grid}x{grid} patch grid, larger than the model's "
                          f"image_bucket_size {buckets} (at most {buckets * PATCH_STRIDE} px)")
    if grid * grid > limits.max_image_tokens:
        raise ConfigError(f"patch_image_size {s} gives {grid * grid:,} image tokens ({grid}x{grid} patches), over "
                          f"BundleLimits.max_image_tokens {limits.max_image_tokens:,}; raise the limit only for a "
                          "model trained at that resolution")
    encoder = grid * grid + preprocess.max_src_length + 2
    if encoder > limits.max_encoder_tokens:
        raise ConfigError(f"patch_image_size {s} and max_src_length {preprocess.max_src_length} give "
                          f"{encoder:,} encoder tokens ({grid * grid:,} image + {preprocess.max_src_length + 2:,} "
                          f"source), over BundleLimits.max_encoder_tokens {limits.max_encoder_tokens:,}")
    if preprocess.max_src_length + 2 > config.max_source_positions:
        raise ConfigError(f"max_src_length {preprocess.max_src_length} (+ <s> and </s>) exceeds the model's "
                          f"max_source_positions {config.max_source_positions}")
    if preprocess.max_tgt_length > config.max_target_positions:
        raise ConfigError(f"max_tgt_length {preprocess.max_tgt_length} exceeds the model's max_target_positions "
                          f"{config.max_target_positions}")


def expected_state(config: OFAConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor a bundle of `config` stores (tied copies excluded).

    The model is built on the meta device, so nothing is allocated; a config over MAX_PARAMETERS raises ConfigError.
    """
    with torch.device("meta"):
        model = OFAModel(config)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMETERS:
        raise ConfigError(f"the architecture has {n:,} parameters, over the limit of {MAX_PARAMETERS:,}")
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if k not in TIED_KEYS}


def _check_custom_tasks(tasks, where: str) -> None:
    """BundleError unless `tasks` maps new task names to instruction lines that parse; never a built-in's name."""
    if not isinstance(tasks, Mapping):
        raise BundleError(f"{where}: custom_tasks must map task names to instruction lines, got {type(tasks).__name__}")
    for name, line in tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            raise BundleError(f"{where}: custom task name {name!r} must be 1-64 letters, digits, '_', '.' or '-', "
                              "starting with a letter or '_'")
        if name in TASKS:
            raise BundleError(f"{where}: custom task {name!r} has the name of a built-in task; a bundle cannot "
                              "replace a built-in task: give it another name")
        if not isinstance(line, str):
            raise BundleError(f"{where}: custom_tasks.{name} must be an instruction line, got {type(line).__name__}")
        try:
            parse_instruction(line, name)
        except ConfigError as e:  # parse_instruction's error for a malformed line
            raise BundleError(f"{where}: custom_tasks.{name}: {e}") from e


def _check_answer_sets(sets, custom_tasks: Mapping[str, str], where: str) -> dict[str, tuple[str, ...]]:
    """`sets` (task -> answers, `ofa_model.answer_sets.check_answer_set` each) of tasks the bundle knows, else
    BundleError naming the field."""
    try:
        out = answer_sets_of(sets, "answer_sets")
    except AnswerSetError as e:
        raise BundleError(f"{where}: {e}") from e
    unknown = sorted(set(out) - set(TASKS) - set(custom_tasks))
    if unknown:
        raise BundleError(f"{where}: answer_sets names tasks the bundle does not know: {unknown}")
    return out


def check_image_tokenizer(tokenizer: VQGANConfig, vocab, where: str) -> None:
    """BundleError naming `where` unless the tokenizer's codebook (n_embed) fits the vocabulary's code tokens. The
    rest is checked where each config is built: a tokenizer writes RGB (`VQGANConfig`: out_ch is 3), and the
    model's code_image_size is a multiple of 8 (`OFAConfig`), a side any tokenizer decodes (it is convolutional:
    OFA's pretraining decodes 128 px centres with its 256 px tokenizer)."""
    if tokenizer.n_embed > vocab.num_codes:
        raise BundleError(f"{where}: the image tokenizer {tokenizer.name!r} has {tokenizer.n_embed} codes (n_embed), "
                          f"more than the vocabulary's {vocab.num_codes} code tokens; use a tokenizer with at most "
                          f"{vocab.num_codes} codes")


# ----------------------------------------------------------------------------------------------
# Reading only what belongs to a bundle


def bundle_root(path: str | Path) -> Path:
    p = Path(path)
    try:
        root = p.resolve(strict=True)
    except FileNotFoundError:
        raise BundleError(f"{p} is not a model bundle: it does not exist") from None
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise BundleError(f"{p}: cannot resolve the bundle directory: {e}") from None
    if not root.is_dir():
        raise BundleError(f"{p} is not a model bundle: not a directory")
    return root


def _bundle_file(root: Path, name, max_bytes: int) -> Path:
    """Resolved path of the regular file `name` inside bundle `root`, at most `max_bytes` long, else BundleError.

    A symlink may point elsewhere inside the bundle, never out of it; FIFOs, devices and directories are refused.
    """
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise BundleError(f"{root}: {name!r} is not a file name inside the bundle")
    where = root / name
    try:
        target = where.resolve(strict=True)
        st = target.stat()
    except FileNotFoundError:
        raise BundleError(f"{where} is missing") from None
    except (OSError, RuntimeError) as e:
        raise BundleError(f"{where} cannot be resolved: {e}") from None
    if not target.is_relative_to(root):
        raise BundleError(f"{where} links to {target}, outside the bundle {root}; a bundle reads only its own files")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{where} is not a regular file ({file_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        raise BundleError(f"{where} is {st.st_size:,} bytes, over the {max_bytes:,}-byte cap for this file")
    return target


def read_bundle_file(root: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of a checked bundle file; re-checked on the open descriptor, read no further than the cap."""
    target = _bundle_file(root, name, max_bytes)
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # never blocks on a FIFO swapped in
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{target} is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BundleError(f"{target} is over the {max_bytes:,}-byte cap for this file")
    return data


def parse_json(data: bytes, where: Path) -> dict:
    def reject(constant: str):
        raise BundleError(f"{where}: {constant} is not a valid JSON number")

    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=reject)
    except BundleError:
        raise
    except UnicodeDecodeError as e:
        raise BundleError(f"{where} is not UTF-8 text ({e})") from None
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{where} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_bundle_config(path: str | Path) -> dict:
    """A bundle's config.json, its format and top-level keys checked (the sections are checked by load_bundle)."""
    root = bundle_root(path)
    where = root / CONFIG_FILE
    if not os.path.lexists(where):
        raise BundleError(f"{root} is not a model bundle: {CONFIG_FILE} missing")
    cfg = parse_json(read_bundle_file(root, CONFIG_FILE, CONFIG_MAX_BYTES), where)
    if cfg.get("format") != BUNDLE_FORMAT or cfg.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{where}: format {cfg.get('format')!r} v{cfg.get('format_version')} is not "
                          f"{BUNDLE_FORMAT} v{BUNDLE_VERSION}")
    if cfg.get("preprocess") is None:
        raise BundleError(f"{where}: the bundle has no preprocessing parameters ('preprocess'); {_PREPROCESS_FIX}")
    missing = sorted(_CONFIG_KEYS - set(cfg))
    unknown = sorted(set(cfg) - _CONFIG_KEYS - _OPTIONAL_CONFIG_KEYS)
    if missing or unknown:
        raise BundleError(f"{where}: missing keys {missing}, unknown keys {unknown}")
    return cfg


def _load_vocab(root: Path, ref, config: OFAConfig, where: Path) -> Vocabulary:
    """The vocabulary of a reference, its sizes checked against the model before anything is built."""
    if not isinstance(ref, Mapping):
        raise BundleError(f"{where}: vocab must be an object, got {type(ref).__name__}")
    if ref.get("size") != config.vocab_size or isinstance(ref.get("size"), bool):
        raise BundleError(f"{where}: vocab.size {ref.get('size')!r} does not match model.vocab_size {config.vocab_size}")
    for key in ("num_codes", "num_bins"):
        value = ref.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < config.vocab_size:
            raise BundleError(f"{where}: vocab.{key} must be an integer in [1, {config.vocab_size}), got {value!r}")
    if ref["num_codes"] + ref["num_bins"] >= config.vocab_size:
        raise BundleError(f"{where}: vocab.num_codes + vocab.num_bins must leave room for text tokens in "
                          f"vocab_size {config.vocab_size}")
    if ref.get("layout") == "official":
        _bundle_file(root, ref.get("dict_txt"), DICT_MAX_BYTES)
    try:
        vocab = Vocabulary.from_reference(ref, root)
    except (ValueError, OSError) as e:  # the vocabulary's errors for a reference that does not rebuild
        raise BundleError(f"{where}: vocab: {e}") from e
    if len(vocab) != config.vocab_size or vocab.pad_id != config.pad_id:
        raise BundleError(f"{where}: vocabulary (size {len(vocab)}, pad {vocab.pad_id}) does not fit the model "
                          f"(vocab_size {config.vocab_size}, pad_id {config.pad_id})")
    return vocab


def _image_tokenizer_dir(root: Path, name, where: Path) -> Path:
    """The tokenizer bundle's directory `name` (config.json's image_tokenizer) inside bundle `root`, resolved."""
    if name != IMAGE_TOKENIZER_DIR:
        raise BundleError(f"{where}: image_tokenizer must be {IMAGE_TOKENIZER_DIR!r} (the directory inside the "
                          f"bundle), got {name!r}")
    directory = root / name
    try:
        target = directory.resolve(strict=True)
    except FileNotFoundError:
        raise BundleError(f"{directory} is missing (config.json lists an image tokenizer)") from None
    except (OSError, RuntimeError) as e:
        raise BundleError(f"{directory} cannot be resolved: {e}") from None
    if not target.is_relative_to(root) or not target.is_dir():
        raise BundleError(f"{directory} must be a directory inside the bundle {root}")
    return target


def bundle_tokenizer_dir(path: str | Path) -> Path | None:
    """The directory of the image tokenizer that the model bundle at `path` carries (None: it carries none), from
    its config.json alone: for reading the tokenizer's config (`ofa_model.vqgan.tokenizer_digest`) without
    loading any weights."""
    root = bundle_root(path)
    cfg = read_bundle_config(root)
    if "image_tokenizer" not in cfg:
        return None
    return _image_tokenizer_dir(root, cfg["image_tokenizer"], root / CONFIG_FILE)


def _load_image_tokenizer(root: Path, name, vocab, config: OFAConfig, where: Path,
                          device: str | torch.device) -> Tokenizer:
    """The tokenizer bundle in directory `name` of bundle `root`, checked against the vocabulary and model."""
    tokenizer = load_tokenizer(_image_tokenizer_dir(root, name, where), device)
    check_image_tokenizer(tokenizer.config, vocab, str(root / IMAGE_TOKENIZER_DIR))
    return tokenizer


def _weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) from a safetensors header, read without loading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{path} is not a valid safetensors file: {e}") from e


def _check_header(header: dict[str, tuple[tuple[int, ...], str]],
                  expected: dict[str, tuple[tuple[int, ...], torch.dtype]], source: str) -> None:
    """CheckpointMismatchError unless the header holds exactly the expected names, shapes and kinds of dtype."""
    embed = expected.get("encoder.embed_tokens.weight")
    expected = {**expected, **{k: embed for k in TIED_KEYS if k in header and embed}}  # tied copies are tolerated
    missing = sorted(k for k in expected if k not in header)
    unexpected = sorted(k for k in header if k not in expected)
    shapes = sorted(f"{k}: checkpoint {header[k][0]} vs model {shape}"
                    for k, (shape, _) in expected.items() if k in header and header[k][0] != shape)
    dtypes = sorted(filter(None, (dtype_mismatch(k, header[k][1], dtype)
                                  for k, (_, dtype) in expected.items() if k in header)))
    if missing or unexpected or shapes or dtypes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes, dtypes)


# ----------------------------------------------------------------------------------------------
# Our bundle


@dataclass(frozen=True)
class Bundle:
    """What a bundle holds once loaded."""

    model: OFAModel
    vocab: Vocabulary
    config: OFAConfig
    preprocess: PreprocessConfig
    metadata: dict = field(default_factory=dict)
    custom_tasks: dict[str, str] = field(default_factory=dict)  # name -> instruction line, declared in training
    answer_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # task -> the closed set it trained with
    image_tokenizer: Tokenizer | None = None  # turns generated code tokens into pixels (text-to-image models)

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        """The built-in tasks plus the bundle's custom ones (which never replace a built-in)."""
        return {**TASKS, **{name: parse_instruction(line, name) for name, line in self.custom_tasks.items()}}


def save_bundle(path: str | Path, model: OFAModel, vocab, *, preprocess: PreprocessConfig,
                custom_tasks: Mapping[str, str] | None = None, metadata: Mapping | None = None,
                answer_sets: Mapping[str, Sequence[str]] | None = None, overwrite: bool = False,
                limits: BundleLimits | None = None, image_tokenizer: str | Path | Tokenizer | None = None) -> Path:
    """Write `model`, its vocabulary reference, preprocessing, custom tasks ({name: instruction line}), answer
    sets ({task: answers}: the closed sets it trained with, the predictor's candidates by default) and image
    tokenizer (a tokenizer bundle directory or a loaded `Tokenizer`; stored as `image_tokenizer/`) as a bundle
    directory at `path`.

    Everything is checked first (the vocabulary and `preprocess` against the model and `limits`, custom task names
    against the built-in tasks, the tokenizer against the vocabulary's codes, metadata as plain JSON, finite
    weights): a BundleError naming the field. The bundle
    is written into a temporary directory beside `path` and renamed into place; a failed write is an OSError and
    leaves `path` as it was. A non-empty `path` is refused unless `overwrite`; then it must hold a bundle and
    nothing else, which is replaced only once the new one is complete.
    """
    path = Path(path)
    if not isinstance(preprocess, PreprocessConfig):
        raise TypeError(f"preprocess must be a PreprocessConfig, got {type(preprocess).__name__}; build one with "
                        "PreprocessConfig(...) or PreprocessConfig.from_dict(...)")
    config = model.config
    if len(vocab) != config.vocab_size or vocab.pad_id != config.pad_id:
        raise BundleError(f"vocabulary (size {len(vocab)}, pad {vocab.pad_id}) does not fit the model "
                          f"(vocab_size {config.vocab_size}, pad {config.pad_id})")
    try:
        check_preprocess_fits(preprocess, config, limits)
    except ConfigError as e:
        raise BundleError(f"cannot save a bundle to {path}: preprocess: {e}") from e
    for what, value in (("custom_tasks", custom_tasks), ("metadata", metadata), ("answer_sets", answer_sets)):
        if value is not None and not isinstance(value, Mapping):
            raise BundleError(f"cannot save a bundle to {path}: {what} must be a mapping (a dict) or None, got "
                              f"{type(value).__name__}")
    custom_tasks = dict(custom_tasks or {})
    _check_custom_tasks(custom_tasks, f"cannot save a bundle to {path}")
    answer_sets = _check_answer_sets(dict(answer_sets or {}), custom_tasks, f"cannot save a bundle to {path}")
    if image_tokenizer is not None and not isinstance(image_tokenizer, Tokenizer):
        image_tokenizer = load_tokenizer(image_tokenizer)
    if image_tokenizer is not None:
        check_image_tokenizer(image_tokenizer.config, vocab, f"cannot save a bundle to {path}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    bad = non_finite(state)
    if bad:
        raise BundleError(f"cannot save a bundle to {path}: {len(bad)} weights hold NaN or Inf values: "
                          f"{', '.join(bad)}")
    body = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "model": config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "custom_tasks": custom_tasks,
        "metadata": dict(metadata or {}),
    }
    if answer_sets:
        body["answer_sets"] = {task: list(answers) for task, answers in answer_sets.items()}
    if image_tokenizer is not None:
        body["image_tokenizer"] = IMAGE_TOKENIZER_DIR
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot save a bundle to {path}: metadata must be plain JSON ({e})") from e
    check_bundle_target(path, overwrite)

    def write(tmp: Path) -> None:
        write_weights(state, tmp / WEIGHTS_FILE)
        if image_tokenizer is not None:
            save_tokenizer(tmp / IMAGE_TOKENIZER_DIR, image_tokenizer.model, metadata=image_tokenizer.metadata)
        body["vocab"] = vocab.to_reference(tmp)
        text = json.dumps(body, indent=2, sort_keys=True)
        if len(text.encode()) > CONFIG_MAX_BYTES:  # a reader would refuse it
            raise BundleError(f"cannot save a bundle to {path}: {CONFIG_FILE} would be {len(text.encode()):,} "
                              f"bytes, over the {CONFIG_MAX_BYTES:,}-byte cap (answer sets or metadata too large)")
        (tmp / CONFIG_FILE).write_text(text)

    return write_directory(path, write)


def read_weights(root: Path, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
                 ) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict in `root`'s model.safetensors and that file's path, once its header holds exactly the
    `expected` names, shapes and kinds of dtype (checked before any tensor is read)."""
    weights = _bundle_file(root, WEIGHTS_FILE, WEIGHTS_MAX_BYTES)
    _check_header(_weights_header(weights), expected, str(weights))
    try:
        return load_file(str(weights)), weights
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{weights} is not a valid safetensors file: {e}") from e


def write_directory(path: Path, write) -> Path:
    """Run `write(tmp)` to fill a temporary directory beside `path`, flush it and rename it into place (an old
    directory there is replaced only once the new one is complete); on any failure the temporary one is removed
    and `path` is left as it was. The caller has checked that `path` may be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is read by other users (serving)
        write(tmp)
        _fsync_dir(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, with its write errors (a full disk) as the OSError they are."""
    try:
        save_file(state, str(path), metadata={"format": BUNDLE_FORMAT})
    except SafetensorError as e:  # "Error while serializing: I/O error: No space left on device (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise OSError(f"cannot write {path}: {e}") from e
        raise OSError(int(code.group(1)), f"{os.strerror(int(code.group(1)))} ({e})", str(path)) from e


def _own_files(cfg: Mapping) -> set[str]:
    """Names of the entries at the top of a bundle directory that its config.json accounts for."""
    own = {CONFIG_FILE, WEIGHTS_FILE}
    if cfg.get("image_tokenizer") == IMAGE_TOKENIZER_DIR:
        own.add(IMAGE_TOKENIZER_DIR)
    ref = cfg.get("vocab")
    dict_txt = ref.get("dict_txt") if isinstance(ref, Mapping) else None
    if isinstance(dict_txt, str) and dict_txt and not Path(dict_txt).is_absolute():
        own.add(Path(dict_txt).parts[0])
    return own


def check_bundle_target(path: Path, overwrite: bool) -> None:
    """BundleError unless `path` is absent, an empty directory, or (with `overwrite`) a bundle to replace that
    holds nothing but its own files: overwriting replaces the whole directory, so a user's other files there are
    named and refused, never deleted."""
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; write the bundle to a real directory path")
    if not path.exists():
        return
    if not path.is_dir():
        raise BundleError(f"{path} exists and is not a directory; choose another output")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"{path} is not empty; pass overwrite=True (--overwrite) to replace the bundle there")
    try:
        cfg = read_bundle_config(path)
    except BundleError:
        raise BundleError(f"{path} is not empty and holds no readable {BUNDLE_FORMAT}; refusing to replace it "
                          "(remove it yourself if it should go)") from None
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _own_files(cfg))
    if foreign:
        raise BundleError(f"{path} holds files that are not part of its bundle: {foreign}; overwrite replaces the "
                          "whole directory, so refusing (move them elsewhere, or write the bundle to another path)")


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Flush the files of `directory` and the directory itself to disk."""
    for f in directory.iterdir():
        _fsync(f)
    _fsync(directory)


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished bundle `tmp` to `path`; an old bundle there is moved aside first and removed after."""
    if path.exists() and any(path.iterdir()):
        old = tmp.with_name(tmp.name + ".old")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    _fsync(path.parent)


def _read_architecture(path: str | Path) -> tuple[Path, dict, Path, OFAConfig]:
    """A bundle's root, its config.json, that file's path (for errors) and its checked architecture."""
    root = bundle_root(path)
    cfg = read_bundle_config(root)
    where = root / CONFIG_FILE
    try:
        return root, cfg, where, OFAConfig.from_dict(cfg["model"])
    except ConfigError as e:
        raise BundleError(f"{where}: model: {e}") from e


def load_bundle(path: str | Path, device: str | torch.device = "cpu", *, limits: BundleLimits | None = None) -> Bundle:
    """Rebuild model (eval mode, on `device`), vocabulary, preprocessing, custom tasks, answer sets and the image
    tokenizer (None for a bundle without one) from a bundle.

    Every section of config.json is checked, the preprocessing against the model and `limits` (default
    `BundleLimits()`), and the weights' header against the architecture, before the model is allocated. Any problem
    is a BundleError (a CheckpointMismatchError for weights that do not fit) naming the file and the field.
    """
    root, cfg, where, config = _read_architecture(path)
    try:
        preprocess = PreprocessConfig.from_dict(cfg["preprocess"], complete=True)
    except ConfigError as e:
        raise BundleError(f"{where}: preprocess: {e}; {_PREPROCESS_FIX}") from e
    try:
        check_preprocess_fits(preprocess, config, limits)
        expected = expected_state(config)
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from e
    custom_tasks = cfg.get("custom_tasks", {})
    _check_custom_tasks(custom_tasks, str(where))
    answer_sets = _check_answer_sets(cfg.get("answer_sets", {}), custom_tasks, str(where))
    if not isinstance(cfg["metadata"], dict):
        raise BundleError(f"{where}: metadata must be an object, got {type(cfg['metadata']).__name__}")
    vocab = _load_vocab(root, cfg["vocab"], config, where)
    tokenizer = None
    if "image_tokenizer" in cfg:
        tokenizer = _load_image_tokenizer(root, cfg["image_tokenizer"], vocab, config, where, device)
    state, weights = read_weights(root, expected)
    model = OFAModel(config)
    load_weights(model, state, source=str(weights))
    return Bundle(model.to(device).eval(), vocab, config, preprocess, cfg["metadata"], dict(custom_tasks),
                  answer_sets, tokenizer)

