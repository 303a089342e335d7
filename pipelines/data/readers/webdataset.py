"""WebDataset tar shards (members grouped by key), streamed with `tarfile`.

`read_webdataset_file` reads one tar of `input_files(uri, WDS_SUFFIXES)` (a tar, or every tar under a
directory/prefix); its row ids do not depend on the other files. A broken sample becomes one `BadRow`; a
tar that cannot be read to the end, one BadRow "unreadable_shard".
"""

import json
import math
import posixpath
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ofa_model.errors import (
    BAD_BOX,
    BAD_ENCODING,
    BAD_FORMAT,
    BAD_IMAGE,
    BAD_JSON,
    BAD_TYPE,
    EMPTY_TEXT,
    MISSING_FIELD,
    MISSING_MEMBER,
    UNREADABLE_SHARD,
)
from pipelines import storage
from pipelines.data.readers.files import InputFile
from pipelines.data.readers.rows import (
    BadInput,
    BadRow,
    check_box,
    clean_text,
    image_format,
    make_row,
    ranked_targets,
    required_text,
)
from pipelines.data.schema import IMAGE_EXTENSIONS
from pipelines.storage import S3Options

# --- WebDataset -------------------------------------------------------------------------------------------

WDS_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Where each role comes from, per task: a member extension ("txt") or a field of the .json member
# ("json:question"); the first candidate present wins. `key_map` replaces candidates role by role.
_WDS_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "caption": {"target": ("txt", "json:caption"), "targets": ("json:captions",)},
    "vqa": {"text": ("json:question",), "answers": ("json:answers", "json:answer")},
    "grounding": {"text": ("json:text", "txt"), "box": ("json:box",)},
}
WDS_TASKS = tuple(_WDS_SOURCES)


