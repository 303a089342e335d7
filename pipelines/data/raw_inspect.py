"""The dataset doctor on OFA TSV files and WebDataset tars: check raw data before converting it.

`input_source` tells what an input is (a canonical corpus, OFA TSV, WebDataset), from `--layout` or
else from the input itself. `inspect_raw` converts the input (the first `limit` records) into a scratch
corpus with the same parallel conversion as `jobs.prepare_data` (`pipelines.data.raw_convert`), pushes that
through the training pipeline with `pipelines.data.dataset.inspect`, and adds the reader's bad rows to the
pipeline's counts: one report with every reason from both stages, as for a canonical corpus. There
`rows_in_manifest` counts the input records read (at most `limit`).
"""

import logging
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import pyarrow.fs as pafs

from pipelines import storage
from pipelines.data import readers
from pipelines.data.raw_convert import RawSource, convert_raw, delete_dir
from pipelines.data.shards import MANIFEST_NAME
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

CORPUS = "corpus"
WEBDATASET = "webdataset"
INPUT_LAYOUTS = (CORPUS, WEBDATASET, *readers.LAYOUTS)  # what --layout accepts
# task -> the TSV layout of that task (pretrain_vl holds several tasks and is never guessed)
_TSV_LAYOUT_OF_TASK = {t: layout for layout in readers.LAYOUTS if (t := readers.layout_task(layout)) is not None}


def _kind(uri: str, s3: S3Options | None) -> str:
    """CORPUS, WEBDATASET or "tsv" from the input itself; ValueError when it cannot be told."""
    fs, path = storage.resolve(uri, s3)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise OSError(f"cannot stat {storage.redact(uri)}: {storage.redact(str(exc))}") from exc
    if info.type == pafs.FileType.File:
        if path.endswith(readers.WDS_SUFFIXES):
            return WEBDATASET
        if path.endswith(readers.TSV_SUFFIXES):
            return "tsv"
        raise ValueError(f"cannot tell the layout of {storage.redact(uri)} from its name (not .tsv, .tar, "
                         f".tar.gz, .tgz); pass --layout, one of: {', '.join(INPUT_LAYOUTS)}")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {storage.redact(uri)}")
    if storage.exists(storage.join(uri, MANIFEST_NAME), s3):
        return CORPUS
    files = storage.list_files(uri, s3=s3)
    has_tsv = any(f.endswith(readers.TSV_SUFFIXES) for f in files)
    has_tar = any(f.endswith(readers.WDS_SUFFIXES) for f in files)
    if has_tsv == has_tar:
        what = "both .tsv and .tar files" if has_tsv else f"no {MANIFEST_NAME}, .tsv or .tar files"
        raise ValueError(f"{storage.redact(uri)} holds {what}; pass --layout, one of: {', '.join(INPUT_LAYOUTS)}")
    return "tsv" if has_tsv else WEBDATASET


def input_source(
    uri: str,
    *,
    layout: str | None,
    tasks: Sequence[str] | None,
    split: str,
    s3: S3Options | None = None,
    key_map: tuple[tuple[str, tuple[str, ...]], ...] = (),
    dataset: str | None = None,
) -> RawSource | None:
    """The RawSource to read `uri` with, or None for a canonical corpus.

    layout: one of INPUT_LAYOUTS, or None to guess: a directory with manifest.json is a corpus, .tar /
    .tar.gz / .tgz files are WebDataset, and .tsv files take the layout of the one task in `tasks` (e.g.
    task vqa -> layout vqa). WebDataset rows get the one task in `tasks` (default caption).
    ValueError when the layout cannot be told or does not fit `tasks`.
    """
    if layout is not None and layout not in INPUT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(INPUT_LAYOUTS)}")
    kind = layout if layout in (CORPUS, WEBDATASET) else ("tsv" if layout else _kind(uri, s3))
    tasks = list(tasks or ())
    if kind == CORPUS:
        return None
    if kind == WEBDATASET:
        if len(tasks) > 1:
            raise ValueError(f"WebDataset input holds one task: give one --task of {', '.join(readers.WDS_TASKS)}")
        return RawSource(WEBDATASET, split=split, task=tasks[0] if tasks else "caption", key_map=key_map,
                         dataset=dataset)
    if layout is None:
        layout = _TSV_LAYOUT_OF_TASK.get(tasks[0]) if len(tasks) == 1 else None
        if layout is None:
            raise ValueError(f"cannot tell the layout of the OFA TSV input {storage.redact(uri)}; pass --layout, "
                             f"one of: {', '.join(readers.LAYOUTS)}")
    source = RawSource("ofa-tsv", split=split, layout=layout, dataset=dataset)
    task = source.row_task
    if task is not None and tasks and task not in tasks:
        raise ValueError(f"layout {layout} holds {task} rows, not {', '.join(tasks)}")
    return source


