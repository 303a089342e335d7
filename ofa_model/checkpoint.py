"""Checkpoint I/O: our self-describing bundle, and importers for the official checkpoints.

Bundle = a directory with `config.json` (architecture, vocabulary reference, preprocessing, custom tasks,
metadata), `model.safetensors` and, for the official vocabulary layout, `dict.txt`. Every bundle carries a
complete `PreprocessConfig`, checked against the architecture when it is saved and when it is loaded.

Importers read the official fairseq `.pt` files (weights under `model`, optional EMA weights under
`extra_state.ema`) and the HF-port naming; names are mapped explicitly, recomputed buffers are dropped, and any
mismatch fails loudly with every missing, unexpected and mis-shaped key. Nothing is ever unpickled beyond
tensors and inert stand-ins.

Checkpoints and bundles are untrusted input, and every way they can be wrong is an `InputError` naming the file
and the field: `CheckpointError` (and `CheckpointMismatchError`, `UnsafeCheckpointError`) for what is imported,
`BundleError` for bundles. Loading a bundle reads only regular files inside its directory, each under a size cap;
config.json is validated field by field, and the safetensors header's shapes are compared with the
architecture (built on the meta device) before any weight is allocated. Saving writes into a temporary
directory beside the target and renames it into place, so no reader ever sees half a bundle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ofa_model import errors
from ofa_model.architecture import OFAConfig, get_config
from ofa_model.errors import ConfigError, InputError
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, TaskSpec, parse_instruction
from ofa_model.vocab import Vocabulary

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "ofa-ray-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# config.json keys: all required but custom_tasks (absent in bundles written before custom tasks were stored).
_CONFIG_KEYS = frozenset({"format", "format_version", "model", "vocab", "preprocess", "metadata"})
_OPTIONAL_CONFIG_KEYS = frozenset({"custom_tasks"})

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

# Weights shared with encoder.embed_tokens.weight (one matrix for encoder, decoder and output).
TIED_KEYS = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Buffers of the official model that we recompute (never load) and their reason.
RECOMPUTED_BUFFERS = re.compile(r"^(encoder|decoder)\.(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")

# HF port name -> official name, applied in order; anchored so nothing is renamed by accident.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.layers\.(\d+)\.self_attn_mid_layer_norm\.", r"encoder.layers.\1.attn_ln."),
    (r"^decoder\.layers\.(\d+)\.self_attn_mid_layer_norm\.", r"decoder.layers.\1.self_attn_ln."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn_layer_norm\.", r"\1.layers.\2.ffn_layernorm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_mid_layer_norm\.", r"decoder.layers.\1.cross_attn_ln."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_layer_norm\.", r"decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.encoder_attn."),
)
_HF_MARKERS = ("self_attn_mid_layer_norm", "ffn_layer_norm", "cross_attn.", "cross_attn_mid_layer_norm")


# ----------------------------------------------------------------------------------------------
# Errors


class CheckpointError(InputError):
    """A checkpoint or weights file that cannot be imported; the message names the file and what is wrong."""

    reason = errors.BAD_CHECKPOINT


class UnsafeCheckpointError(CheckpointError):
    """A pickle holding objects that only code execution could rebuild; it is refused, never executed."""

    reason = errors.UNSAFE_CHECKPOINT


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the architecture; lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shapes: list[str],
                 dtypes: list[str] | None = None):
        self.source, self.missing, self.unexpected, self.shapes = source, missing, unexpected, shapes
        self.dtypes = dtypes or []
        parts = [f"checkpoint {source} does not match the architecture:"]
        for title, items in self.problems():
            parts.append(f"  {len(items)} {title}:")
            parts += [f"    {k}" for k in items]
        super().__init__("\n".join(parts))

    def problems(self) -> list[tuple[str, list[str]]]:
        """(title, keys) of each non-empty category."""
        return [(title, items) for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                                                     ("shape mismatches", self.shapes),
                                                     ("dtype mismatches", self.dtypes)) if items]


class BundleError(InputError):
    """A bundle that cannot be loaded or written; the message names the file, the field and the fix."""

    reason = errors.BAD_BUNDLE


# ----------------------------------------------------------------------------------------------
# Safe reading of pickled checkpoints

# The first bytes of what torch.save writes: a zip archive (torch >= 1.6), or the legacy format, which starts with
# a protocol-2 pickle of torch's magic number 0x1950a86a20f9469cfc6c.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _inert_class():
    class Inert:
        """Stand-in for a pickled non-tensor object (argparse.Namespace, omegaconf configs, ...)."""

        def __init__(self, *args, **kwargs):
            self.args, self.kwargs, self.state = args, kwargs, None

        def __setstate__(self, state):
            self.state = state

        def __setitem__(self, key, value):  # dict subclasses are rebuilt with SETITEMS
            self.__dict__.setdefault("items", {})[key] = value

    return Inert


def _regular_input(path: Path, what: str) -> Path:
    """`path` when it is a non-empty regular file, else CheckpointError (missing, a FIFO or device, empty)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return path


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _brief(e: BaseException) -> str:
    """The informative line of a torch.load failure (its messages open with paragraphs of advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = m.group(1) if m else next((s for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line.strip()[:200]}"


def safe_torch_load(path: str | Path, max_stand_ins: int = 200):
    """torch.load with weights_only=True; any other pickled class becomes an inert stand-in.

    Checkpoints carry training configs (argparse/omegaconf objects). Instead of executing their
    code we substitute a class that only records its arguments, so tensors and plain containers
    load exactly and nothing else runs. A file that is not a torch.save file, or is cut short or
    corrupt, raises CheckpointError; a pickle that can only be rebuilt by running code (a blocked
    global, or a stand-in called as a function) raises UnsafeCheckpointError.
    """
    path = _regular_input(Path(path), "checkpoint")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_MAGIC)):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: neither a torch.save zip archive nor a legacy "
                              f"torch.save file (first bytes {head[:8]!r})")
    inert = _inert_class()
    names: list[str] = []
    while True:
        try:
            with torch.serialization.safe_globals([(inert, n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as e:  # torch.load reports a bad file in many exception types; all are about the file
            name = _refused_global(e)
            if name is None and inert.__qualname__ not in str(e):
                raise CheckpointError(f"{path} cannot be read: the file is truncated or corrupt ({_brief(e)})") from e
            if name is None or name in names or len(names) >= max_stand_ins:
                what = "a stand-in called as a function" if name is None else f"GLOBAL {name}"
                raise UnsafeCheckpointError(f"{path}: refused to unpickle: the file holds objects that only code "
                                            f"execution could rebuild ({what})") from e
            log.debug("checkpoint %s: replacing pickled global %s by an inert stand-in", path, name)
            names.append(name)


def _refused_global(e: Exception) -> str | None:
    """The global the weights-only unpickler refused, module-qualified (torch names builtins bare), or None."""
    m = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
    if m is None:
        return None
    return m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}"


def _tensor_dict(obj, source: str | Path, what: str) -> dict[str, torch.Tensor]:
    """`obj` as a dict of named tensors, else CheckpointError naming the offending keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: {what} is a {type(obj).__name__}, expected a dict of named tensors")
    bad_names = [k for k in obj if not isinstance(k, str)]
    if bad_names:
        raise CheckpointError(f"{source}: {what} has keys that are not strings: {bad_names[:10]}")
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: {what} holds {len(bad)} values that are not tensors: {', '.join(bad[:20])}"
                              + (" ..." if len(bad) > 20 else ""))
    return dict(obj)


