"""The demo's report (`jobs.apps.report`): the metric table and the self-contained HTML file."""

import base64
import io
import re

from PIL import Image

from jobs.apps.report import (
    Report,
    Sample,
    TaskResult,
    annotated_png,
    metric_table,
    pick_samples,
    render_html,
)


def _png(size=(64, 64), colour=(255, 255, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


RESULTS = [TaskResult("vqa", "ofa-vqa v3", "vqa_score", 0.9132, 0.3, "always 'no'", 400),
           TaskResult("grounding", "ofa-grounding v1", "acc50", 0.5, 0.1, "whole-image box", 400)]


def test_metric_table_lines_up_and_holds_every_value():
    lines = metric_table(RESULTS).splitlines()
    assert lines[0].split() == ["task", "model", "metric", "value", "baseline", "baseline", "is", "bar", "verdict",
                                "rows"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "0.9132" in lines[2] and "0.3000" in lines[2] and "always 'no'" in lines[2]
    assert lines[2].index("0.9132") == lines[3].index("0.5000")  # columns line up


def test_boxes_are_drawn_where_they_are():
    png = annotated_png(_png(), {"reference": [8, 8, 24, 24], "prediction": [40, 40, 56, 56]}, scale=2)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (128, 128)
    assert img.getpixel((16, 30)) == (0, 170, 0)  # left edge of the reference box, x=8*2
    assert img.getpixel((80, 100)) == (220, 0, 0)  # left edge of the prediction, x=40*2
    assert img.getpixel((60, 60)) == (255, 255, 255)  # between the boxes: untouched


def test_html_stands_alone_with_one_image_per_sample_and_the_metric_table():
    samples = [Sample("vqa", _png(), "what color?", "red", ["red"], 12.0),
               Sample("caption", _png(), "(caption)", "a red circle", "a red circle", 15.0),
               Sample("grounding", _png(), "red circle", [1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 32.0, 32.0], 9.0)]
    html = render_html(Report(RESULTS, samples, curves={"vqa": {"train/loss": [(1, 2.0), (2, 1.0)]}},
                              sweep_rows=[{"trial": "t1", "optim.lr": 1e-4, "best": 0.9}]))
    rows = re.findall(r"<tr class='sample-row' data-task='(\w+)' data-judged='\w*'>(.*?)</tr>", html, re.S)
    assert [t for t, _ in rows] == ["vqa", "caption", "grounding"]
    for _, row in rows:
        src = re.findall(r'src="data:image/png;base64,([^"]+)"', row)
        assert len(src) == 1
        Image.open(io.BytesIO(base64.b64decode(src[0]))).verify()  # a real PNG, inlined
    assert "a red circle" in rows[1][1] and "[1.0, 2.0, 30.0, 40.0]" in rows[2][1]
    table = html[html.index("<table id='metrics'>"):]
    assert "0.9132" in table[: table.index("</table>")] and "whole-image box" in table
    assert "src=\"http" not in html and "<script" not in html  # nothing fetched: one file
    assert html.count("data:image/png;base64,") == 3 + 1  # samples + the training curves
    assert "optim.lr" in html


def test_html_escapes_what_it_shows():
    s = Sample("vqa", _png(), "<script>alert(1)</script>", "<b>x</b>", ["y"])
    html = render_html(Report([], [s]))
    assert "<script>alert" not in html and "&lt;script&gt;" in html and "&lt;b&gt;x" in html


def test_verdict_reads_the_bar_else_the_baseline():
    assert TaskResult("vqa", "m", "vqa_score", 0.91, 0.36, "always 'no'", 400, bar=0.9).verdict == "meets bar"
    assert TaskResult("vqa", "m", "vqa_score", 0.89, 0.36, "always 'no'", 400, bar=0.9).verdict == "below bar"
    assert TaskResult("vqa", "m", "vqa_score", 0.37, 0.36, "always 'no'", 400).verdict == "beats baseline"
    assert TaskResult("vqa", "m", "vqa_score", 0.36, 0.36, "always 'no'", 400).verdict == "at or below baseline"
    lines = metric_table([TaskResult("vqa", "m", "vqa_score", 0.91, 0.36, "always 'no'", 400, bar=0.9)]).splitlines()
    assert lines[2].split()[-3:] == ["meets", "bar", "400"]


def test_samples_show_right_and_wrong_per_task_and_the_note():
    def s(task, i, ok):
        return Sample(task, _png(), f"{task} {i}", "p", "r", 1.0, correct=ok)

    samples = [s("vqa", i, True) for i in range(5)] + [s("vqa", 9, False), s("grounding", 0, False),
                                                       s("grounding", 1, None)]
    picked = pick_samples(samples, per_kind=3)
    assert [(x.task, x.prompt, x.correct) for x in picked] == [
        ("vqa", "vqa 0", True), ("vqa", "vqa 1", True), ("vqa", "vqa 2", True), ("vqa", "vqa 9", False),
        ("grounding", "grounding 0", False), ("grounding", "grounding 1", None)]
    html = render_html(Report(RESULTS, samples, note="smoke-sized models: not expected to beat the baselines"))
    assert "smoke-sized models: not expected to beat the baselines" in html
    assert html.index("id='note'") < html.index("id='metrics'")
    judged = re.findall(r"data-task='vqa' data-judged='(\w*)'", html)
    assert judged == ["right", "right", "right", "wrong"]


def test_the_demo_shows_the_evaluations_own_sections():
    from ofa_model.evaluation import scored
    from ofa_model.tasks import TASKS
    from pipelines.report import RowView, task_sections

    recs = [{"id": f"r{i}", "prediction": "red", "reference": [c] * 3} for i, c in enumerate(["red", "blue"])]
    for r, v in zip(recs, scored(TASKS["vqa"], recs)[1], strict=True):
        r["example_score"] = v
    section = task_sections(TASKS["vqa"], recs, {r["id"]: RowView("what color?", None, _png()) for r in recs})
    html = render_html(Report(RESULTS, [Sample("vqa", _png(), "what color?", "red", "red", 1.0, True)],
                              sections={"vqa": section}))
    part = html[html.index("<div class='task-section' data-task='vqa'>"):]
    assert "<table id='confusions'>" in part and "<td>blue</td><td>red</td>" in part  # the one confusion
    assert html.index("id='metrics'") < html.index("class='task-section'")
    assert len(re.findall(r"<tr class='sample-row'", html)) == 1  # check_demo's samples: only the served ones
