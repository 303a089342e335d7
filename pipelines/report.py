"""The evaluation report: one self-contained HTML file a person reads (inline CSS, images as data: URIs, no script).

    rows = read_report_rows(data, spec, records, split="test")   # texts, sizes and the few images it shows
    html = render_evaluation(spec, records, metrics, rows)

`records` are prediction records as `ofa_model.evaluation` writes them (id, prediction, reference,
example_score, ...). The page holds:

* the headline metrics beside a trivial baseline: one constant prediction for every row, scored by the same
  `ofa_model.evaluation.scored`. The constant is the most common reference of the evaluated rows themselves (VQA:
  each row's majority answer; captions: the most common reference caption; labels: the majority label) and for
  grounding the whole image's box, so it is the best constant answer on these rows, not a train-split guess;
* per task kind (`TaskSpec.metric`): VQA accuracy by answer type (of the row's majority answer: yes/no, number,
  other) and by question type (the question's first two words), and the most frequent reference -> prediction
  confusions; grounding: the IoU distribution and the best and worst rows with both boxes drawn; captions: the
  best rows by per-example CIDEr-D with their images (the worst are the worst examples); classification: the confusion matrix;
* the worst examples (lowest `example_score`) of every task.

Bounded whatever the split's size: `show_ids` picks at most `MAX_IMAGES` rows whose images are read, each shown as
a `THUMB_PX` thumbnail; everything else is counted from the records and the rows' texts and image sizes.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from ofa_model import metrics as M
from ofa_model.evaluation import primary_metric, scored
from ofa_model.tasks import TaskSpec

logger = logging.getLogger(__name__)

THUMB_PX = 96  # the longer side of a thumbnail
WORST, BEST = 12, 6  # rows in the worst-examples table; best (and worst) rows shown per image section
MAX_IMAGES = WORST + BEST  # distinct rows whose images a report reads
CONFUSIONS = 10
IOU_BINS = 10
REFERENCE_COLOUR, PREDICTION_COLOUR = (0, 170, 0), (220, 0, 0)
NUMBER_WORDS = frozenset("zero one two three four five six seven eight nine ten eleven twelve".split())
CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px;vertical-align:top}th{background:#f0f0f0}"
       "td.num{text-align:right}.bar{background:#4a7ebb;height:12px}.diag{background:#e3f1e3}"
       ".thumb{image-rendering:pixelated}")
esc = html.escape


@dataclass(frozen=True)
class RowView:
    """What the report needs of a corpus row: its text, its image's (width, height), and its image bytes where
    the report shows it (else None)."""

    text: str | None = None
    size: tuple[int, int] | None = None
    image: bytes | None = None


# =============================================================================================================
# Small pieces, shared with the demo's report (jobs.apps.report)


def is_box(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def annotated_png(image: bytes, boxes: Mapping[str, Any], scale: float = 4, *, max_px: int | None = None) -> bytes:
    """The image scaled `scale` times (or so its longer side is `max_px`) with each box drawn (green: the
    "reference", red: the "prediction")."""
    img = Image.open(io.BytesIO(image)).convert("RGB")
    if max_px is not None:
        scale = max_px / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.NEAREST if scale >= 1 else Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    colours = {"reference": REFERENCE_COLOUR, "prediction": PREDICTION_COLOUR}
    for name, box in boxes.items():
        if is_box(box):
            draw.rectangle([v * scale for v in box], outline=colours.get(name, (0, 0, 255)),
                           width=3 if max_px is None else 2)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def img_tag(png: bytes, alt: str, cls: str | None = None) -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def fmt(value: Any) -> str:
    """A prediction or reference as a short text: a box to one decimal, a list as its first three."""
    if is_box(value):
        return "[" + ", ".join(f"{v:.1f}" for v in value) + "]"
    if isinstance(value, list):
        return " | ".join(str(v) for v in value[:3]) + (" | ..." if len(value) > 3 else "")
    return "" if value is None else str(value)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], id_: str | None = None) -> str:
    """An HTML table; the cells are HTML already (escape what they show)."""
    attr = f" id='{id_}'" if id_ else ""
    return (f"<table{attr}><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(rows_cell for rows_cell in r) + "</tr>" for r in rows) + "</table>")


def _td(text: Any, num: bool = False) -> str:
    return f"<td class='num'>{text}</td>" if num else f"<td>{esc(str(text))}</td>"


# =============================================================================================================
# What to show


def scored_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records that were scored (a row the read stage could not give has no example_score)."""
    return [r for r in records if r.get("example_score") is not None]