def read_fairseq_state(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The official model (or its EMA) weights from a fairseq checkpoint file."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping) or "model" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry; top level: {keys})")
    if not use_ema:
        return _tensor_dict(ckpt["model"], path, "'model'")
    extra = ckpt.get("extra_state")
    if not isinstance(extra, Mapping):
        found = "none" if extra is None else f"a {type(extra).__name__}"
        raise CheckpointError(f"{path}: --ema requested but extra_state is {found}, not a dict holding 'ema' weights")
    ema = _tensor_dict(extra.get("ema"), path, "extra_state['ema']")
    if not ema:
        raise CheckpointError(f"{path}: --ema requested but extra_state['ema'] holds no weights")
    return ema


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict from .safetensors or a torch pickle (HF `pytorch_model.bin`), or from such a directory."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_file(path / name)
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if path.suffix == ".safetensors":
        _regular_input(path, "weights file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return _tensor_dict(obj["model"], path, "'model'")
    return _tensor_dict(obj, path, "the state dict")


# ----------------------------------------------------------------------------------------------
# Name mapping and strict loading


def _strip_wrapper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """'hf' when HF-port layer names appear, else 'fairseq' (our own names are the official ones)."""
    return "hf" if any(marker in k for k in sd for marker in _HF_MARKERS) else "fairseq"


def map_state_dict(sd: dict[str, torch.Tensor], fmt: str = "auto") -> dict[str, torch.Tensor]:
    """Official-named state dict from fairseq / HF-port naming, recomputed buffers dropped."""
    sd = _strip_wrapper(sd)
    fmt = detect_format(sd) if fmt == "auto" else fmt
    if fmt not in ("fairseq", "hf"):
        raise ValueError(f"unknown checkpoint format {fmt!r} (fairseq, hf or auto)")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if RECOMPUTED_BUFFERS.match(key):
            continue
        new = key
        if fmt == "hf":
            for pattern, repl in HF_RENAMES:
                new = re.sub(pattern, repl, new)
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def _dtype_mismatch(key: str, have: torch.dtype | str, want: torch.dtype) -> str | None:
    """'key: ...' when a floating weight is stored as a non-float (or an integer buffer as a float), else None."""
    have_float = have.is_floating_point if isinstance(have, torch.dtype) else _is_float_name(have)
    if have_float == want.is_floating_point:
        return None
    kind = "a floating" if want.is_floating_point else "an integer"
    return f"{key}: {str(have).removeprefix('torch.')}, the model needs {kind} dtype ({str(want).removeprefix('torch.')})"


def _is_float_name(dtype: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F8_E4M3, I64, BOOL, ...) is a floating type."""
    return dtype.startswith("F") or dtype == "BF16"


def _non_finite(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold NaN or Inf."""
    # A finite sum proves every element finite (NaN and Inf propagate); only when it is not (an overflow, or a
    # real NaN/Inf) is the elementwise test run. The sum is several times cheaper.
    return sorted(k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v.sum()))
                  and not bool(torch.isfinite(v).all()))


