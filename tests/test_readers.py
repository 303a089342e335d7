"""Tests for pipelines.data.readers: OFA TSV layouts and WebDataset tars, good rows and BadRows, local and s3://."""

import base64
import io
import json
import struct
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ofa_model.preprocess import SUPPORTED_FORMATS, PreprocessConfig
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines import storage
from pipelines.data.readers.files import input_files
from pipelines.data.readers.ofa_tsv import (
    LAYOUTS,
    TSV_SUFFIXES,
    check_tsv_options,
    glue_label_words,
    image_from_base64,
    layout_task,
    read_ofa_tsv_file,
)
from pipelines.data.readers.rows import (
    READER_REASONS,
    BadInput,
    BadRow,
    check_box,
    clean_text,
    image_format,
    make_row,
)
from pipelines.data.readers.webdataset import (
    WDS_SUFFIXES,
    WDS_TASKS,
    read_webdataset_file,
    webdataset_sources,
)
from pipelines.data.schema import (
    BAD_REASONS,
    FIELDS,
    GLUE_LABEL_WORDS,
    IMAGE_FORMATS,
    NLI_LABEL_WORDS,
    normalize_row,
)
from pipelines.data.shards import iter_rows, write_corpus


def read_ofa_tsv(uri: str, layout: str, *, split: str, dataset: str | None = None):
    """Every file under `uri` read in order, one `read_ofa_tsv_file` each (as raw_convert's tasks read them)."""
    check_tsv_options(layout, split)
    for file in input_files(uri, TSV_SUFFIXES):
        yield from read_ofa_tsv_file(file, layout, split=split, dataset=dataset)


def read_webdataset(uri: str, *, task: str, split: str, key_map=None, dataset: str | None = None):
    """Every tar under `uri` read in order, one `read_webdataset_file` each."""
    webdataset_sources(task, split, key_map)
    for file in input_files(uri, WDS_SUFFIXES):
        yield from read_webdataset_file(file, task=task, split=split, key_map=key_map, dataset=dataset)


def f32(x: float) -> float:
    """x rounded to float32, as rows store it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def png(color: tuple[int, int, int], size: tuple[int, int] = (3, 2)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="JPEG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    """OFA's README encoding: standard base64."""
    return base64.b64encode(data).decode()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def special_png() -> bytes:
    """A real PNG whose standard base64 holds '+' or '/', so its urlsafe form differs."""
    for v in range(256):
        data = png((v, 255 - v, (7 * v) % 256))
        if set(b64(data)) & {"+", "/"}:
            return data
    raise AssertionError("no PNG with '+' or '/' in its base64")


