"""Image codes as data: a canonical corpus's images through an image tokenizer (`ofa_model.vqgan`), written as a
canonical corpus of the rows text-to-image and image infilling train on.

    encode_corpus("s3://b/corpora/coco", "s3://b/corpora/coco-codes", "s3://b/tokenizers/vqgan", code_image_size=256)

Rows (`pipelines.data.schema`), S = code_image_size, the code_image_size of the model that trains on them:

* text_to_image, one per caption row of the input: id "<caption row id>/text_to_image", text = its caption (the
  row's `target`), codes = the (S / 8)^2 codes of the whole image resized to S; no image.
* image_infilling, one per distinct image of a split (rows of any task showing the same image bytes are one
  image): id "<dataset>/<split>/image_infilling/<hash of the bytes>", the image bytes as stored, codes = the
  (S / 8)^2 codes of the centre S x S pixels of the image resized to 2S (`ofa_model.vqgan.infill_pixels`), as
  OFA's image_examples.tsv holds them (S = 128: a 256 px image, its 128 px centre, 256 codes).

Two passes over the input, both Ray Data. 1 (tasks): each row's id, task, split, dataset, caption and a hash of its
image; the driver groups the rows by (split, image hash), so every distinct image is decoded and encoded once
however many rows show it (easy-VQA: a dozen), by the row with the smallest id. 2 (`map_batches` on an actor pool
of `workers` actors, each loading the tokenizer once): those rows' images decoded (`preprocess.decode_image`, with
its limits) and encoded in batches; the driver writes the rows as the batches arrive (`ShardWriter`).

An image that cannot be decoded is a bad row of every row it would have given (its infilling row, one
text-to-image row per caption), counted by the `ofa_model.errors` reason of its `ImageError`; its neighbours are
written. A caption row without an image or caption is a bad text-to-image row (missing_field, empty_text).

Codes mean something only to the tokenizer that made them, so the output's manifest records it (`Manifest.conversion`,
read back by `codes_record`): the tokenizer's URI (redacted), its digest (`ofa_model.vqgan.weights_digest`) and the
code_image_size; training refuses a corpus made by another tokenizer than its own (`pipelines.train.setup`). Every
actor checks that the tokenizer it loaded is the one the driver read (a models:/ alias may move meanwhile).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from ofa_model.bundle import BundleError
from ofa_model.errors import EMPTY_TEXT, MISSING_FIELD, InputError
from ofa_model.preprocess import PreprocessConfig, decode_image
from ofa_model.tasks import codes_per_image
from ofa_model.vqgan import DIGEST_KEY, DOWNSAMPLE, is_digest, load_tokenizer, read_tokenizer_config
from pipelines import storage
from pipelines.data.converters import OutputError
from pipelines.data.rowstats import RowStats
from pipelines.data.shards import Manifest, ShardWriter, read_manifest
from pipelines.progress import Progress
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

CodeTask = Literal["text_to_image", "image_infilling", "both"]
CODE_TASKS: tuple[str, ...] = ("text_to_image", "image_infilling", "both")
_REMOTE = ("s3://", "models:")  # tokenizer URIs each actor resolves on its own node (a local path: as resolved here)
_ENCODED = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
                      ("whole", pa.list_(pa.int32())), ("centre", pa.list_(pa.int32())), ("image", pa.binary())])


CODES_SOURCE = "image-codes"  # Manifest.conversion["source"] of a corpus this module wrote


@dataclass(frozen=True)
class CodesRecord:
    """What made an image-codes corpus's codes, as its manifest records them."""

    tokenizer: str  # the tokenizer's URI or path as the job was given it, redacted
    tokenizer_sha256: str | None  # its `weights_digest` (None: a tokenizer saved before tokenizers recorded one)
    code_image_size: int


def codes_record(manifest: Manifest, where: str) -> CodesRecord | None:
    """The `CodesRecord` in `manifest` (of the corpus at `where`, for errors); None for a corpus that keeps none
    (written by this module before it kept one, or by another conversion, e.g. OFA's image_examples.tsv). A
    record that is there but malformed is a ValueError naming the field."""
    conv = manifest.conversion
    if not isinstance(conv, dict) or conv.get("source") != CODES_SOURCE or "tokenizer_sha256" not in conv:
        return None
    tokenizer, digest, size = conv.get("tokenizer"), conv["tokenizer_sha256"], conv.get("code_image_size")
    if not isinstance(tokenizer, str):
        raise ValueError(f"bad manifest of {where}: conversion.tokenizer must be a string, got {tokenizer!r:.80}")
    if digest is not None and not is_digest(digest):
        raise ValueError(f"bad manifest of {where}: conversion.tokenizer_sha256 must be 64 lowercase hex digits or "
                         f"null, got {digest!r:.80}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"bad manifest of {where}: conversion.code_image_size must be a positive integer, got "
                         f"{size!r:.80}")
    return CodesRecord(tokenizer, digest, size)


