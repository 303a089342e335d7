"""The demo's report: a metric table for the terminal and one self-contained HTML file (images inlined).

Inputs are plain data gathered by `jobs.apps.demo`: per task its metric against a trivial baseline, the
evaluation's per-task sections (`pipelines.report.task_sections`, the same as `jobs.evaluate`'s report.html),
sample predictions with their image bytes and references, training curves (metric histories) and a sweep table.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.report import CSS, annotated_png
from pipelines.report import fmt as _fmt
from pipelines.report import img_tag as _img


@dataclass(frozen=True)
class TaskResult:
    task: str
    model: str  # name@version
    metric: str
    value: float
    baseline: float
    baseline_what: str
    rows: int
    bar: float | None = None  # the value the model must reach to count as working (None: no bar)

    @property
    def verdict(self) -> str:
        """"meets bar" / "below bar" (or "beats baseline" / "at or below baseline" without a bar)."""
        if self.bar is not None:
            return "meets bar" if self.value >= self.bar else "below bar"
        return "beats baseline" if self.value > self.baseline else "at or below baseline"


@dataclass(frozen=True)
class Sample:
    task: str
    image: bytes
    prompt: str
    prediction: Any  # text, or a box [x0, y0, x1, y1] in image pixels
    reference: Any
    latency_ms: float | None = None
    correct: bool | None = None  # judged by the task's own per-example rule (None: not judged)


@dataclass(frozen=True)
class Picture:
    caption: str
    pngs: list[bytes]  # in rank order
    itm_scores: list[float]
    latency_ms: float | None = None


@dataclass(frozen=True)
class Report:
    results: list[TaskResult]
    samples: list[Sample]
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # run -> metric -> points
    sweep_rows: list[dict[str, Any]] = field(default_factory=list)
    sweep_plot_png: bytes | None = None
    links: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # shown above everything, e.g. that a smoke run's models are not meant to work
    sections: dict[str, str] = field(default_factory=dict)  # task -> `pipelines.report.task_sections` HTML
    pictures: list[Picture] = field(default_factory=list)  # text-to-image over HTTP: a caption and its images


def metric_table(results: Sequence[TaskResult]) -> str:
    """A plain-text table: task, model, metric, value, baseline, bar and verdict."""
    head = ("task", "model", "metric", "value", "baseline", "baseline is", "bar", "verdict", "rows")
    rows = [(r.task, r.model, r.metric, f"{r.value:.4f}", f"{r.baseline:.4f}", r.baseline_what,
             "" if r.bar is None else f"{r.bar:g}", r.verdict, str(r.rows)) for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), line("-" * w for w in widths)] + [line(r) for r in rows])


def curves_png(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> bytes | None:
    """One panel per metric name, one line per run."""
    names = sorted({m for per_run in curves.values() for m in per_run})
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for run, per_run in curves.items():
            pts = per_run.get(name)
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 30 else None, label=run)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def pick_samples(samples: Sequence[Sample], per_kind: int = 3) -> list[Sample]:
    """Per task (in first-seen order), up to `per_kind` correct then up to `per_kind` wrong samples; unjudged
    samples fill in after them up to the same count."""
    tasks = list(dict.fromkeys(s.task for s in samples))
    out: list[Sample] = []
    for task in tasks:
        mine = [s for s in samples if s.task == task]
        for kind in (True, False, None):
            out += [s for s in mine if s.correct is kind][:per_kind]
    return out


def render_html(report: Report, title: str = "ofa-ray demo") -> str:
    """One HTML document; every image is a data: URI, so the file stands alone."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}"
             ".sample img{image-rendering:pixelated}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if report.note:
        parts.append(f"<p id='note' style='background:#fff3cd;border:1px solid #e0c060;padding:8px'>"
                     f"<b>Note:</b> {esc(report.note)}</p>")
    if report.links:
        parts.append("<ul>" + "".join(f"<li>{esc(k)}: <code>{esc(v)}</code></li>" for k, v in report.links.items())
                     + "</ul>")
    parts.append("<h2>Metrics (held-out test split)</h2><table id='metrics'><tr><th>task</th><th>model</th>"
                 "<th>metric</th><th>value</th><th>baseline</th><th>baseline is</th><th>bar</th><th>verdict</th>"
                 "<th>rows</th></tr>")
    for r in report.results:
        bar = "" if r.bar is None else f"{r.bar:g}"
        parts.append(f"<tr><td>{esc(r.task)}</td><td>{esc(r.model)}</td><td>{esc(r.metric)}</td>"
                     f"<td>{r.value:.4f}</td><td>{r.baseline:.4f}</td><td>{esc(r.baseline_what)}</td>"
                     f"<td>{bar}</td><td>{esc(r.verdict)}</td><td>{r.rows}</td></tr>")
    parts.append("</table><h2>Predictions over HTTP (Ray Serve), held-out images</h2>"
                 "<p>Per task, a few predictions judged right and a few judged wrong (by the task's own rule: "
                 "the exact answer, IoU &ge; 0.5, shape and colour both named). Boxes: green the reference, red "
                 "the prediction.</p><table class='sample'><tr><th>task</th><th>judged</th><th>image</th>"
                 "<th>prompt</th><th>prediction</th><th>reference</th><th>latency</th></tr>")
    for s in pick_samples(report.samples):
        png = annotated_png(s.image, {"reference": s.reference, "prediction": s.prediction})
        latency = f"{s.latency_ms:.0f} ms" if s.latency_ms is not None else ""
        judged = {True: "right", False: "wrong", None: ""}[s.correct]
        parts.append(f"<tr class='sample-row' data-task='{esc(s.task)}' data-judged='{judged}'>"
                     f"<td>{esc(s.task)}</td><td>{judged}</td>"
                     f"<td>{_img(png, s.task)}</td><td>{esc(s.prompt)}</td><td>{esc(_fmt(s.prediction))}</td>"
                     f"<td>{esc(_fmt(s.reference))}</td><td>{latency}</td></tr>")
    parts.append("</table>")
    for task, section in report.sections.items():
        parts.append(f"<div class='task-section' data-task='{esc(task)}'><h2>Evaluation of {esc(task)}</h2>"
                     f"{section.replace('<h2>', '<h3>').replace('</h2>', '</h3>')}</div>")
    if report.pictures:
        parts.append("<h2>Text-to-image over HTTP (POST /v1/text-to-image)</h2><p>Held-out captions; each "
                     "caption's sampled pictures in the order the model's own image-text matching ranks them "
                     "(its P(yes) under each).</p><table id='pictures'><tr><th>caption</th><th>pictures</th>"
                     "<th>latency</th></tr>")
        for pic in report.pictures:
            cells = "".join(f"<figure style='display:inline-block;margin:2px'>{_img(png, pic.caption)}"
                            f"<figcaption>{score:.2f}</figcaption></figure>"
                            for png, score in zip(pic.pngs, pic.itm_scores, strict=True))
            latency = f"{pic.latency_ms:.0f} ms" if pic.latency_ms is not None else ""
            parts.append(f"<tr class='picture-row'><td>{esc(pic.caption)}</td><td class='sample'>{cells}</td>"
                         f"<td>{latency}</td></tr>")
        parts.append("</table>")
    curves = curves_png(report.curves)
    if curves:
        parts.append("<h2>Training curves</h2>" + _img(curves, "training curves"))
    if report.sweep_rows:
        keys = list(report.sweep_rows[0])
        parts.append("<h2>Hyperparameter sweep (Ray Tune)</h2><table><tr>" +
                     "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>")
        for row in report.sweep_rows:
            parts.append("<tr>" + "".join(f"<td>{esc(_cell(row.get(k)))}</td>" for k in keys) + "</tr>")
        parts.append("</table>")
    if report.sweep_plot_png:
        parts.append(_img(report.sweep_plot_png, "sweep: metric per epoch per trial"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