def _ranked(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Worst first; ties in record order."""
    return sorted(records, key=lambda r: r["example_score"])


def show_ids(spec: TaskSpec, records: Sequence[Mapping[str, Any]]) -> set[str]:
    """The ids of the rows whose images the report shows (at most MAX_IMAGES): the worst, and for captions and
    grounding the best."""
    if spec.image_field is None:
        return set()
    ranked = _ranked(scored_records(records))
    ids = [r["id"] for r in ranked[:WORST]]
    if spec.metric in ("caption", "grounding"):
        ids += [r["id"] for r in ranked[::-1][:BEST]]
    return set(ids)


def read_report_rows(data: str, spec: TaskSpec, records: Sequence[Mapping[str, Any]], *, split: str,
                     s3=None) -> dict[str, RowView]:
    """One pass over the split (stopping once every record's row is seen): each record's text and image size,
    and the image bytes of `show_ids`."""
    from pipelines.data.shards import iter_rows

    wanted = {r["id"] for r in scored_records(records)}
    shown = show_ids(spec, records)
    out: dict[str, RowView] = {}
    try:
        for row in iter_rows(data, s3=s3, splits=[split], tasks=[spec.name]):
            rid = row["id"]
            if rid not in wanted or rid in out:
                continue
            image = row.get(spec.image_field) if spec.image_field else None
            size = None
            if image is not None and spec.metric == "grounding":
                with Image.open(io.BytesIO(image)) as img:  # the header only
                    size = img.size
            out[rid] = RowView(row.get("text"), size, image if rid in shown else None)
            if len(out) == len(wanted):
                break
    except (OSError, ValueError) as exc:  # a shard the evaluation counted as bad: the report shows less
        logger.warning("the report has %d of %d rows' texts and images: reading %s failed: %s", len(out),
                       len(wanted), data, exc)
    return out


# =============================================================================================================
# The baseline


def majority_answer(reference: Any) -> Any:
    """A VQA row's majority answer (first of the most common), a caption row's first caption, else the
    reference itself."""
    if isinstance(reference, list) and reference and not is_box(reference):
        return Counter(reference).most_common(1)[0][0]
    return reference


def baseline(spec: TaskSpec, records: Sequence[Mapping[str, Any]],
             rows: Mapping[str, RowView]) -> tuple[dict[str, float], str] | None:
    """The metrics of one constant prediction on these rows, and what the constant is (module docstring);
    None when there is none (no scored rows, or a grounding row without its image size)."""
    recs = [r for r in scored_records(records) if r.get("reference") is not None]
    if not recs:
        return None
    if spec.metric == "grounding":
        sizes = [rows.get(r["id"], RowView()).size for r in recs]
        if any(s is None for s in sizes):
            return None
        fake = [{**r, "prediction": [0.0, 0.0, float(w), float(h)]} for r, (w, h) in zip(recs, sizes, strict=True)]
        return scored(spec, fake)[0], "the whole image's box"
    if spec.metric == "caption" or spec.metric == "summarization":
        pool = [c for r in recs for c in (r["reference"] if isinstance(r["reference"], list) else [r["reference"]])]
    else:
        pool = [majority_answer(r["reference"]) for r in recs]
    const = Counter(pool).most_common(1)[0][0]
    fake = [{**r, "prediction": const} for r in recs]
    return scored(spec, fake)[0], f"always '{const}'"


# =============================================================================================================
# Sections


def headline_html(spec: TaskSpec, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, float],
                  rows: Mapping[str, RowView], bad_rows: Mapping[str, int] | None = None) -> str:
    """The metrics against the baseline, the row and error counts and the mean latency."""
    base = baseline(spec, records, rows)
    primary, _ = primary_metric(spec)
    names = [k for k in metrics if k not in ("rows", "errors")]
    body = []
    for k in names:
        b = f"{base[0][k]:.4f}" if base is not None and k in base[0] else ""
        label = f"<b>{esc(k)}</b> (primary)" if k == primary else esc(k)
        body.append([f"<td>{label}</td>", _td(f"{metrics[k]:.4f}", True), _td(b, True)])
    what = esc(base[1]) if base is not None else "none"
    lat = [r["latency_s"] for r in records if r.get("latency_s") is not None]
    facts = [f"rows scored: {int(metrics.get('rows', 0))}", f"errors (counted wrong): {int(metrics.get('errors', 0))}"]
    if bad_rows:
        facts.append("unreadable rows (left out): " + ", ".join(f"{k} {v}" for k, v in sorted(bad_rows.items())))
    if lat:
        facts.append(f"mean latency per row: {1000 * sum(lat) / len(lat):.1f} ms")
    return ("<h2>Metrics</h2>" + _table(["metric", "model", "baseline"], body, "headline")
            + f"<p>Baseline: <span id='baseline-what'>{what}</span>, for every row, scored the same way.</p>"
            + "<p>" + "; ".join(esc(f) for f in facts) + "</p>")


def answer_type(answer: Any) -> str:
    """VQA's answer types: "yes/no", "number" (digits or a number word) or "other"."""
    text = M.normalize_vqa_answer(str(answer)) if answer is not None else ""
    if text in ("yes", "no"):
        return "yes/no"
    if text.replace(".", "", 1).isdigit() or text in NUMBER_WORDS:
        return "number"
    return "other"


def question_type(question: str | None, words: int = 2) -> str:
    return " ".join((question or "").lower().replace("?", " ").split()[:words]) or "(no question)"


def _accuracy_by(title: str, key_name: str, groups: Mapping[str, list[float]], id_: str) -> str:
    rows = [[_td(k), _td(len(v), True), _td(f"{sum(v) / len(v):.4f}", True)]
            for k, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return f"<h3>{esc(title)}</h3>" + _table([key_name, "rows", "accuracy"], rows, id_)


def vqa_html(records: Sequence[Mapping[str, Any]], rows: Mapping[str, RowView]) -> str:
    recs = scored_records(records)
    by_answer, by_question = defaultdict(list), defaultdict(list)
    confusions = Counter()
    for r in recs:
        ref = majority_answer(r["reference"])
        by_answer[answer_type(ref)].append(r["example_score"])
        by_question[question_type(rows.get(r["id"], RowView()).text)].append(r["example_score"])
        pred = r["prediction"]
        if pred is None or M.normalize_vqa_answer(str(pred)) != M.normalize_vqa_answer(str(ref)):
            confusions[(str(ref), "(error)" if pred is None else str(pred))] += 1
    conf_rows = [[_td(a), _td(b), _td(n, True)] for (a, b), n in confusions.most_common(CONFUSIONS)]
    return ("<h2>VQA</h2>" + _accuracy_by("Accuracy by answer type (of the majority answer)", "answer type",
                                          by_answer, "by-answer-type")
            + _accuracy_by("Accuracy by question type (first two words)", "question type", by_question,
                           "by-question-type")
            + "<h3>Most frequent confusions</h3>"
            + (_table(["reference", "prediction", "rows"], conf_rows, "confusions") if conf_rows
               else "<p>none: every prediction is the majority answer</p>"))


def _thumb(rid: str, rows: Mapping[str, RowView], boxes: Mapping[str, Any] | None = None) -> str:
    view = rows.get(rid)
    if view is None or view.image is None:
        return "<td></td>"
    return f"<td>{img_tag(annotated_png(view.image, boxes or {}, max_px=THUMB_PX), rid, 'thumb')}</td>"


def _examples(records: Sequence[Mapping[str, Any]], rows: Mapping[str, RowView], spec: TaskSpec, id_: str,
              score_name: str) -> str:
    boxes = spec.metric == "grounding"
    body = []
    for r in records:
        drawn = {"reference": r["reference"], "prediction": r["prediction"]} if boxes else None
        err = r.get("error")
        err = err.get("reason", err) if isinstance(err, dict) else err
        text = rows.get(r["id"], RowView()).text
        body.append([f"<td class='example-id'>{esc(str(r['id']))}</td>", _thumb(r["id"], rows, drawn),
                     _td(text or ""), _td(fmt(r["prediction"]) if err is None else f"(error: {err})"),
                     _td(fmt(r["reference"])), _td(f"{r['example_score']:.3f}", True)])
    return _table(["id", "image", "text", "prediction", "reference", score_name], body, id_)


def grounding_html(spec: TaskSpec, records: Sequence[Mapping[str, Any]], rows: Mapping[str, RowView]) -> str:
    recs = scored_records(records)
    counts = [0] * IOU_BINS
    for r in recs:
        counts[min(int(r["example_score"] * IOU_BINS), IOU_BINS - 1)] += 1
    top = max(counts) or 1
    hist = [[_td(f"{i / IOU_BINS:.1f}-{(i + 1) / IOU_BINS:.1f}"), _td(n, True),
             f"<td style='width:320px'><div class='bar' style='width:{100 * n / top:.0f}%'></div></td>"]
            for i, n in enumerate(counts)]
    ranked = _ranked(recs)
    return ("<h2>Grounding</h2><h3>IoU distribution</h3>" + _table(["IoU", "rows", ""], hist, "iou-histogram")
            + "<p>Boxes: green the reference, red the prediction.</p><h3>Best</h3>"
            + _examples(ranked[::-1][:BEST], rows, spec, "best", "IoU"))


def caption_html(spec: TaskSpec, records: Sequence[Mapping[str, Any]], rows: Mapping[str, RowView]) -> str:
    ranked = _ranked(scored_records(records))
    return ("<h2>Captions</h2><h3>Best by CIDEr-D</h3>" + _examples(ranked[::-1][:BEST], rows, spec, "best", "CIDEr-D")
            + "<p>The worst by CIDEr-D: the worst examples below.</p>")


def confusion_html(spec: TaskSpec, records: Sequence[Mapping[str, Any]]) -> str:
    """Rows: the reference label; columns: the prediction (an error is a column of its own)."""
    recs = scored_records(records)
    cells = Counter((str(r["reference"]), "(error)" if r["prediction"] is None else str(r["prediction"]))
                    for r in recs)
    labels = list(dict.fromkeys([*spec.labels, *sorted({a for a, _ in cells}), *sorted({b for _, b in cells})]))
    labels = [x for x in labels if x != "(error)"]
    cols = labels + (["(error)"] if any(b == "(error)" for _, b in cells) else [])
    body = []
    for a in labels:
        row = [f"<th>{esc(a)}</th>"]
        for b in cols:
            n = cells.get((a, b), 0)
            cls = " diag" if a == b else ""
            row.append(f"<td class='num{cls}' data-ref='{esc(a)}' data-pred='{esc(b)}'>{n}</td>")
        body.append(row)
    return ("<h2>Confusion matrix</h2><p>Rows: the reference; columns: the prediction.</p>"
            + _table(["reference \\ prediction", *(esc(c) for c in cols)], body, "confusion"))


def task_sections(spec: TaskSpec, records: Sequence[Mapping[str, Any]], rows: Mapping[str, RowView]) -> str:
    """The task kind's own sections, then its worst examples (HTML, no headline)."""
    parts = []
    if spec.metric == "vqa":
        parts.append(vqa_html(records, rows))
    elif spec.metric == "grounding":
        parts.append(grounding_html(spec, records, rows))
    elif spec.metric == "caption":
        parts.append(caption_html(spec, records, rows))
    elif spec.metric == "classification":
        parts.append(confusion_html(spec, records))
    score_name = {"vqa": "VQA acc", "caption": "CIDEr-D", "grounding": "IoU", "classification": "right",
                  "summarization": "ROUGE-L"}.get(spec.metric, "score")
    worst = _ranked(scored_records(records))[:WORST]
    parts.append(f"<h2>Worst examples ({esc(spec.name)})</h2>"
                 + _examples(worst, rows, spec, f"worst-{spec.name}", score_name))
    return "\n".join(parts)


def render_evaluation(spec: TaskSpec, records: Sequence[Mapping[str, Any]], metrics: Mapping[str, float],
                      rows: Mapping[str, RowView], *, title: str | None = None,
                      facts: Mapping[str, str] | None = None, bad_rows: Mapping[str, int] | None = None) -> str:
    """The whole page (module docstring). facts: shown as a list under the title (model, data, split...)."""
    title = title or f"evaluation: {spec.name}"
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{esc(title)}</h1>")
    listed = "".join(f"<li>{esc(k)}: <code>{esc(str(v))}</code></li>" for k, v in (facts or {}).items())
    return "\n".join([head, f"<ul>{listed}</ul>" if listed else "",
                      headline_html(spec, records, metrics, rows, bad_rows), task_sections(spec, records, rows),
                      "</body></html>"])