def write_tsv(path, lines: list[str | bytes]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


def split_rows(items) -> tuple[list[dict], list[BadRow]]:
    items = list(items)
    rows = [i for i in items if isinstance(i, dict)]
    bad = [i for i in items if isinstance(i, BadRow)]
    assert len(rows) + len(bad) == len(items)
    return rows, bad


def reasons(bad: list[BadRow]) -> Counter:
    return Counter(b.reason for b in bad)


def canonical(**fields) -> dict:
    """The expected normalised row: every schema field, None where not given."""
    return normalize_row(fields)


# --- base64 -----------------------------------------------------------------------------------------------


def test_base64_standard_urlsafe_and_unpadded_decode_alike():
    data = special_png()
    std = b64(data)
    url = base64.urlsafe_b64encode(data).decode()
    assert std != url
    assert image_from_base64(std) == image_from_base64(url) == image_from_base64(url.rstrip("=")) == data
    with pytest.raises(BadInput, match="not base64") as bad:
        image_from_base64("@@@@")
    assert bad.value.reason == "bad_base64"
    with pytest.raises(BadInput, match="not an image") as bad:
        image_from_base64(b64(b"plain text, no image"))
    assert bad.value.reason == "bad_image"


# --- OFA TSV layouts --------------------------------------------------------------------------------------


def vqa_lines() -> list[str | bytes]:
    url_b64 = base64.urlsafe_b64encode(special_png()).decode()
    return [
        f"101\timg1\tWhat color is it?\t0.6|!+red&&1.0|!+blue&&0.3|!+green\tcar&&tree\t{b64(RED)}",
        f"102\timg2\tIs it round?\t1.0|!+no\t\t{url_b64}",
        "",  # blank lines are skipped, not counted
        f"103\timg3\tq?\t1.0|!+yes\tobj\t{b64(RED)}\textra",  # 7 columns
        f"104\timg4\tq?\t1.0|!+yes\t{b64(RED)}",  # 5 columns
        "105\timg5\tq?\t1.0|!+yes\tobj\t!!!not-base64!!!",
        f"106\timg6\tq?\tabc|!+yes\tobj\t{b64(RED)}",
        f"107\timg7\t   \t1.0|!+yes\tobj\t{b64(RED)}",
        f"108\timg8\tq?\tyes\tobj\t{b64(RED)}",
        f"109\timg9\tq?\t1.0|!+yes\tobj\t{b64(b'GIF? no: text')}",
        b"110\timg10\tq\xff?\t1.0|!+yes\tobj\t" + b64(RED).encode(),
        f"111\timg11\tq?\t\tobj\t{b64(RED)}",  # no answers outside the test split
    ]


def test_vqa_layout(tmp_path):
    path = write_tsv(tmp_path / "vqa.tsv", vqa_lines())
    rows, bad = split_rows(read_ofa_tsv(path, "vqa", split="train", dataset="vqav2"))
    assert rows == [
        canonical(
            id="vqav2/train/101", task="vqa", split="train", dataset="vqav2", image=RED, text="What color is it?",
            target="blue", targets=["red", "blue", "green"], target_weights=[0.6, 1.0, 0.3],
        ),
        canonical(
            id="vqav2/train/102", task="vqa", split="train", dataset="vqav2", image=special_png(), text="Is it round?",
            target="no", targets=["no"], target_weights=[1.0],
        ),
    ]  # fmt: skip
    assert rows[0]["target_weights"] == [f32(0.6), 1.0, f32(0.3)]
    assert reasons(bad) == Counter(
        {"extra_column": 1, "missing_column": 1, "bad_base64": 1, "bad_type": 1, "empty_text": 2, "bad_format": 1,
         "bad_image": 1, "bad_encoding": 1}
    )  # fmt: skip
    by_id = {b.id: b for b in bad}
    assert by_id["vqav2/train/105"].source == f"{path}:6"  # 1-based physical line numbers
    assert by_id["vqav2/train/106"].detail == "answers confidence is not a number: 'abc'"
    assert by_id["vqav2/train/111"].reason == "empty_text"
    assert {b.reason for b in bad} <= READER_REASONS


def test_vqa_test_split_allows_missing_answers(tmp_path):
    path = write_tsv(tmp_path / "vqa.tsv", [f"7\ti\tWhat?\t\tobj\t{b64(RED)}"])
    (row,) = read_ofa_tsv(path, "vqa", split="test")
    assert row == canonical(id="ofa-vqa/test/7", task="vqa", split="test", dataset="ofa-vqa", image=RED, text="What?")


def test_caption_layout(tmp_path):
    path = write_tsv(
        tmp_path / "caption.tsv",
        [
            f"1\t9001\ta dog runs\tdog&&grass\t{b64(RED)}",
            f"2\t9002\ta cat sits && a cat is sitting&&\t\t{b64(BLUE)}",
            f"3\t9003\t\tobj\t{b64(RED)}",
            f"\t9004\tno id\tobj\t{b64(RED)}",
        ],
    )
    rows, bad = split_rows(read_ofa_tsv(path, "caption", split="val", dataset="coco"))
    assert rows == [
        canonical(id="coco/val/1", task="caption", split="val", dataset="coco", image=RED, target="a dog runs",
                  targets=["a dog runs"]),
        canonical(id="coco/val/2", task="caption", split="val", dataset="coco", image=BLUE, target="a cat sits",
                  targets=["a cat sits", "a cat is sitting"]),
    ]  # fmt: skip
    assert [(b.id, b.reason) for b in bad] == [("coco/val/3", "empty_text"), (None, "empty_text")]


def test_refcoco_layout(tmp_path):
    lines = [
        f"5\t77\tthe red square on the left\t10,20,30.5,40\t{b64(RED)}",
        f"6\t77\tbox reversed\t30,20,10,40\t{b64(RED)}",
        f"7\t77\tthree numbers\t1,2,3\t{b64(RED)}",
        f"8\t77\tletters\ta,b,c,d\t{b64(RED)}",
        f"9\t77\tinfinite\t0,0,inf,1\t{b64(RED)}",
    ]
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "r.tsv", lines), "refcoco", split="train"))
    assert rows == [
        canonical(id="ofa-refcoco/train/5", task="grounding", split="train", dataset="ofa-refcoco", image=RED,
                  text="the red square on the left", box=[10, 20, 30.5, 40]),
    ]  # fmt: skip
    assert reasons(bad) == {"bad_box": 4}


def test_snli_ve_layout(tmp_path):
    lines = [
        f"1\t11\t{b64(RED)}\ta red image\ttwo dogs play\tentailment",
        f"2\t11\t{b64(RED)}\ta blue image\t\tcontradiction",
        f"3\t11\t{b64(BLUE)}\tsomething\tpremise\tneutral",
        f"4\t11\t{b64(BLUE)}\tsomething\tpremise\tmaybe",
    ]
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "s.tsv", lines), "snli_ve", split="train"))
    common = {"task": "visual_entailment", "split": "train", "dataset": "ofa-snli-ve"}
    assert rows == [
        canonical(id="ofa-snli-ve/train/1", image=RED, text="a red image", text2="two dogs play", target="yes", **common),
        canonical(id="ofa-snli-ve/train/2", image=RED, text="a blue image", target="no", **common),
        canonical(id="ofa-snli-ve/train/3", image=BLUE, text="something", text2="premise", target="maybe", **common),
    ]
    assert [(b.id, b.reason) for b in bad] == [("ofa-snli-ve/train/4", "unknown_label")]


