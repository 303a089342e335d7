"""The evaluation report (`pipelines.report`): records with known values -> the HTML a person reads."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from ofa_model import metrics as M
from ofa_model.evaluation import scored
from ofa_model.tasks import TASKS
from pipelines.report import THUMB_PX, RowView, read_report_rows, render_evaluation
from tests.test_registry import micro_bundle  # noqa: F401 (a fixture)


def _png(colour=(200, 20, 20), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _records(task: str, pairs: list[tuple]) -> tuple[list[dict], dict[str, float]]:
    """Records (id r0, r1, ...) of (prediction, reference) pairs, scored as evaluation scores them."""
    recs = [{"id": f"r{i}", "task": task, "prediction": p, "reference": ref, "latency_s": 0.01}
            for i, (p, ref) in enumerate(pairs)]
    metrics, per_row = scored(TASKS[task], recs)
    for r, v in zip(recs, per_row, strict=True):
        r["example_score"] = v
    return recs, metrics


def _section(page: str, id_: str) -> str:
    start = page.index(f"<table id='{id_}'>")
    return page[start:page.index("</table>", start)]


def _cells(table: str) -> list[list[str]]:
    return [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]


def _thumbs(page: str) -> list[bytes]:
    return [base64.b64decode(s) for s in re.findall(r'class="thumb" alt="[^"]*" src="data:image/png;base64,([^"]+)"',
                                                    page)]


def _stands_alone(page: str) -> None:
    assert not re.search(r"(src|href)=[\"']?https?:", page) and "<script" not in page


def test_vqa_baseline_answer_and_question_types_confusions_and_worst():
    pairs = [("yes", ["yes", "yes", "no"]), ("yes", ["no", "no", "no"]), ("3", ["2", "2", "2"]),
             ("red", ["red"] * 3), ("red", ["blue"] * 3), ("no", ["yes"] * 3), ("red", ["blue"] * 3)]
    texts = ["is there a circle?", "is there a square?", "how many shapes?", "what color is it?",
             "what color is the shape?", "does it have corners?", "what color?"]
    recs, metrics = _records("vqa", pairs)
    rows = {r["id"]: RowView(t, None, _png()) for r, t in zip(recs, texts, strict=True)}
    page = render_evaluation(TASKS["vqa"], recs, metrics, rows)

    # the baseline: every row's majority answer counted; "yes" is the most common (r0, r5)
    base = sum(M.vqa_accuracy("yes", ref) for _, ref in pairs) / len(pairs)
    head = _cells(_section(page, "headline"))
    assert head[1][0] == "<b>vqa_score</b> (primary)"
    assert head[1][1:] == [f"{metrics['vqa_score']:.4f}", f"{base:.4f}"] and "always &#x27;yes&#x27;" in page
    by_type = {c[0]: c[1:] for c in _cells(_section(page, "by-answer-type"))[1:]}
    yes_no = [recs[i]["example_score"] for i in (0, 1, 5)]
    other = [recs[i]["example_score"] for i in (3, 4, 6)]
    assert by_type == {"yes/no": ["3", f"{sum(yes_no) / 3:.4f}"], "other": ["3", f"{sum(other) / 3:.4f}"],
                       "number": ["1", "0.0000"]}
    by_question = {c[0]: c[1] for c in _cells(_section(page, "by-question-type"))[1:]}
    assert by_question == {"is there": "2", "what color": "3", "how many": "1", "does it": "1"}
    confusions = _cells(_section(page, "confusions"))[1:]
    assert confusions[0] == ["blue", "red", "2"] and len(confusions) == 4  # no -> yes, 2 -> 3, yes -> no
    worst = re.findall(r"<td class='example-id'>(r\d+)</td>", page)
    assert worst[:5] == ["r1", "r2", "r4", "r5", "r6"] and len(worst) == 7  # score 0 first, in record order
    thumbs = _thumbs(page)
    assert len(thumbs) == 7 and Image.open(io.BytesIO(thumbs[0])).size == (THUMB_PX, THUMB_PX)
    _stands_alone(page)


def test_grounding_boxes_drawn_iou_histogram_and_whole_image_baseline():
    pairs = [([0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 16.0, 16.0]),  # IoU 1
             ([0.0, 0.0, 16.0, 32.0], [0.0, 0.0, 16.0, 16.0]),  # 0.5
             ([16.0, 16.0, 32.0, 32.0], [0.0, 0.0, 16.0, 16.0]),  # 0
             ([0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 32.0, 24.0])]  # 1/12
    recs, metrics = _records("grounding", pairs)
    rows = {r["id"]: RowView("the shape", (32, 32), _png((255, 255, 255))) for r in recs}
    page = render_evaluation(TASKS["grounding"], recs, metrics, rows)

    base = sum(M.box_iou([0, 0, 32, 32], ref) >= 0.5 for _, ref in pairs) / len(pairs)  # the whole image
    head = {c[0]: c[1:] for c in _cells(_section(page, "headline"))[1:]}
    assert head["<b>acc50</b> (primary)"] == [f"{metrics['acc50']:.4f}", f"{base:.4f}"] and base == 0.25
    assert "the whole image&#x27;s box" in page
    hist = {c[0]: c[1] for c in _cells(_section(page, "iou-histogram"))[1:]}
    assert (hist["0.0-0.1"], hist["0.5-0.6"], hist["0.9-1.0"]) == ("2", "1", "1") and len(hist) == 10
    thumbs = _thumbs(page)
    assert len(thumbs) == 4 + 4  # the best (up to 6) and the worst (up to 12) of four rows
    best = Image.open(io.BytesIO(thumbs[0])).convert("RGB")  # r0: both boxes on the same place, red on top
    assert best.size == (THUMB_PX, THUMB_PX) and best.getpixel((0, 20)) == (220, 0, 0)
    assert best.getpixel((70, 70)) == (255, 255, 255)
    _stands_alone(page)


def test_caption_best_and_worst_by_cider_with_images():
    pytest.importorskip("pycocoevalcap")
    pairs = [("a red circle", ["a red circle", "a red round shape"]), ("a blue square", ["a green triangle"]),
             ("a green triangle", ["a green triangle", "a red circle"])]
    recs, metrics = _records("caption", pairs)
    rows = {r["id"]: RowView(None, None, _png()) for r in recs}
    page = render_evaluation(TASKS["caption"], recs, metrics, rows)

    refs = {str(i): ref for i, (_, ref) in enumerate(pairs)}
    base = M.caption_scores({i: "a red circle" for i in refs}, refs, metrics=("CIDEr",))["CIDEr"]
    head = {c[0]: c[1:] for c in _cells(_section(page, "headline"))[1:]}
    assert head["<b>cider</b> (primary)"] == [f"{metrics['cider']:.4f}", f"{base:.4f}"]
    best = re.findall(r"<td class='example-id'>(r\d+)</td>", _section(page, "best"))
    worst = re.findall(r"<td class='example-id'>(r\d+)</td>", _section(page, "worst-caption"))
    assert set(best) == set(worst) == {"r0", "r1", "r2"} and best[-1] == worst[0] == "r1"  # the wrong caption
    assert recs[1]["example_score"] < min(recs[0]["example_score"], recs[2]["example_score"])
    assert len(_thumbs(page)) == 3 + 3
    _stands_alone(page)


def test_classification_confusion_matrix_counts():
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] * 2 + [("no", "maybe"), (None, "no")]
    recs, metrics = _records("visual_entailment", pairs)
    recs[-1]["error"] = {"reason": "bad_image", "message": "x"}
    page = render_evaluation(TASKS["visual_entailment"], recs, metrics, {})

    cell = dict(((a, b), int(n)) for a, b, n in re.findall(r"data-ref='(\w+)' data-pred='([\w()]+)'>(\d+)<", page))
    assert cell[("yes", "yes")] == 3 and cell[("no", "yes")] == 2 and cell[("maybe", "no")] == 1
    assert cell[("no", "(error)")] == 1 and sum(cell.values()) == 7 and cell[("maybe", "maybe")] == 0
    base = M.accuracy(["yes"] * 7, [g for _, g in pairs])  # the majority label: "yes" and "no" 3 of 7, yes first
    head = {c[0]: c[1:] for c in _cells(_section(page, "headline"))[1:]}
    assert head["<b>accuracy</b> (primary)"] == [f"{metrics['accuracy']:.4f}", f"{base:.4f}"]
    assert "(error: bad_image)" in page and _thumbs(page) == [] and "always &#x27;yes&#x27;" in page
    _stands_alone(page)


def test_rows_read_again_hold_texts_and_only_the_shown_images(tmp_path):
    from pipelines.data.shards import write_corpus
    from tests.test_storage import make_row

    write_corpus([make_row(i, split="test", image=_png(size=(20 + i, 10))) for i in range(20)], str(tmp_path))
    recs, _ = _records("vqa", [("red" if i % 2 else "blue", ["red"] * 3) for i in range(20)])
    for i, r in enumerate(recs):
        r["id"] = f"ds/test/{i:03d}"
    views = read_report_rows(str(tmp_path), TASKS["vqa"], recs, split="test")
    assert [views[f"ds/test/{i:03d}"].text for i in range(20)] == [f"q{i:03d}" for i in range(20)]
    shown = {k for k, v in views.items() if v.image is not None}
    # the twelve worst: the ten wrong rows, then the first two right ones
    assert shown == {f"ds/test/{i:03d}" for i in [*range(0, 20, 2), 1, 3]}
    first = read_report_rows(str(tmp_path), TASKS["vqa"], recs[:1], split="test")
    assert list(first) == ["ds/test/000"]


def test_jobs_evaluate_writes_the_report_beside_the_predictions(micro_bundle, tmp_path, capsys):  # noqa: F811
    from jobs.evaluate import main
    from pipelines.data.shards import write_corpus
    from tests.test_evaluate_ray import easy_vqa_rows

    write_corpus(easy_vqa_rows(4), str(tmp_path / "corpus"))
    args = ["--model", str(micro_bundle), "--data", str(tmp_path / "corpus"), "--task", "vqa", "--mode",
            "allcand", "--candidates", "red,blue,green", "--output"]
    main([*args, str(tmp_path / "eval")])
    out = json.loads(capsys.readouterr().out)
    page = (tmp_path / "eval" / "report.html").read_text()
    assert out["report_uri"] == str(tmp_path / "eval" / "report.html")
    assert f"<td class='num'>{out['metrics']['vqa_score']:.4f}</td>" in page
    assert set(re.findall(r"<td class='example-id'>([\w/]+)</td>", page)) == {p["id"] for p in out["predictions"]}
    assert len(_thumbs(page)) == 4
    _stands_alone(page)
    main([*args, str(tmp_path / "quiet"), "--no-report"])
    assert json.loads(capsys.readouterr().out)["report_uri"] is None
    assert not (tmp_path / "quiet" / "report.html").exists()