def _member_key(name: str) -> tuple[str, str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): key = dirname + basename up to the first dot."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _iter_samples(file_uri: str, s3: S3Options | None) -> Iterator[tuple[str, dict[str, bytes]] | BadRow]:
    """(key, {extension: bytes}) per sample, in tar order; consecutive members with one key form a sample."""
    try:
        fs, path = storage.resolve(file_uri, s3)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile() or posixpath.basename(info.name).startswith("."):
                    continue
                member_key, ext = _member_key(info.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
            if key is not None:
                yield key, members
    except (OSError, tarfile.TarError, EOFError) as exc:
        yield BadRow(None, UNREADABLE_SHARD, storage.redact(f"{type(exc).__name__}: {exc}"), file_uri)


def _lookup(members: dict[str, bytes], doc: dict | None, candidates: Sequence[str]) -> Any:
    """The first candidate present: decoded text of a member, or a .json field; None if none is."""
    for cand in candidates:
        if cand.startswith("json:"):
            if doc is not None and doc.get(cand[5:]) is not None:
                return doc[cand[5:]]
        elif cand in members:
            try:
                return members[cand].decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(BAD_ENCODING, f".{cand} member is not UTF-8") from None
    return None


def _wds_answers(value: Any) -> tuple[str, list[str], list[float]]:
    """VQA answers from a str, a list of str (weight = share of votes), a list of {"answer", "weight"|
    "confidence"} objects or an {answer: weight} object."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        pairs = [(a, value.count(a) / len(value)) for a in dict.fromkeys(value)]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        pairs = [(v.get("answer"), v.get("weight", v.get("confidence", 1.0))) for v in value]
    else:
        raise BadInput(BAD_FORMAT, f"answers must be a string, a list or an object, got {value!r}")
    if not pairs:
        raise BadInput(BAD_FORMAT, "answers object is empty")
    targets, weights = [], []
    for answer, weight in pairs:
        if not isinstance(answer, str) or not answer.strip():
            raise BadInput(EMPTY_TEXT, f"answer {answer!r} is empty or not a string")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise BadInput(BAD_TYPE, f"weight of answer {answer!r} is not a finite number: {weight!r}")
        targets.append(clean_text(answer))
        weights.append(float(weight))
    return ranked_targets(targets, weights)


def _wds_row(
    key: str, members: dict[str, bytes], task: str, split: str, dataset: str, sources: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if not images:
        raise BadInput(MISSING_MEMBER, f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}")
    if len(images) > 1:
        raise BadInput(BAD_FORMAT, f"several image members: {images}")
    image = members[images[0]]
    if image_format(image) is None:
        raise BadInput(BAD_IMAGE, f".{images[0]} member is not an image: {image[:8]!r}")
    doc = None
    if any(c.startswith("json:") for cands in sources.values() for c in cands):
        if "json" in members:
            try:
                doc = json.loads(members["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadInput(BAD_JSON, f".json member does not parse: {exc}") from None
            if not isinstance(doc, dict):
                raise BadInput(BAD_JSON, f".json member is a {type(doc).__name__}, not an object")

    def need(role: str) -> Any:
        value = _lookup(members, doc, sources[role])
        if value is None:
            reason = MISSING_FIELD if doc is not None else MISSING_MEMBER
            raise BadInput(reason, f"no {role} (looked for {list(sources[role])}); members: {sorted(members)}")
        return value

    def text(role: str) -> str:
        value = need(role)
        if not isinstance(value, str):
            raise BadInput(BAD_FORMAT, f"{role} must be a string, got {value!r}")
        return required_text(value, role)

    row: dict[str, Any] = {"id": f"{dataset}/{split}/{key}", "task": task, "split": split, "dataset": dataset}
    row["image"] = image
    if task == "caption":
        targets = _lookup(members, doc, sources["targets"])
        if targets is not None:
            if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
                raise BadInput(BAD_FORMAT, f"targets must be a list of non-empty strings, got {targets!r}")
            targets = [clean_text(t) for t in targets]
        if _lookup(members, doc, sources["target"]) is not None or (not targets and split != "test"):
            row["target"] = text("target")
            row["targets"] = targets or [row["target"]]
        elif targets:
            row["target"], row["targets"] = targets[0], targets
    elif task == "vqa":
        row["text"] = text("text")
        answers = _lookup(members, doc, sources["answers"])
        if answers is not None or split != "test":
            row["target"], row["targets"], row["target_weights"] = _wds_answers(need("answers"))
    else:  # grounding
        row["text"] = text("text")
        box = need("box")
        if not isinstance(box, list):
            raise BadInput(BAD_BOX, f"box must be a list [x0, y0, x1, y1], got {box!r}")
        if any(isinstance(v, (bool, str)) for v in box):
            raise BadInput(BAD_BOX, f"box has a value that is not a number: {box!r}")
        row["box"] = check_box(box, "box")
    return row


def webdataset_sources(
    task: str, split: str, key_map: Mapping[str, str | Sequence[str]] | None = None
) -> dict[str, tuple[str, ...]]:
    """Where each role of `task` comes from, `key_map` applied; ValueError for a bad task, split or role."""
    if task not in _WDS_SOURCES:
        raise ValueError(f"unsupported WebDataset task {task!r}; supported: {', '.join(WDS_TASKS)}")
    if not split:
        raise ValueError("split must be a non-empty string")
    sources = dict(_WDS_SOURCES[task])
    for role, cands in (key_map or {}).items():
        if role not in sources:
            raise ValueError(f"key_map role {role!r} is not used by task {task!r}; roles: {sorted(sources)}")
        sources[role] = (cands,) if isinstance(cands, str) else tuple(cands)
    return sources


def read_webdataset_file(
    file: InputFile,
    *,
    task: str,
    split: str,
    s3: S3Options | None = None,
    key_map: Mapping[str, str | Sequence[str]] | None = None,
    dataset: str | None = None,
) -> Iterator[dict | BadRow]:
    """Canonical rows (or BadRows) of one WebDataset tar (.tar/.tar.gz/.tgz) of `input_files`.

    Members are grouped by key (directory + basename up to the first dot); the image comes from the one
    .jpg/.jpeg/.png/.webp member. Per task, where the other fields come from (override any with `key_map`,
    role -> a member extension like "txt" or "json:<field>", or a list of them tried in order):
      caption:   target <- .txt or json "caption"; targets <- json "captions" (else [target])
      vqa:       text <- json "question"; answers <- json "answers" (str, list of str, list of
                 {"answer", "weight"/"confidence"}, or {answer: weight}) or json "answer"
      grounding: text <- json "text" or .txt; box <- json "box" = [x0, y0, x1, y1] in pixels
    Row ids are "<dataset>/<split>/<key>", dataset defaulting to "webdataset". Targets may be missing
    only on split "test". Bad options raise ValueError at the first row.
    """
    sources = webdataset_sources(task, split, key_map)
    yield from _read_tar(file.uri, task, split, s3, sources, dataset or "webdataset")


def _read_tar(
    file_uri: str, task: str, split: str, s3: S3Options | None, sources: dict[str, tuple[str, ...]], dataset: str
) -> Iterator[dict | BadRow]:
    for item in _iter_samples(file_uri, s3):
        if isinstance(item, BadRow):
            yield item
            continue
        key, members = item
        row_id = f"{dataset}/{split}/{key}"
        source = f"{file_uri}:{key}"
        try:
            yield make_row(source, **_wds_row(key, members, task, split, dataset, sources))
        except BadInput as bad:
            yield bad.bad_row(row_id, source)