def test_glue_sst2_layout(tmp_path):
    lines = ["it is a great movie\t1", "dull and long\t0", "\t0", "strange\t7", "only one column"]
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "sst2.tsv", lines), "glue_sst2", split="train"))
    common = {"task": "glue_sst2", "split": "train", "dataset": "glue-sst2"}
    assert rows == [
        canonical(id="glue-sst2/train/0", text="it is a great movie", target="positive", **common),
        canonical(id="glue-sst2/train/1", text="dull and long", target="negative", **common),
    ]
    assert [(b.id, b.reason) for b in bad] == [
        ("glue-sst2/train/2", "empty_text"), ("glue-sst2/train/3", "unknown_label"),
        ("glue-sst2/train/4", "missing_column"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("layout", "line", "text", "text2", "target"),
    [
        ("glue_cola", "gj04\tthe book was read\t1", "the book was read", None, "yes"),
        ("glue_mnli", "a man sleeps\ta person rests\t0\textra", "a man sleeps", "a person rests", "maybe"),
        ("glue_mnli", "a man sleeps\tnobody sleeps\t2", "a man sleeps", "nobody sleeps", "no"),
        ("glue_mrpc", "s one\ts two\t1", "s one", "s two", "yes"),
        ("glue_rte", "0\tpremise\thypothesis\tnot_entailment", "premise", "hypothesis", "no"),
        ("glue_qnli", "0\twho?\tit was me\tentailment", "who?", "it was me", "yes"),
        ("glue_qqp", "0\t1\t2\thow old?\twhat age?\t1", "how old?", "what age?", "yes"),
    ],
)
def test_glue_column_orders(tmp_path, layout, line, text, text2, target):
    (row,) = read_ofa_tsv(write_tsv(tmp_path / "g.tsv", [line]), layout, split="val")
    name = layout.removeprefix("glue_")
    assert row == canonical(
        id=f"glue-{name}/val/0", task=layout, split="val", dataset=f"glue-{name}", text=text, text2=text2, target=target
    )


def test_gigaword_layout_over_a_directory(tmp_path):
    (tmp_path / "giga").mkdir()
    write_tsv(tmp_path / "giga" / "a.tsv", ["australian shares closed higher\tshares up", "one column only"])
    (tmp_path / "giga" / "sub").mkdir()
    write_tsv(tmp_path / "giga" / "sub" / "b.tsv", ["the senate passed the bill\tbill passes", "", "   \tempty article"])
    (tmp_path / "giga" / "notes.txt").write_text("not a tsv\n")
    rows, bad = split_rows(read_ofa_tsv(str(tmp_path / "giga"), "gigaword", split="test"))
    common = {"task": "summarization", "split": "test", "dataset": "ofa-gigaword"}
    assert rows == [  # ids: the file's name below the directory + the line's index in that file alone
        canonical(id="ofa-gigaword/test/a/0", text="australian shares closed higher", target="shares up", **common),
        canonical(id="ofa-gigaword/test/sub/b/0", text="the senate passed the bill", target="bill passes", **common),
    ]
    assert [(b.id, b.reason, b.source) for b in bad] == [
        ("ofa-gigaword/test/a/1", "missing_column", f"{tmp_path}/giga/a.tsv:2"),
        ("ofa-gigaword/test/sub/b/1", "empty_text", f"{tmp_path}/giga/sub/b.tsv:3"),
    ]
    # a file read on its own (or by a parallel worker) gets the ids it gets in the directory listing
    files = input_files(f"file://{tmp_path}/giga/", TSV_SUFFIXES)
    assert [(f.name, f.uri) for f in files] == [("a.tsv", f"file://{tmp_path}/giga/a.tsv"),
                                                ("sub/b.tsv", f"file://{tmp_path}/giga/sub/b.tsv")]
    alone = list(read_ofa_tsv_file(files[1], "gigaword", split="test"))
    assert [r.id if isinstance(r, BadRow) else r["id"] for r in alone] == ["ofa-gigaword/test/sub/b/0",
                                                                             "ofa-gigaword/test/sub/b/1"]
    # a lone file keeps plain line numbers
    (row0, _) = read_ofa_tsv(f"{tmp_path}/giga/a.tsv", "gigaword", split="test")
    assert row0["id"] == "ofa-gigaword/test/0"


def test_imagenet_text_to_image_and_pretrain_layouts(tmp_path):
    (img,) = read_ofa_tsv(write_tsv(tmp_path / "i.tsv", [f"{b64(RED)}\t3\trugby ball"]), "imagenet", split="train")
    assert img == canonical(id="ofa-imagenet/train/0", task="image_classification", split="train", dataset="ofa-imagenet",
                            image=RED, target="rugby ball")  # fmt: skip
    t2i, bad = split_rows(
        read_ofa_tsv(write_tsv(tmp_path / "t.tsv", ["c1\t5 0 8191\ta red square", "c2\t1 x\tbad"]), "text_to_image",
                     split="train")
    )  # fmt: skip
    assert t2i == [canonical(id="ofa-text-to-image/train/c1", task="text_to_image", split="train",
                             dataset="ofa-text-to-image", text="a red square", codes=[5, 0, 8191])]  # fmt: skip
    assert reasons(bad) == {"bad_type": 1}
    lines = [
        f"p1\t{b64(RED)}\ta red square\t\t\t\tcoco\tcaption",
        f"p2\t{b64(RED)}\t\twhat color?\t0.9|!+red&&0.1|!+pink\t\tvqa\tqa",
        f"p3\t{b64(BLUE)}\tthe square\t\t1,1,2,3\t\trefcoco\tvisual_grounding",
        f"p4\t{b64(BLUE)}\tx\t\t\t\tcoco\tdetection",
    ]
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "p.tsv", lines), "pretrain_vl", split="train"))
    assert rows == [
        canonical(id="coco/train/p1", task="caption", split="train", dataset="coco", image=RED, target="a red square",
                  targets=["a red square"]),
        canonical(id="vqa/train/p2", task="vqa", split="train", dataset="vqa", image=RED, text="what color?",
                  target="red", targets=["red", "pink"], target_weights=[0.9, 0.1]),
        canonical(id="refcoco/train/p3", task="grounding", split="train", dataset="refcoco", image=BLUE,
                  text="the square", box=[1, 1, 2, 3]),
    ]  # fmt: skip
    assert [(b.id, b.reason) for b in bad] == [("coco/train/p4", "unknown_label")]


