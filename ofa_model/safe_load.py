"""Reading checkpoint files as untrusted input: torch pickles without running any of their code, safetensors
files, and the fairseq layout (weights under `model`, optional EMA weights under `extra_state.ema`).

Nothing is ever unpickled beyond tensors and inert stand-ins. Every way a file can be wrong is a
`CheckpointError` naming the file (an `UnsafeCheckpointError` for a pickle that only code execution could
rebuild).
"""

from __future__ import annotations

import logging
import pickle
import re
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ofa_model.weights import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)

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


def regular_input(path: Path, what: str) -> Path:
    """`path` when it is a non-empty regular file, else CheckpointError (missing, a FIFO or device, empty)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {path} is not a regular file ({file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    return path


def file_kind(mode: int) -> str:
    """What a file of stat mode `mode` is, for messages ("a directory", "a FIFO", ...)."""
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
    path = regular_input(Path(path), "checkpoint")
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


def tensor_dict(obj, source: str | Path, what: str) -> dict[str, torch.Tensor]:
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
        return tensor_dict(ckpt["model"], path, "'model'")
    extra = ckpt.get("extra_state")
    if not isinstance(extra, Mapping):
        found = "none" if extra is None else f"a {type(extra).__name__}"
        raise CheckpointError(f"{path}: --ema requested but extra_state is {found}, not a dict holding 'ema' weights")
    ema = tensor_dict(extra.get("ema"), path, "extra_state['ema']")
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
        regular_input(path, "weights file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    obj = safe_torch_load(path)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        return tensor_dict(obj["model"], path, "'model'")
    return tensor_dict(obj, path, "the state dict")