def load_weights(model: OFAModel, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load an official-named state dict into `model`; raise CheckpointMismatchError on any missing, unexpected,
    mis-shaped or wrongly typed key, and CheckpointError on NaN or Inf weights."""
    sd = dict(sd)
    embed = sd.get("encoder.embed_tokens.weight")
    for key in TIED_KEYS:  # tied copies: may be absent; when present they must equal the shared matrix
        if key in sd and embed is not None:
            if sd[key].shape != embed.shape or not torch.equal(sd[key], embed):
                raise CheckpointMismatchError(source, [], [], [f"{key}: differs from encoder.embed_tokens.weight "
                                                               "(embeddings must be tied)"])
        sd[key] = embed if embed is not None else sd.get(key)
        if sd[key] is None:
            del sd[key]
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape))
    dtypes = sorted(filter(None, (_dtype_mismatch(k, sd[k].dtype, v.dtype) for k, v in expected.items() if k in sd)))
    if missing or unexpected or shapes or dtypes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes, dtypes)
    bad = _non_finite(sd)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weights hold NaN or Inf values: {', '.join(bad)}")
    model.load_state_dict(sd, strict=True)


def import_checkpoint(path: str | Path, config: OFAConfig, *, use_ema: bool = False, fmt: str = "auto") -> OFAModel:
    """Build `config` and load an official checkpoint (fairseq .pt or HF-port weights) into it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".pt":
        raw = read_fairseq_state(path, use_ema=use_ema)
    else:
        if use_ema:
            raise CheckpointError(f"{path}: EMA weights exist only in fairseq .pt checkpoints")
        raw = read_state_file(path)
    side = code_grid_side(_strip_wrapper(raw), config.image_bucket_size)
    if side is not None and side * 8 != config.code_image_size:
        log.info("%s: decoder image-code grid is %dx%d: code_image_size %d", path, side, side, side * 8)
        config = dataclasses.replace(config, code_image_size=side * 8)
    model = OFAModel(config)
    load_weights(model, map_state_dict(raw, fmt), source=str(path))
    return model.eval()


def code_grid_side(sd: dict[str, torch.Tensor], bucket_size: int = 42) -> int | None:
    """Side of the image-code grid recorded in an official `decoder.image_position_idx` buffer.

    The buffer is [0, 1, 2, ..., side, bucket_size + 1, ...]: ids rise by one along the first grid
    row, then jump to the next row. None when the buffer is absent or does not look like that.
    """
    idx = sd.get("decoder.image_position_idx")
    if idx is None or idx.ndim != 1 or not 3 <= idx.numel() <= 65536 or idx.is_floating_point():
        return None
    ids = idx.tolist()
    if ids[0] != 0 or ids[1] != 1:
        return None
    side = 1
    while side + 1 < len(ids) and ids[side + 1] == ids[side] + 1:
        side += 1
    return side if side + 1 < len(ids) and ids[side + 1] == bucket_size + 1 and side <= bucket_size else None


# ----------------------------------------------------------------------------------------------
# Checks shared by saving and loading


def check_preprocess_fits(preprocess: PreprocessConfig, config: OFAConfig) -> None:
    """Raise ConfigError, naming both numbers, when `preprocess` asks for more than the model's tables hold."""
    s, buckets = preprocess.patch_image_size, config.image_bucket_size
    grid = -(-s // PATCH_STRIDE)
    if grid > buckets:
        raise ConfigError(f"patch_image_size {s} gives a {grid}x{grid} patch grid, larger than the model's "
                          f"image_bucket_size {buckets} (at most {buckets * PATCH_STRIDE} px)")
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
        except ValueError as e:  # parse_instruction's error for a malformed line
            raise BundleError(f"{where}: custom_tasks.{name}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Reading only what belongs to a bundle


def _bundle_root(path: str | Path) -> Path:
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
        raise BundleError(f"{where} is not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size > max_bytes:
        raise BundleError(f"{where} is {st.st_size:,} bytes, over the {max_bytes:,}-byte cap for this file")
    return target


def _read_bundle_file(root: Path, name: str, max_bytes: int) -> bytes:
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


def _parse_json(data: bytes, where: Path) -> dict:
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
    root = _bundle_root(path)
    where = root / CONFIG_FILE
    if not os.path.lexists(where):
        raise BundleError(f"{root} is not a model bundle: {CONFIG_FILE} missing")
    cfg = _parse_json(_read_bundle_file(root, CONFIG_FILE, CONFIG_MAX_BYTES), where)
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
    dtypes = sorted(filter(None, (_dtype_mismatch(k, header[k][1], dtype)
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

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        """The built-in tasks plus the bundle's custom ones (which never replace a built-in)."""
        return {**TASKS, **{name: parse_instruction(line, name) for name, line in self.custom_tasks.items()}}


def save_bundle(path: str | Path, model: OFAModel, vocab, *, preprocess: PreprocessConfig,
                custom_tasks: Mapping[str, str] | None = None, metadata: Mapping | None = None,
                overwrite: bool = False) -> Path:
    """Write `model`, its vocabulary reference, preprocessing and custom tasks ({name: instruction line}) as a
    bundle directory at `path`.

    Everything is checked first (the vocabulary and `preprocess` against the model, custom task names against the
    built-in tasks, finite weights). The bundle is written into a temporary directory beside `path` and renamed
    into place. A non-empty `path` is refused unless `overwrite`; then it must hold a bundle, which is replaced
    only once the new one is complete.
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
        check_preprocess_fits(preprocess, config)
    except ConfigError as e:
        raise BundleError(f"cannot save a bundle to {path}: preprocess: {e}") from e
    custom_tasks = dict(custom_tasks or {})
    _check_custom_tasks(custom_tasks, f"cannot save a bundle to {path}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    bad = _non_finite(state)
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
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot save a bundle to {path}: metadata must be plain JSON ({e})") from e
    _check_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is read by other users (serving)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
        body["vocab"] = vocab.to_reference(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(body, indent=2, sort_keys=True))
        _fsync_dir(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _is_bundle(path: Path) -> bool:
    try:
        return read_bundle_config(path)["format"] == BUNDLE_FORMAT
    except BundleError:
        return False


def _check_target(path: Path, overwrite: bool) -> None:
    """BundleError unless `path` is absent, an empty directory, or (with `overwrite`) a bundle to replace."""
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
    if not _is_bundle(path):
        raise BundleError(f"{path} is not empty and holds no readable {BUNDLE_FORMAT}; refusing to replace it "
                          "(remove it yourself if it should go)")


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


def load_bundle_vocab(path: str | Path) -> Vocabulary:
    """Only the vocabulary of a bundle (checked against its model config), without building the model."""
    root = _bundle_root(path)
    cfg = read_bundle_config(root)
    where = root / CONFIG_FILE
    try:
        config = OFAConfig.from_dict(cfg["model"])
    except ConfigError as e:
        raise BundleError(f"{where}: model: {e}") from e
    return _load_vocab(root, cfg["vocab"], config, where)


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild model (eval mode, on `device`), vocabulary, preprocessing and custom tasks from a bundle.

    Every section of config.json is checked, the preprocessing against the model, and the weights' header
    against the architecture, before the model is allocated. Any problem is a BundleError (a
    CheckpointMismatchError for weights that do not fit) naming the file and the field.
    """
    root = _bundle_root(path)
    cfg = read_bundle_config(root)
    where = root / CONFIG_FILE
    try:
        config = OFAConfig.from_dict(cfg["model"])
    except ConfigError as e:
        raise BundleError(f"{where}: model: {e}") from e
    try:
        preprocess = PreprocessConfig.from_dict(cfg["preprocess"], complete=True)
    except ConfigError as e:
        raise BundleError(f"{where}: preprocess: {e}; {_PREPROCESS_FIX}") from e
    try:
        check_preprocess_fits(preprocess, config)
        expected = expected_state(config)
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from e
    custom_tasks = cfg.get("custom_tasks", {})
    _check_custom_tasks(custom_tasks, str(where))
    if not isinstance(cfg["metadata"], dict):
        raise BundleError(f"{where}: metadata must be an object, got {type(cfg['metadata']).__name__}")
    vocab = _load_vocab(root, cfg["vocab"], config, where)
    weights = _bundle_file(root, WEIGHTS_FILE, WEIGHTS_MAX_BYTES)
    _check_header(_weights_header(weights), expected, str(weights))
    model = OFAModel(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{weights} is not a valid safetensors file: {e}") from e
    load_weights(model, state, source=str(weights))
    return Bundle(model.to(device).eval(), vocab, config, preprocess, cfg["metadata"], dict(custom_tasks))


def _read_dict_txt(path: str | Path) -> Vocabulary:
    path = _regular_input(Path(path), "--dict file")
    if path.stat().st_size > DICT_MAX_BYTES:
        raise CheckpointError(f"--dict file {path} is over the {DICT_MAX_BYTES:,}-byte cap; is it OFA's dict.txt?")
    try:
        return Vocabulary.from_dict_txt(path)
    except ValueError as e:  # the vocabulary's error for a malformed dict.txt
        raise CheckpointError(f"--dict file {path}: {e}") from e


def convert_checkpoint(input_path: str | Path, arch: str, output: str | Path, *, preprocess: PreprocessConfig,
                       dict_path: str | Path | None = None, gpt2_vocab: bool = False, use_ema: bool = False,
                       fmt: str = "auto", overwrite: bool = False) -> dict:
    """Import an official checkpoint and write it as a bundle with `preprocess`; returns a JSON-ready summary.

    Official checkpoints index text by OFA's dict.txt, so `dict_path` is required unless `gpt2_vocab` says the
    weights were trained with ofa-ray's GPT-2 id order. The preprocessing and the output are checked before the
    checkpoint is read.
    """
    if dict_path is None and not gpt2_vocab:
        raise CheckpointError("pass --dict (OFA's utils/BPE/dict.txt): official checkpoints index text tokens in its "
                              "order; use --gpt2-vocab only for weights trained with ofa-ray's GPT-2 layout")
    config = get_config(arch)
    check_preprocess_fits(preprocess, config)
    _check_target(Path(output), overwrite)
    vocab = _read_dict_txt(dict_path) if dict_path else Vocabulary.gpt2()
    model = import_checkpoint(input_path, config, use_ema=use_ema, fmt=fmt)
    save_bundle(output, model, vocab, preprocess=preprocess, overwrite=overwrite,
                metadata={"source": str(input_path), "ema": use_ema, "arch": arch})
    return {"output": str(output), "arch": arch, "parameters": model.num_parameters(), "vocab": vocab.layout,
            "ema": use_ema, "preprocess": preprocess.to_dict()}