CODES = list(range(0, 8192, 32))  # 256 codes, the 16 x 16 of an image's centre, 0 and 8160 among them


def test_pretrain_text_image_and_detection_layouts(tmp_path):
    lines = ["t1\t  The Quick  brown fox ", "t2\t   ", "t3"]
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "t.tsv", lines), "pretrain_text", split="train"))
    assert rows == [canonical(id="ofa-pretrain-text/train/t1", task="text_infilling", split="train",
                              dataset="ofa-pretrain-text", text="The Quick brown fox")]  # fmt: skip
    assert [(b.id, b.reason) for b in bad] == [("ofa-pretrain-text/train/t2", "empty_text"),
                                               ("ofa-pretrain-text/train/t3", "missing_column")]

    codes = " ".join(map(str, CODES))
    lines = [f"i1\t{b64(RED)}\t{codes}",
             f"i2\t{b64(RED)}\t{codes.replace(' 32 ', ' 3x2 ')}",  # not an integer
             f"i3\t{b64(RED)}\t{codes} 8192",  # out of [0, 8192) (and 257 codes: the range is checked first)
             f"i4\t{b64(RED)}\t{codes.replace('0 ', '-1 ', 1)}",  # negative
             f"i5\t{b64(RED)}\t{codes.rsplit(' ', 1)[0]}",  # 255 codes
             f"i6\t{b64(RED)}\t ",  # no codes
             f"i7\t{b64(b'not an image')}\t{codes}"]  # fmt: skip
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "i.tsv", lines), "pretrain_image", split="train"))
    assert rows == [canonical(id="ofa-pretrain-image/train/i1", task="image_infilling", split="train",
                              dataset="ofa-pretrain-image", image=RED, codes=CODES)]  # fmt: skip
    assert [(b.id.rsplit("/", 1)[1], b.reason) for b in bad] == [
        ("i2", "bad_type"), ("i3", "bad_type"), ("i4", "bad_type"), ("i5", "bad_format"), ("i6", "bad_format"),
        ("i7", "bad_image")]  # fmt: skip
    rows, bad = split_rows(read_ofa_tsv(str(tmp_path / "i.tsv"), "pretrain_image", split="test"))
    assert [(r["id"], r["codes"]) for r in rows] == [("ofa-pretrain-image/test/i1", CODES),
                                                     ("ofa-pretrain-image/test/i6", None)]  # test: codes optional
    assert len(bad) == 5

    lines = [f"d1\t{b64(BLUE)}\t1,2,5,6,3,cat&&0.5,0,2,1.5,10,traffic light, red",  # a label with a comma
             f"d2\t{b64(BLUE)}\t1,2,5,6,3,cat&&5,2,1,6,3,dog",  # x1 < x0
             f"d3\t{b64(BLUE)}\tx,2,5,6,3,cat",  # not a number
             f"d4\t{b64(BLUE)}\t1,2,5,6,cat",  # 5 fields
             f"d5\t{b64(BLUE)}\t1,2,5,6,3,cat&&",  # an empty second object
             f"d6\t{b64(BLUE)}\t1,2,5,6,c3,cat",  # category id not an integer
             f"d7\t{b64(BLUE)}\t1,2,5,6,3, ",  # no category
             f"d8\t{b64(BLUE)}\t   ",  # no objects
             f"d9\t{b64(BLUE)}"]  # fmt: skip
    rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / "d.tsv", lines), "pretrain_detection", split="train"))
    assert rows == [canonical(id="ofa-pretrain-detection/train/d1", task="detection", split="train",
                              dataset="ofa-pretrain-detection", image=BLUE, object_boxes=[[1, 2, 5, 6], [0.5, 0, 2, 1.5]],
                              object_labels=["cat", "traffic light, red"])]  # fmt: skip
    assert [(b.id.rsplit("/", 1)[1], b.reason) for b in bad] == [
        ("d2", "bad_box"), ("d3", "bad_box"), ("d4", "bad_format"), ("d5", "bad_format"), ("d6", "bad_type"),
        ("d7", "empty_text"), ("d8", "empty_text"), ("d9", "missing_column")]  # fmt: skip
    assert [layout_task(x) for x in ("pretrain_text", "pretrain_image", "pretrain_detection")] == [
        "text_infilling", "image_infilling", "detection"]