def inspect_raw(
    source: RawSource,
    input_uri: str,
    cfg: Any,
    vocab: Any,
    *,
    limit: int | None = None,
    scratch: str | None = None,
    list_bad: int = 100,
    concurrency: int | None = None,
) -> dict[str, Any]:
    """`pipelines.data.dataset.inspect`'s report for raw input: the first `limit` records of `input_uri`
    converted into a scratch corpus under `scratch` (default: a local temporary directory; on a cluster of
    several machines give an s3:// prefix), inspected with `cfg` (a DataConfig; its uri is replaced), the
    reader's bad rows added to the counts. Extra keys: input_layout, conversion (the reader's summary,
    with its first `list_bad` bad rows in full). The scratch corpus is deleted afterwards."""
    from pipelines.data.dataset import inspect
    from pipelines.data.rowstats import RowStats

    s3 = cfg.s3
    if scratch is None:
        corpus = tempfile.mkdtemp(prefix="ofa-doctor-")
    else:
        corpus = storage.join(scratch, f"ofa-doctor-{uuid.uuid4().hex[:12]}")
    try:
        conv = convert_raw(source, input_uri, corpus, s3=s3, limit=limit, list_bad=list_bad, concurrency=concurrency,
                           log_every_s=cfg.progress_every_s)
        tasks = cfg.tasks
        if conv["rows_ok"]:
            report = inspect(cfg.replace(uri=corpus, splits=(source.split,)), vocab)
        else:  # nothing reached the pipeline: only the reader's counts
            report = {"uri": None, "splits": [source.split], "tasks": None if tasks is None else list(tasks),
                      "rows_in_manifest": 0, "rows_seen": 0, "rows_ok": 0, "rows_bad": 0,
                      "bad_row_threshold": cfg.bad_row_threshold, "bad_by_reason": {}, "bad_examples": {},
                      "ok_by_task": {}, "bad_by_task": {}, "seconds": 0.0, "rows_per_s": None}
    finally:
        delete_dir(corpus, s3)
    stats = RowStats(ok=report["rows_ok"], ok_by_task=dict(report["ok_by_task"]),
                     bad_by_reason=dict(report["bad_by_reason"]), bad_by_task=dict(report["bad_by_task"]),
                     examples={k: list(v) for k, v in report["bad_examples"].items()})
    stats.merge(RowStats(bad_by_reason=conv["rows_bad"], bad_by_task=conv["bad_by_task"],
                         examples=conv["bad_examples"]))
    merged = stats.to_dict()
    return {
        **report,
        "uri": storage.redact(input_uri),
        "input_layout": source.layout or WEBDATASET,
        "rows_in_manifest": conv["records"],  # input records read (rows + the reader's bad rows)
        "rows_seen": report["rows_seen"] + sum(conv["rows_bad"].values()),
        "rows_ok": merged["ok"],
        "rows_bad": merged["bad"],
        "bad_fraction": round(stats.bad_fraction, 6),
        "over_threshold": stats.bad_fraction > cfg.bad_row_threshold,
        "bad_by_reason": merged["bad_by_reason"],
        "bad_examples": merged["examples"],
        "ok_by_task": merged["ok_by_task"],
        "bad_by_task": merged["bad_by_task"],
        "conversion": {k: v for k, v in conv.items() if k not in ("output", "fingerprint", "num_shards")},
    }