@dataclass
class _Image:
    """One distinct image of a split: the row whose image is encoded (the smallest id showing it), its dataset,
    and the captions (row id, caption, dataset) that become text-to-image rows."""

    key: str
    split: str
    row: str
    dataset: str | None
    captions: list[tuple[str, str, str | None]] = field(default_factory=list)


def image_key(data: bytes) -> str:
    """The hash that tells images apart: blake2b-128 of the bytes as stored, in hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _keys(batch: pa.Table) -> pa.Table:
    """Pass 1 (a Ray task per block): the image column replaced by its `image_key` (null without an image)."""
    keys = [None if b is None else image_key(b) for b in batch.column("image").to_pylist()]
    return batch.drop_columns(["image"]).append_column("key", pa.array(keys, pa.string()))


class _Encoder:
    """Pass 2's map_batches UDF, one per actor: the tokenizer loaded once; (id, image) rows in, the `_ENCODED`
    rows of the images it is asked for out (`wanted`: row id -> (whole image codes?, centre codes?)). `digest`: the
    tokenizer's as the driver read it and the manifest records it; a BundleError if the one loaded here differs."""

    def __init__(self, tokenizer: str, s3: S3Options | None, size: int, wanted: Mapping[str, tuple[bool, bool]],
                 device: str, limits: PreprocessConfig, digest: str | None) -> None:
        from pipelines.tracking.registry import resolve_model

        self.tokenizer = load_tokenizer(resolve_model(tokenizer, s3=s3).path, device)
        if self.tokenizer.digest != digest:
            raise BundleError(f"the image tokenizer {storage.redact(tokenizer)} changed while the job ran: this actor "
                              f"loaded {self.tokenizer.digest}, the job started with {digest}; run it again")
        self.size, self.wanted, self.limits = size, wanted, limits

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in _ENCODED.names}
        whole, centre = [], []  # (output index, decoded image) to encode
        for row_id, data in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
            todo = self.wanted.get(row_id)
            if todo is None:
                continue
            i = len(out["id"])
            reason = detail = image = None
            try:
                image = decode_image(data, self.limits, source=row_id)
            except InputError as exc:
                reason, detail = exc.reason, f"{type(exc).__name__}: {exc}"
            for name, value in (("id", row_id), ("reason", reason), ("detail", detail), ("whole", None),
                                ("centre", None), ("image", data if image is not None and todo[1] else None)):
                out[name].append(value)
            if image is not None:
                if todo[0]:
                    whole.append((i, image))
                if todo[1]:
                    centre.append((i, image))
        if whole:
            codes = self.tokenizer.encode_images([im for _, im in whole], self.size).cpu().tolist()
            for (i, _), c in zip(whole, codes, strict=True):
                out["whole"][i] = c
        if centre:
            codes = self.tokenizer.encode_centres([im for _, im in centre], self.size).cpu().tolist()
            for (i, _), c in zip(centre, codes, strict=True):
                out["centre"][i] = c
        return pa.Table.from_pydict(out, schema=_ENCODED)


def _plan(rows, stats: RowStats, *, t2i: bool, infill: bool) -> dict[str, _Image]:
    """Pass 1's rows -> the images to encode, by the id of the row that shows them; bad caption rows counted."""
    images: dict[tuple[str, str], _Image] = {}
    for row in rows:
        key, split = row["key"], row["split"]
        if key is not None:
            image = images.get((split, key))
            if image is None:
                image = images[(split, key)] = _Image(key, split, row["id"], row["dataset"])
            elif row["id"] < image.row:
                image.row, image.dataset = row["id"], row["dataset"]
        if not t2i or row["task"] != "caption":
            continue
        out_id = f"{row['id']}/text_to_image"
        if key is None:
            stats.add_bad(MISSING_FIELD, out_id, "text_to_image")
        elif not isinstance(row["target"], str) or not row["target"].strip():
            stats.add_bad(EMPTY_TEXT, out_id, "text_to_image")
        else:
            image.captions.append((row["id"], row["target"], row["dataset"]))
    return {im.row: im for im in images.values() if infill or im.captions}