def test_pretraining_family_rows_build_their_examples(tmp_path):
    """Each family's row becomes its task's sample: targets checked against tokens written out by hand."""
    vocab = Vocabulary.gpt2()
    pcfg = PreprocessConfig(patch_image_size=64, max_image_size=64)  # scale 1: bins are x / width * 999
    image = png((0, 0, 255), size=(8, 8))
    lines = {"pretrain_text": "t1\tThe quick brown fox jumps over the lazy dog again and again",
             "pretrain_image": f"i1\t{b64(image)}\t{' '.join(map(str, CODES))}",
             "pretrain_detection": f"d1\t{b64(image)}\t1,2,5,6,3,cat&&0,0,8,8,9,Blue Box"}  # fmt: skip
    rows = {}
    for layout, line in lines.items():
        (rows[layout],) = read_ofa_tsv(write_tsv(tmp_path / f"{layout}.tsv", [line]), layout, split="train")

    det = build_example(TASKS["detection"], rows["pretrain_detection"], vocab, pcfg)
    # bins of (1, 2, 5, 6) in an 8 x 8 image: round(999 * (1/8, 2/8, 5/8, 6/8)) = 125, 250, 624, 749
    assert [vocab.id_to_token(t) for t in det["target"]] == [
        "<bin_125>", "<bin_250>", "<bin_624>", "<bin_749>", "\u0120cat",
        "<bin_0>", "<bin_0>", "<bin_999>", "<bin_999>", "\u0120blue", "\u0120box", "</s>"]  # fmt: skip
    assert vocab.decode(det["source"]) == " what are the objects in the image?"

    fill = build_example(TASKS["image_infilling"], rows["pretrain_image"], vocab, pcfg)
    assert [vocab.id_to_token(t) for t in fill["target"]] == [f"<code_{c}>" for c in CODES] + ["</s>"]
    assert fill["code_mask"] is True and vocab.decode(fill["source"]) == " what is the image in the middle part?"
    centre = fill["image"][:, 16:48, 16:48]  # (3, 32, 32): the blanked centre of the 64 x 64 input
    assert float(centre.abs().max()) == 0.0 and float(fill["image"].abs().max()) > 0

    spec, row = TASKS["text_infilling"], rows["pretrain_text"]
    words = "the quick brown fox jumps over the lazy dog again and again"
    samples = [build_example(spec, row, vocab, pcfg, train=True, rng=np.random.default_rng([0, epoch, 0]))
               for epoch in (0, 1)]  # the masks of two epochs of one row (ingest's per-row seed)
    for sample in samples:
        assert sample["target"] == vocab.encode(" " + words) + [vocab.eos_id]
        src = sample["source"]
        assert vocab.mask_id in src and vocab.decode(src).startswith(' what is the complete text of "')
    assert samples[0]["source"] != samples[1]["source"]  # drawn per epoch, not frozen in the row


# One good line per layout -> the task(s) its rows must carry.
GOOD_LINES = {
    "caption": ([f"1\t9001\ta dog\tobj\t{b64(RED)}"], {"caption"}),
    "vqa": ([f"7\ti\tWhat?\t1.0|!+yes\tobj\t{b64(RED)}"], {"vqa"}),
    "refcoco": ([f"5\t77\tthe red one\t1,2,3,4\t{b64(RED)}"], {"grounding"}),
    "snli_ve": ([f"{n}\t11\t{b64(RED)}\thyp\tprem\t{w}" for n, w in enumerate(NLI_LABEL_WORDS)],
                {"visual_entailment"}),
    "imagenet": ([f"{b64(RED)}\t3\trugby ball"], {"image_classification"}),
    "gigaword": (["an article\ta summary"], {"summarization"}),
    "text_to_image": (["c1\t5 0 8191\ta red square"], {"text_to_image"}),
    "pretrain_text": (["t1\ta red square"], {"text_infilling"}),
    "pretrain_image": ([f"i1\t{b64(RED)}\t{' '.join(map(str, CODES))}"], {"image_infilling"}),
    "pretrain_detection": ([f"d1\t{b64(RED)}\t0,0,2,1,1,square"], {"detection"}),
    "pretrain_vl": ([f"p1\t{b64(RED)}\ta red square\t\t\t\tcoco\tcaption",
                     f"p2\t{b64(RED)}\t\twhat color?\t0.9|!+red\t\tvqa\tqa",
                     f"p3\t{b64(BLUE)}\tthe square\t\t1,1,2,3\t\trefcoco\tvisual_grounding"],
                    {"caption", "vqa", "grounding"}),
    "glue_cola": (["gj04\tthe book\t1", "gj04\tbook the\t0"], {"glue_cola"}),
    "glue_sst2": (["fine\t1", "dull\t0"], {"glue_sst2"}),
    "glue_mnli": ([f"a\tb\t{v}" for v in ("0", "1", "2", *NLI_LABEL_WORDS)], {"glue_mnli"}),
    "glue_rte": (["0\tp\th\tentailment", "1\tp\th\tnot_entailment"], {"glue_rte"}),
    "glue_mrpc": (["a\tb\t1", "a\tb\t0"], {"glue_mrpc"}),
    "glue_qqp": (["0\t1\t2\ta?\tb?\t1", "0\t1\t2\ta?\tb?\t0"], {"glue_qqp"}),
    "glue_qnli": (["0\tq?\ts\tentailment", "1\tq?\ts\t0", "2\tq?\ts\t1"], {"glue_qnli"}),
}


def assert_model_row(row: dict) -> None:
    """The row's task is a model task, and a label target is one of that task's label words."""
    assert row["task"] in TASKS, row["task"]
    spec = TASKS[row["task"]]
    if spec.target_kind == "label" and spec.labels:
        assert row["target"] in spec.labels, (row["task"], row["target"])


def test_every_emitted_task_is_a_model_task(tmp_path):
    assert set(GOOD_LINES) == set(LAYOUTS)  # a new layout needs a line here
    for layout, (lines, tasks) in GOOD_LINES.items():
        rows, bad = split_rows(read_ofa_tsv(write_tsv(tmp_path / f"{layout}.tsv", lines), layout, split="train"))
        assert not bad and len(rows) == len(lines), (layout, bad)
        assert {r["task"] for r in rows} == tasks
        assert layout_task(layout) == (None if len(tasks) > 1 else next(iter(tasks)))
        for row in rows:
            assert_model_row(row)
    members = [("k.png", RED), ("k.txt", b"a caption"),
               ("k.json", js({"question": "q?", "answers": ["yes"], "text": "the red one", "box": [0, 0, 2, 1]}))]
    tar = write_tar(tmp_path / "all.tar", members)
    for task in WDS_TASKS:
        (row,) = read_webdataset(tar, task=task, split="train")
        assert row["task"] == task and task in TASKS


def test_label_words_are_the_task_labels(tmp_path):
    assert set(NLI_LABEL_WORDS.values()) == set(TASKS["visual_entailment"].labels) == {"yes", "no", "maybe"}
    for name, public in GLUE_LABEL_WORDS.items():
        words = glue_label_words(name)
        assert set(words.values()) == set(TASKS[f"glue_{name}"].labels), name
        assert public.items() <= words.items()  # public GLUE labels read the same as in the converter
    # OFA's MNLI TSV codes: 0 neutral, 1 entailment, 2 contradiction -- the same words as the public labels
    assert glue_label_words("mnli") == {"0": "maybe", "1": "yes", "2": "no", "neutral": "maybe",
                                        "entailment": "yes", "contradiction": "no"}
    lines = ["a\tb\t0", "a\tb\tneutral", "a\tb\t1", "a\tb\tentailment", "a\tb\t2", "a\tb\tcontradiction"]
    rows = list(read_ofa_tsv(write_tsv(tmp_path / "m.tsv", lines), "glue_mnli", split="train"))
    assert [r["target"] for r in rows] == ["maybe", "maybe", "yes", "yes", "no", "no"]


def test_bad_reasons_are_one_vocabulary():
    assert len(set(BAD_REASONS)) == len(BAD_REASONS)
    assert READER_REASONS <= set(BAD_REASONS)
    assert {"bad_columns", "no_captions", "unknown_annotation"}.isdisjoint(BAD_REASONS)  # merged synonyms
    with pytest.raises(ValueError, match="'bad_columns' is not one of"):
        BadRow("x/train/0", "bad_columns", "detail", "f.tsv:1")
    with pytest.raises(ValueError, match="'typo' is not one of"):
        BadInput("typo", "detail")
    bad = BadInput("bad_box", "box is reversed").bad_row("x/train/0", "f.tsv:1")
    assert bad == BadRow("x/train/0", "bad_box", "box is reversed", "f.tsv:1")


def test_shared_helpers():
    assert IMAGE_FORMATS == SUPPORTED_FORMATS  # what the model decodes
    assert image_format(RED) == "PNG" and image_format(jpeg((1, 2, 3))) == "JPEG"
    assert image_format(b"plain text") is None and image_format(RED[:12]) is None and image_format(b"") is None
    assert clean_text("  a  red\tsquare \n") == "a red square"
    assert check_box(["1", "2", "3.5", "4"], "box") == [1.0, 2.0, 3.5, 4.0]
    for box in ([1, 2, 1, 4], [1, 2, 3, 2], [0, 0, float("nan"), 1], [0, 0, 1], [True, 0, 1, 1]):
        with pytest.raises(BadInput) as info:
            check_box(box, "box")
        assert info.value.reason == "bad_box"
    row = make_row("f:1", id="x/train/0", task="text_to_image", split="train", text="t", codes=[1, 2])
    assert row == canonical(id="x/train/0", task="text_to_image", split="train", text="t", codes=[1, 2])
    bad = make_row("f:2", id="x/train/1", task="text_to_image", split="train", text="t", codes=[2**40])
    assert isinstance(bad, BadRow) and (bad.id, bad.reason, bad.source) == ("x/train/1", "bad_type", "f:2")
    with pytest.raises(KeyError, match="not canonical schema fields"):
        make_row("f:3", id="x", task="caption", split="train", caption="oops")