def _check(code_image_size: int, workers: int, batch_size: int, num_gpus: float, shard_mb: float) -> None:
    if isinstance(code_image_size, bool) or not isinstance(code_image_size, int) or \
            not DOWNSAMPLE <= code_image_size <= 2048 or code_image_size % DOWNSAMPLE:
        raise ValueError(f"code_image_size must be a multiple of {DOWNSAMPLE} in [{DOWNSAMPLE}, 2048], "
                         f"got {code_image_size!r}")
    for name, value in (("workers", workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_gpus < 0 or shard_mb <= 0:
        raise ValueError(f"num_gpus must be >= 0 and shard_mb positive, got {num_gpus}, {shard_mb}")


def encode_corpus(
    input_uri: str,
    output: str,
    tokenizer: str,
    *,
    task: CodeTask = "both",
    code_image_size: int | None = None,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    batch_size: int = 16,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    s3: S3Options | None = None,
    shard_mb: float = 128,
    log_every_s: float = 10.0,
    limits: PreprocessConfig | None = None,
) -> dict[str, Any]:
    """Encode the images of the canonical corpus at `input_uri` with the tokenizer bundle `tokenizer` (a directory,
    s3:// prefix or models:/ URI, `pipelines.tracking.registry.resolve_model`) into a corpus of `task`'s rows at
    `output` (see the module docstring), on the Ray cluster this process is connected to; returns the summary.

    code_image_size: S of the module docstring (None: the tokenizer's resolution), the code_image_size of the model
    that trains on the rows. splits: the input's splits to read (None: all). workers: encoding actors, each with
    `num_cpus` CPUs and `num_gpus` GPUs (then it encodes on CUDA); batch_size: rows per call of an actor.
    limits: the image limits of decoding (`PreprocessConfig.max_image_bytes` / `max_image_pixels`).
    The output's manifest records the tokenizer (`codes_record`; its conversion entry: source, input,
    input_fingerprint, task, splits, tokenizer, tokenizer_sha256, code_image_size, images, rows_ok, rows_bad,
    bad_examples).
    Summary: {input, output, tokenizer, tokenizer_sha256, task, code_image_size, codes_per_image, images, rows_ok,
    rows_by_task, rows_bad: {reason: n}, bad_by_task, bad_examples, counts, num_shards, fingerprint, seconds,
    images_per_s}.
    Raises ValueError / FileNotFoundError for bad options or input (a tokenizer that is not one: BundleError),
    OutputError when the output cannot be written (nothing is left behind).
    """
    import ray
    from ray.data.expressions import col

    from pipelines.tracking.registry import resolve_model

    if task not in CODE_TASKS:
        raise ValueError(f"task must be one of {list(CODE_TASKS)}, got {task!r}")
    t0 = time.monotonic()
    local_tokenizer = resolve_model(tokenizer, s3=s3).path  # here, to fail before any work; each actor resolves it
    _, tok_raw, tok_config = read_tokenizer_config(local_tokenizer)
    digest = tok_raw.get(DIGEST_KEY)
    source = tokenizer if tokenizer.startswith(_REMOTE) else str(local_tokenizer)
    if digest is None:
        logger.warning("image-codes: the tokenizer %s records no %s (saved before tokenizers did): training cannot "
                       "check that it uses the tokenizer these codes belong to; save it again "
                       "(ofa_model.vqgan.save_tokenizer) and encode with that copy", storage.redact(source),
                       DIGEST_KEY)
    size = tok_config.resolution if code_image_size is None else code_image_size
    _check(size, workers, batch_size, num_gpus, shard_mb)
    t2i, infill = task in ("text_to_image", "both"), task in ("image_infilling", "both")
    manifest = read_manifest(input_uri, s3)
    shards = manifest.select(splits)
    if not shards:
        raise ValueError(f"{storage.redact(input_uri)} has no shards of splits {list(splits or [])}; it holds "
                         f"{sorted(manifest.counts)}")
    fs, _ = storage.resolve(input_uri, s3)
    paths = [storage.resolve(storage.join(input_uri, s["path"]), s3)[1] for s in shards]
    try:
        writer = ShardWriter(output, shard_bytes=int(shard_mb * 2**20), s3=s3,
                             created_by="pipelines.data.image_codes")
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc

    stats = RowStats()
    with writer:
        keyed = ray.data.read_parquet(paths, filesystem=fs).select_columns(
            ["id", "task", "split", "dataset", "target", "image"])
        images = _plan(keyed.map_batches(_keys, batch_format="pyarrow").iter_rows(), stats, t2i=t2i,
                       infill=infill)
        wanted = {row: (t2i and bool(im.captions), infill) for row, im in images.items()}
        logger.info("image-codes: %d distinct images of %s to encode at %d px (%d codes each), %d actor(s)",
                    len(images), storage.redact(input_uri), size, codes_per_image(size), workers)
        progress = Progress("image-codes", len(images), log_every_s, unit="images", extra_rates={"rows ok": "rows"},
                            logger=logger)
        # only the rows whose image is to be encoded leave the Parquet reader (an expression filter, pushed into
        # the read by Ray Data's optimizer; a map_batches filter would be fused into the encoding actors, which would then still receive every row's
        # image; easy-VQA shows each image in about a dozen rows)
        encoded = ray.data.read_parquet(paths, filesystem=fs, columns=["id", "image"]).filter(
            expr=col("id").is_in(sorted(wanted))).map_batches(
            _Encoder, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus,
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"tokenizer": source, "s3": s3, "size": size, "wanted": wanted, "digest": digest,
                                   "limits": limits or PreprocessConfig(), "device": "cuda" if num_gpus > 0 else "cpu"})
        done = 0
        for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                _write(images[row["id"]], wanted[row["id"]], row, writer, stats, output)
                done += 1
            progress.update(done, extra={"rows ok": stats.ok, "bad": stats.bad})
        progress.update(done, extra={"rows ok": stats.ok, "bad": stats.bad}, force=True)
        conversion = {"source": CODES_SOURCE, "input": storage.redact(input_uri),
                      "input_fingerprint": manifest.fingerprint, "task": task,
                      "splits": None if splits is None else list(splits), "tokenizer": storage.redact(source),
                      "tokenizer_sha256": digest, "code_image_size": size, "images": len(images),
                      "rows_ok": stats.ok, "rows_bad": dict(sorted(stats.bad_by_reason.items())),
                      "bad_examples": dict(sorted(stats.examples.items()))}
        try:
            written = writer.close(conversion)
        except OSError as exc:
            raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc
    seconds = time.monotonic() - t0
    logger.info("image-codes: done, %d rows ok, %d bad (%s) in %.1f s", stats.ok, stats.bad, stats.describe(),
                seconds)
    return {
        "input": storage.redact(input_uri), "output": storage.redact(output), "tokenizer": storage.redact(tokenizer),
        "tokenizer_sha256": digest, "task": task, "code_image_size": size, "codes_per_image": codes_per_image(size),
        "images": len(images),
        "rows_ok": stats.ok, "rows_by_task": dict(sorted(stats.ok_by_task.items())),
        "rows_bad": dict(sorted(stats.bad_by_reason.items())), "bad_by_task": dict(sorted(stats.bad_by_task.items())),
        "bad_examples": dict(sorted(stats.examples.items())), "counts": written.counts,
        "num_shards": len(written.shards), "fingerprint": written.fingerprint, "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / max(seconds, 1e-9), 1),
    }


def _write(image: _Image, todo: tuple[bool, bool], row: Mapping[str, Any], writer: ShardWriter, stats: RowStats,
           output: str) -> None:
    """The rows of one encoded image (`todo`: text-to-image rows?, an infilling row?), or, when it could not be
    decoded, their bad-row counts by its reason."""
    infill = {"id": f"{image.dataset or 'corpus'}/{image.split}/image_infilling/{image.key}",
              "task": "image_infilling", "split": image.split, "dataset": image.dataset, "image": row["image"],
              "codes": row["centre"]}
    t2i = [{"id": f"{cid}/text_to_image", "task": "text_to_image", "split": image.split, "dataset": dataset,
            "text": caption, "codes": row["whole"]} for cid, caption, dataset in image.captions] if todo[0] else []
    rows = ([infill] if todo[1] else []) + t2i
    for out in rows:
        if row["reason"] is not None:
            stats.add_bad(row["reason"], out["id"], out["task"])
            continue
        try:
            writer.write(out)
        except OSError as exc:
            raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc
        stats.add_ok(out["task"])