def test_unknown_layout_and_missing_input_raise(tmp_path):
    with pytest.raises(ValueError, match="unknown OFA TSV layout 'coco'"):
        next(read_ofa_tsv(str(tmp_path), "coco", split="train"))
    with pytest.raises(FileNotFoundError, match="no .tsv files"):
        next(read_ofa_tsv(str(tmp_path), "vqa", split="train"))
    assert {"caption", "vqa", "refcoco", "snli_ve", "glue_sst2", "gigaword", "pretrain_vl"} <= set(LAYOUTS)


def test_unreadable_file_gives_one_bad_row_and_reading_goes_on(tmp_path):
    d = tmp_path / "tsvs"
    d.mkdir()
    write_tsv(d / "a.tsv", ["first article\tsummary one", "second article\tsummary two"])
    write_tsv(d / "b.tsv", ["gone\tgone"])
    write_tsv(d / "c.tsv", ["third article\tsummary three"])
    items = read_ofa_tsv(str(d), "gigaword", split="train")
    first = next(items)  # the file list is taken now
    (d / "b.tsv").unlink()  # ... and b.tsv disappears before it is read
    rows, bad = split_rows([first, *items])
    assert [r["text"] for r in rows] == ["first article", "second article", "third article"]
    assert [(b.id, b.reason, b.source) for b in bad] == [(None, "unreadable_shard", f"{d}/b.tsv")]
    assert "b.tsv" in bad[0].detail


def test_tsv_rows_write_to_a_corpus(tmp_path):
    path = write_tsv(tmp_path / "vqa.tsv", vqa_lines())
    rows, _ = split_rows(read_ofa_tsv(path, "vqa", split="train"))
    write_corpus(rows, str(tmp_path / "corpus"))
    assert sorted(iter_rows(str(tmp_path / "corpus")), key=lambda r: r["id"]) == rows
    assert all(set(r) == set(FIELDS) for r in rows)


# --- WebDataset -------------------------------------------------------------------------------------------


def write_tar(path, members: list[tuple[str, bytes]], mode: str = "w") -> str:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def test_webdataset_caption(tmp_path):
    red_jpg = jpeg((255, 0, 0))
    path = write_tar(
        tmp_path / "cap-000.tar",
        [
            ("s/k0.png", RED), ("s/k0.txt", b"  a red square\n"),
            ("s/k1.jpg", red_jpg), ("s/k1.json", js({"captions": ["one", "two"]})),
            ("s/k2.txt", b"no image here"),
            ("s/k3.png", b"not really a png"), ("s/k3.txt", b"x"),
            ("s/k4.png", BLUE), ("s/k4.txt", b"   "),
            ("s/k5.png", BLUE), ("s/k5.jpg", red_jpg), ("s/k5.txt", b"two images"),
            ("s/k6.png", BLUE), ("s/k6.txt", b"caption\xff"),
        ],
    )  # fmt: skip
    rows, bad = split_rows(read_webdataset(path, task="caption", split="train", dataset="toy"))
    assert rows == [
        canonical(id="toy/train/s/k0", task="caption", split="train", dataset="toy", image=RED, target="a red square",
                  targets=["a red square"]),
        canonical(id="toy/train/s/k1", task="caption", split="train", dataset="toy", image=red_jpg, target="one",
                  targets=["one", "two"]),
    ]  # fmt: skip
    assert [(b.id, b.reason) for b in bad] == [
        ("toy/train/s/k2", "missing_member"), ("toy/train/s/k3", "bad_image"), ("toy/train/s/k4", "empty_text"),
        ("toy/train/s/k5", "bad_format"), ("toy/train/s/k6", "bad_encoding"),
    ]  # fmt: skip
    assert bad[0].source == f"{path}:s/k2"


def test_webdataset_vqa_and_grounding(tmp_path):
    path = write_tar(
        tmp_path / "vqa.tar.gz",
        [
            ("q0.png", RED), ("q0.json", js({"question": "what color?", "answers": ["red", "red", "blue"]})),
            ("q1.png", RED), ("q1.json", js({"question": "is it red?", "answer": "yes"})),
            ("q2.png", RED), ("q2.json", js({"question": "w?", "answers": [{"answer": "a", "weight": 0.2},
                                                                        {"answer": "b", "confidence": 0.7}]})),
            ("q3.png", RED), ("q3.json", b"{not json"),
            ("q4.png", RED), ("q4.json", js({"answers": ["x"]})),
            ("q5.png", RED), ("q5.json", js({"question": "w?", "answers": {"yes": 0.4, "no": 0.6}})),
        ],
        mode="w:gz",
    )  # fmt: skip
    rows, bad = split_rows(read_webdataset(path, task="vqa", split="val"))
    common = {"task": "vqa", "split": "val", "dataset": "webdataset", "image": RED}
    assert rows == [
        canonical(id="webdataset/val/q0", text="what color?", target="red", targets=["red", "blue"],
                  target_weights=[2 / 3, 1 / 3], **common),
        canonical(id="webdataset/val/q1", text="is it red?", target="yes", targets=["yes"], target_weights=[1.0],
                  **common),
        canonical(id="webdataset/val/q2", text="w?", target="b", targets=["a", "b"], target_weights=[0.2, 0.7],
                  **common),
        canonical(id="webdataset/val/q5", text="w?", target="no", targets=["yes", "no"], target_weights=[0.4, 0.6],
                  **common),
    ]  # fmt: skip
    assert rows[0]["target_weights"] == [f32(2 / 3), f32(1 / 3)]
    assert [(b.id, b.reason) for b in bad] == [("webdataset/val/q3", "bad_json"), ("webdataset/val/q4", "missing_field")]

    path = write_tar(
        tmp_path / "ground.tar",
        [
            ("g0.png", BLUE), ("g0.json", js({"expr": "the blue one", "bbox": [1, 2, 3.5, 4]})),
            ("g1.png", BLUE), ("g1.json", js({"expr": "reversed", "bbox": [3, 2, 1, 4]})),
            ("g2.png", BLUE), ("g2.json", js({"expr": "short", "bbox": [1, 2, 3]})),
        ],
    )  # fmt: skip
    rows, bad = split_rows(
        read_webdataset(path, task="grounding", split="train", key_map={"text": "json:expr", "box": "json:bbox"})
    )
    assert rows == [canonical(id="webdataset/train/g0", task="grounding", split="train", dataset="webdataset",
                              image=BLUE, text="the blue one", box=[1, 2, 3.5, 4])]  # fmt: skip
    assert reasons(bad) == {"bad_box": 2}
    with pytest.raises(ValueError, match="key_map role 'caption'"):
        next(read_webdataset(path, task="grounding", split="train", key_map={"caption": "txt"}))
    with pytest.raises(ValueError, match="unsupported WebDataset task"):
        next(read_webdataset(path, task="detection", split="train"))


def test_webdataset_unreadable_and_truncated_tars(tmp_path):
    d = tmp_path / "wds"
    d.mkdir()
    members = [(f"k{i}.{ext}", RED if ext == "png" else f"caption {i}".encode()) for i in range(3) for ext in ("png", "txt")]
    full = write_tar(d / "a.tar", members)
    data = open(full, "rb").read()
    (d / "b.tar").write_bytes(data[: 512 * 5 + 10])  # cut inside the second sample's image data
    (d / "c.tar").write_bytes(b"this is not a tar file at all" * 40)
    rows, bad = split_rows(read_webdataset(str(d), task="caption", split="train"))
    assert [r["id"] for r in rows] == ["webdataset/train/k0", "webdataset/train/k1", "webdataset/train/k2",
                                       "webdataset/train/k0"]  # fmt: skip
    assert [(b.reason, b.source) for b in bad] == [("unreadable_shard", f"{d}/b.tar"), ("unreadable_shard", f"{d}/c.tar")]


# --- the same through s3:// -------------------------------------------------------------------------------


def test_readers_on_s3(s3_server, tmp_path):
    prefix = s3_server.uri("readers")
    local_tsv = write_tsv(tmp_path / "vqa.tsv", vqa_lines())
    tsv_uri = storage.join(prefix, "tsv", "part-0.tsv")
    storage.write_bytes(tsv_uri, open(local_tsv, "rb").read())
    local_tar = write_tar(tmp_path / "w.tar", [("k0.png", RED), ("k0.txt", b"red"), ("k1.png", BLUE), ("k1.txt", b"")])
    tar_uri = storage.join(prefix, "wds", "w-000.tar")
    storage.write_bytes(tar_uri, open(local_tar, "rb").read())

    s3_rows, s3_bad = split_rows(read_ofa_tsv(storage.join(prefix, "tsv"), "vqa", split="train"))
    local_rows, local_bad = split_rows(read_ofa_tsv(local_tsv, "vqa", split="train"))
    assert s3_rows == local_rows and len(s3_rows) == 2
    assert [(b.id, b.reason) for b in s3_bad] == [(b.id, b.reason) for b in local_bad]
    assert s3_bad[0].source.startswith(tsv_uri + ":")

    rows, bad = split_rows(read_webdataset(storage.join(prefix, "wds"), task="caption", split="train"))
    assert rows == [canonical(id="webdataset/train/k0", task="caption", split="train", dataset="webdataset",
                              image=RED, target="red", targets=["red"])]  # fmt: skip
    assert [(b.id, b.reason, b.source) for b in bad] == [("webdataset/train/k1", "empty_text", f"{tar_uri}:k1")]
