"""OFA TSV and WebDataset input from the command line: `jobs.prepare_data ofa-tsv|webdataset` (a parallel
conversion on Ray, `pipelines.data.raw_convert`) and the dataset doctor on raw input (`jobs.inspect_data`).

Every check runs the CLI entry (`main(argv)`, one through a subprocess) on small files made here, on the
session's local Ray cluster and SeaweedFS S3 server, and asserts exact good and bad counts by reason.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from jobs import inspect_data, prepare_data
from pipelines import storage
from pipelines.data.readers.files import input_files
from pipelines.data.readers.ofa_tsv import TSV_SUFFIXES, read_ofa_tsv_file
from pipelines.data.shards import iter_rows, read_manifest, write_corpus

RAY_TIMEOUT = 120


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), color)
    img.putpixel((size // 2, size // 2), (255 - color[0], 255 - color[1], 255 - color[2]))
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vqa(qid: int, question: str = "what color is it?", answers: str = "1.0|!+red", image: bytes | None = None) -> str:
    return f"{qid}\timg{qid}\t{question}\t{answers}\tobj\t{b64(image or png((qid * 20 % 256, 40, 90)))}"


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def upload(local_dir: Path, prefix: str) -> None:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(prefix, path.relative_to(local_dir).as_posix()), path.read_bytes())


# --- fixtures: a directory of VQA TSVs and one of WebDataset tars, with known bad lines ------------------

TRUNCATED_PNG = png((1, 2, 3))[: len(png((1, 2, 3))) // 2]  # the reader accepts its header; the pipeline does not
TSV_OK = 7
TSV_BAD = {"missing_column": 1, "bad_base64": 1, "empty_text": 1, "bad_format": 1, "extra_column": 1,
           "bad_image": 1, "bad_encoding": 1}


def make_tsv_dir(root: Path) -> Path:
    d = root / "vqa_tsv"
    write_lines(d / "a.tsv", [vqa(1), vqa(2, "is it red?", "0.6|!+yes&&0.4|!+no"), vqa(3),
                              f"4\timg4\tq?\t1.0|!+yes\t{b64(png((0, 0, 9)))}",  # 5 columns: missing_column
                              "5\timg5\tq?\t1.0|!+yes\tobj\t@@not base64@@"])  # bad_base64
    write_lines(d / "b.tsv", [vqa(6), "", vqa(7, "   "),  # empty_text (the blank line is skipped)
                              vqa(8, answers="yes"), vqa(9)])  # bad_format
    write_lines(d / "sub" / "c.tsv", [vqa(10), vqa(11) + "\textra",  # extra_column
                                      f"12\timg12\tq?\t1.0|!+no\tobj\t{b64(b'GIF? no, text')}",  # bad_image
                                      vqa(13).encode().replace(b"what", b"wh\xffat"),  # bad_encoding
                                      vqa(14)])
    (d / "README.txt").write_text("not a tsv\n")
    return d


WDS_OK = 3
WDS_BAD = {"missing_member": 1, "bad_image": 1, "empty_text": 1, "unreadable_shard": 1}


def make_wds_dir(root: Path) -> Path:
    d = root / "wds"
    write_tar(d / "w-000.tar", [("k0.png", png((200, 0, 0))), ("k0.txt", b"a red square"),
                                ("k1.png", png((0, 200, 0))), ("k1.json", json.dumps({"captions": ["one", "two"]}).encode()),
                                ("k2.txt", b"no image here"),  # missing_member
                                ("k3.png", b"not really a png"), ("k3.txt", b"x")])  # bad_image
    write_tar(d / "w-001.tar", [("k4.png", png((0, 0, 200))), ("k4.txt", b"a blue square"),
                                ("k5.png", png((9, 9, 9))), ("k5.txt", b"   ")])  # empty_text
    (d / "w-002.tar").write_bytes(b"this is not a tar file at all" * 40)  # unreadable_shard
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    make_tsv_dir(root)
    make_wds_dir(root)
    return root


def run_prepare(capsys, *argv: str) -> tuple[int, dict | None, str]:
    try:
        prepare_data.main(list(argv))
        rc = 0
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def ids(uri: str) -> list[str]:
    return sorted(r["id"] for r in iter_rows(uri, columns=["id"]))


# --- prepare_data ofa-tsv / webdataset ---------------------------------------------------------------------


@pytest.mark.timeout(RAY_TIMEOUT)
def test_tsv_directory_converts_in_parallel_with_exact_counts(data, tmp_path, capsys, caplog, ray_cluster):
    caplog.set_level(logging.INFO, logger="pipelines.data.raw_convert")
    tsv = str(data / "vqa_tsv")
    rc, summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", tsv, "--split", "train",
                                 "--output", str(tmp_path / "c3"), "--concurrency", "3", "--log-every-s", "0")
    assert rc == 0
    assert summary["files"] == 3 and summary["records"] == TSV_OK + sum(TSV_BAD.values())
    assert summary["rows_ok"] == TSV_OK and summary["rows_bad"] == dict(sorted(TSV_BAD.items()))
    assert summary["bad_examples"]["bad_format"] == ["ofa-vqa/train/8"]
    assert summary["counts"] == {"train": {"vqa": TSV_OK}} and summary["num_shards"] == 3
    progress = [r.getMessage() for r in caplog.records if "files (" in r.getMessage()]
    assert len(progress) == 3 and progress[-1].startswith("ofa-tsv: 3/3 files (100%), 7 rows ok, 7 bad")
    assert all("rows/s" in p and "ETA" in p for p in progress)

    # the merged manifest: every part's shard, counts, the conversion's counts; no part manifests left
    manifest = read_manifest(str(tmp_path / "c3"))
    assert [s["path"] for s in manifest.shards] == [f"part-0000{k}/train-vqa-00000.parquet" for k in range(3)]
    assert manifest.num_rows == TSV_OK and manifest.counts == {"train": {"vqa": TSV_OK}}
    assert manifest.conversion["rows_bad"] == summary["rows_bad"] and manifest.conversion["rows_ok"] == TSV_OK
    assert manifest.conversion["layout"] == "vqa" and manifest.conversion["files"] == 3
    assert [p for p in storage.list_files(str(tmp_path / "c3")) if p.endswith("manifest.json")] == [
        str(tmp_path / "c3" / "manifest.json")]
    assert ids(str(tmp_path / "c3")) == sorted(f"ofa-vqa/train/{i}" for i in (1, 2, 3, 6, 9, 10, 14))

    # the fingerprint is the one a single ShardWriter computes for the same rows
    rows = [r for f in input_files(tsv, TSV_SUFFIXES) for r in read_ofa_tsv_file(f, "vqa", split="train")
            if isinstance(r, dict)]
    assert write_corpus(rows, str(tmp_path / "single")).fingerprint == manifest.fingerprint

    # one file at a time: the same rows, ids, shards and fingerprint
    rc, one, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", tsv, "--split", "train",
                             "--output", str(tmp_path / "c1"), "--concurrency", "1")
    assert rc == 0 and one["fingerprint"] == summary["fingerprint"] and one["rows_bad"] == summary["rows_bad"]
    assert list(iter_rows(str(tmp_path / "c1"))) == list(iter_rows(str(tmp_path / "c3")))


@pytest.mark.timeout(RAY_TIMEOUT)
def test_ids_without_an_id_column_name_the_file_and_do_not_depend_on_parallelism(tmp_path, capsys, ray_cluster):
    d = tmp_path / "giga"
    write_lines(d / "a.tsv", ["australian shares closed higher\tshares up", "one column only", "dull\tdull"])
    write_lines(d / "more" / "b.tsv", ["the senate passed the bill\tbill passes", "", "   \tempty article"])
    write_lines(d / "c.tsv", ["x\ty"])
    outputs = []
    for n in ("1", "3"):
        out = str(tmp_path / f"out{n}")
        rc, summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "gigaword", "--input", str(d), "--split", "train",
                                     "--output", out, "--concurrency", n, "--dataset", "giga")
        assert rc == 0 and summary["rows_bad"] == {"empty_text": 1, "missing_column": 1}
        assert summary["bad_examples"] == {"empty_text": ["giga/train/more/b/1"], "missing_column": ["giga/train/a/1"]}
        outputs.append((ids(out), summary["fingerprint"]))
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == ["giga/train/a/0", "giga/train/a/2", "giga/train/c/0", "giga/train/more/b/0"]


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_large_file_converts_in_byte_ranges_to_the_same_corpus(data, tmp_path, capsys, ray_cluster):
    """--range-mb cuts each TSV file into ranges aligned to line starts, a task each: the same rows, ids (the
    files' line numbering included), bad rows and fingerprint as one task per file."""
    tsv = str(data / "vqa_tsv")
    common = ["--layout", "vqa", "--input", tsv, "--split", "train", "--concurrency", "3"]
    rc, whole, _ = run_prepare(capsys, "ofa-tsv", *common, "--output", str(tmp_path / "whole"))
    assert rc == 0 and whole["parts"] == 3
    rc, ranged, _ = run_prepare(capsys, "ofa-tsv", *common, "--output", str(tmp_path / "ranged"),
                                "--range-mb", str(300 / 2**20))  # ~300 bytes: about a line per range
    assert rc == 0 and ranged["parts"] > 3 and ranged["files"] == 3 and ranged["files_read"] == 3
    for key in ("records", "rows_ok", "rows_bad", "bad_examples", "counts", "fingerprint"):
        assert ranged[key] == whole[key], key
    assert list(iter_rows(str(tmp_path / "ranged"))) == list(iter_rows(str(tmp_path / "whole")))

    # layouts without an id column number the non-blank lines of the file: the ranges count the lines before them
    d = tmp_path / "giga"
    write_lines(d / "a.tsv", [f"article number {i} about shares\tsummary {i}" for i in range(40)] + [""] +
                ["one column only", "last article\tlast"])
    outs = []
    for name, extra in (("g-whole", []), ("g-ranged", ["--range-mb", str(200 / 2**20)])):
        rc, summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "gigaword", "--input", str(d), "--split",
                                     "train", "--output", str(tmp_path / name), *extra)
        assert rc == 0 and summary["rows_ok"] == 41 and summary["rows_bad"] == {"missing_column": 1}
        outs.append((summary["parts"], ids(str(tmp_path / name)), summary["fingerprint"],
                     summary["bad_examples"]))
    assert outs[0][0] == 1 and outs[1][0] > 5
    assert outs[1][1:] == outs[0][1:]
    assert "ofa-gigaword/train/a/41" in outs[0][1] and "ofa-gigaword/train/a/40" not in outs[0][1]  # bad


@pytest.mark.timeout(RAY_TIMEOUT + 60)
def test_a_killed_conversion_resumes_to_the_clean_runs_corpus(tmp_path, capsys, ray_cluster):
    """The driver is killed (SIGKILL) once some parts are finished; the same command again keeps them, converts
    the rest, and writes the corpus a clean run writes. Another command into that output is refused."""
    import ray

    d = tmp_path / "big"
    write_lines(d / "a.tsv", [vqa(i) for i in range(1, 121)])
    argv = ["ofa-tsv", "--layout", "vqa", "--input", str(d), "--split", "train", "--concurrency", "1",
            "--range-mb", str(1500 / 2**20), "--log-every-s", "0"]
    out = tmp_path / "resumed"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare_data", *argv, "--output", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + RAY_TIMEOUT
        while len(list(out.glob("part-*/_done.json"))) < 3:
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no part finished in time"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    finished = len(list(out.glob("part-*/_done.json")))
    assert not (out / "manifest.json").exists() and (out / "conversion-plan.json").exists()

    rc, other, err = run_prepare(capsys, *argv[:-4], "--output", str(out))  # other options: refused
    assert rc == 2 and "holds an unfinished conversion of other input or options (differing: range_bytes)" in err
    rc, resumed, _ = run_prepare(capsys, *argv, "--output", str(out))
    assert rc == 0 and finished <= resumed["resumed_parts"] < resumed["parts"]
    rc, clean, _ = run_prepare(capsys, *argv, "--output", str(tmp_path / "clean"))
    assert rc == 0 and clean["resumed_parts"] == 0
    assert (resumed["fingerprint"], resumed["rows_ok"], resumed["counts"]) == (clean["fingerprint"], 120,
                                                                                {"train": {"vqa": 120}})
    assert list(iter_rows(str(out))) == list(iter_rows(str(tmp_path / "clean")))
    assert not (out / "conversion-plan.json").exists()


@pytest.mark.timeout(RAY_TIMEOUT)
def test_append_adds_files_to_a_corpus_and_still_refuses_duplicate_ids(tmp_path, capsys, ray_cluster):
    a, b, both = tmp_path / "a", tmp_path / "b", tmp_path / "both"
    write_lines(a / "a.tsv", [vqa(i) for i in range(1, 6)])
    write_lines(b / "b.tsv", [vqa(i) for i in range(6, 9)])
    for src in (a / "a.tsv", b / "b.tsv"):
        write_lines(both / src.name, src.read_text().splitlines())
    corpus = str(tmp_path / "corpus")
    common = ["ofa-tsv", "--layout", "vqa", "--split", "train", "--output", corpus]
    assert run_prepare(capsys, *common, "--input", str(a))[0] == 0
    rc, _, err = run_prepare(capsys, *common, "--input", str(b))
    assert rc == 2 and "already holds a corpus (manifest.json)" in err and "--append" in err
    rc, appended, _ = run_prepare(capsys, *common, "--input", str(b), "--append")
    assert rc == 0 and appended["counts"] == {"train": {"vqa": 8}}
    rc, single, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--split", "train", "--input", str(both),
                                "--output", str(tmp_path / "single"))
    assert appended["fingerprint"] == single["fingerprint"]  # the rows of both, however they were added
    assert ids(corpus) == ids(str(tmp_path / "single")) == sorted(f"ofa-vqa/train/{i}" for i in range(1, 9))
    manifest = read_manifest(corpus)
    assert [s["path"].split("/")[0] for s in manifest.shards] == ["part-00000", "part-00001"]
    assert manifest.conversion["appended_to"]["num_rows"] == 5

    before = (tmp_path / "corpus" / "manifest.json").read_bytes()
    write_lines(tmp_path / "again" / "c.tsv", [vqa(20), vqa(3, "the same id again?")])
    rc, _, err = run_prepare(capsys, *common, "--input", str(tmp_path / "again"), "--append")
    assert rc == 2 and "'ofa-vqa/train/3' in" in err and "(the corpus appended to)" in err
    assert (tmp_path / "corpus" / "manifest.json").read_bytes() == before  # the corpus as it was
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["manifest.json", "part-00000", "part-00001"]
    assert ids(corpus) == sorted(f"ofa-vqa/train/{i}" for i in range(1, 9))


def pretraining_files(root: Path) -> dict[str, tuple[Path, int, dict[str, int]]]:
    """OFA's four pretraining files: layout -> (file, good rows, bad rows by reason)."""
    img = [b64(png((40 * k, 90, 200 - 40 * k))) for k in range(3)]  # 16 x 16
    codes = " ".join(str(c * 31 % 8192) for c in range(256))
    return {
        "pretrain_vl": (write_lines(root / "vision_language_examples.tsv", [
            f"v1\t{img[0]}\ta red square\t\t\t\tcoco\tcaption",
            f"v2\t{img[1]}\t\twhat color?\t0.9|!+red&&0.1|!+pink\t\tvqa\tqa",
            f"v3\t{img[2]}\tthe square\t\t1,1,9,12\t\trefcoco\tvisual_grounding",
            f"v4\t{img[2]}\tx\t\t\t\tcoco\tdetection",  # unknown_label
        ]), 3, {"unknown_label": 1}),
        "pretrain_text": (write_lines(root / "text_examples.tsv", [
            "t1\tthe quick brown fox jumps over the lazy dog", "t2\ta red square on a blue ground", "t3\t ",
        ]), 2, {"empty_text": 1}),
        "pretrain_image": (write_lines(root / "image_examples.tsv", [
            f"i1\t{img[0]}\t{codes}", f"i2\t{img[1]}\t{codes}", f"i3\t{img[2]}\t{codes} 7",  # 257: bad_format
        ]), 2, {"bad_format": 1}),
        "pretrain_detection": (write_lines(root / "detection_examples.tsv", [
            f"d1\t{img[0]}\t1,2,9,10,3,cat&&0,0,16,16,7,traffic light", f"d2\t{img[1]}\t2,2,5,5,3,cat",
            f"d3\t{img[2]}\t5,2,1,6,3,dog",  # bad_box
        ]), 2, {"bad_box": 1}),
    }  # fmt: skip


@pytest.mark.timeout(2 * RAY_TIMEOUT)
def test_the_four_pretraining_families_convert_into_one_corpus_that_passes_the_doctor(tmp_path, capsys,
                                                                                       ray_cluster):
    files = pretraining_files(tmp_path / "ofa")
    corpus = str(tmp_path / "pretrain")
    for n, (layout, (path, good, bad)) in enumerate(files.items()):
        rc, summary, err = run_prepare(capsys, "ofa-tsv", "--layout", layout, "--input", str(path), "--split", "train",
                                       "--output", corpus, *(["--append"] if n else []))  # fmt: skip
        assert rc == 0, err
        assert (summary["layout"], summary["rows_ok"], summary["rows_bad"]) == (layout, good, bad)
    assert summary["counts"] == {"train": {"caption": 1, "vqa": 1, "grounding": 1, "text_infilling": 2,
                                           "image_infilling": 2, "detection": 2}}  # fmt: skip
    written = sum(good for _, good, _ in files.values())
    assert len(ids(corpus)) == written == 9

    # every converted row passes its task's preprocessing (build_example), as training reads it
    report = run_doctor(capsys, "--input", corpus, "--config", doctor_config(tmp_path))
    assert report["rows_seen"] == report["rows_ok"] == written and report["rows_bad"] == 0
    assert report["ok_by_task"] == summary["counts"]["train"]

    # the doctor on a raw file of a family: its layout guessed from the one --task
    path, good, bad = files["pretrain_detection"]
    report = run_doctor(capsys, "--input", str(path), "--task", "detection", "--config", doctor_config(tmp_path))
    assert report["input_layout"] == "pretrain_detection"
    assert (report["rows_ok"], report["bad_by_reason"]) == (good, bad)
    assert report["bad_examples"] == {"bad_box": ["ofa-pretrain-detection/train/d3"]}


@pytest.mark.slow
@pytest.mark.timeout(4 * RAY_TIMEOUT)
def test_ofa_base_pretraining_runs_on_the_four_families_with_its_derived_tasks(tmp_path, capsys, ray_cluster):
    """configs/pretrain/ofa-base.yaml as shipped, at smoke size (ofa-micro, 32 px, two updates), through
    `jobs.pretrain` on a corpus of OFA's four pretraining files: every task of its mixture gets rows, itm and
    grounded_caption made from the caption and grounding rows as they are read."""
    from jobs import pretrain
    from ofa_model.config_files import load_config
    from pipelines.data.dataset import epoch_plans
    from pipelines.train.train_config import TrainConfig

    files = pretraining_files(tmp_path / "ofa")
    img = [b64(png((60 * k, 30, 90))) for k in range(4)]
    write_lines(files["pretrain_vl"][0], [  # more captions than the families test: itm draws its negatives
        *(f"c{k}\t{img[k]}\t{caption}\t\t\t\tcoco\tcaption"
          for k, caption in enumerate(["a red square", "a blue circle", "two grey triangles", "a teal box"])),
        *(f"q{k}\t{img[k]}\t\twhat color is it?\t1.0|!+{a}\t\tvqa\tqa" for k, a in enumerate(["red", "blue"])),
        *(f"g{k}\t{img[k]}\tthe shape\t\t1,1,{9 + k},12\t\trefcoco\tvisual_grounding" for k in range(3)),
    ])
    corpus = str(tmp_path / "pretrain")
    for n, (layout, (path, _, _)) in enumerate(files.items()):
        rc, _, err = run_prepare(capsys, "ofa-tsv", "--layout", layout, "--input", str(path), "--split", "train",
                                 "--output", corpus, *(["--append"] if n else []))
        assert rc == 0, err
    overrides = [
        f"data.uri={corpus}", f"data.sources.image_infilling.uri={corpus}", "model.init=null", "model.arch=ofa-micro", f"run.storage_path={tmp_path / 'runs'}",
        "run.log_every_s=0", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "scaling.use_gpu=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "data.batch_size=4", "data.num_actors=[1, 1]",
        "data.actor_num_cpus=0.25", "data.read_num_cpus=0.25",
        "data.preprocess={patch_image_size: 32, max_image_size: 512, max_src_length: 32, max_tgt_length: 30}",
        "epochs=1", "max_steps_per_epoch=2", "validation.split=train", "validation.max_rows=2",
        "validation.batch_size=2",
    ]  # fmt: skip
    cfg = load_config(TrainConfig, "configs/pretrain/ofa-base.yaml", overrides)
    plans = epoch_plans(cfg.data, cfg.mixture, train=True)
    assert {task: plan.info.total_rows for task, plan in plans.items()} == {
        "caption": 4, "itm": 4, "vqa": 2, "grounding": 3, "grounded_caption": 3, "text_infilling": 2,
        "image_infilling": 2, "detection": 2}
    pretrain.main(["--config", "configs/pretrain/ofa-base.yaml", *overrides])
    printed = capsys.readouterr().out
    out = json.loads(printed[printed.index("{\n"):])  # the summary, after MLflow's lines
    assert (out["epochs_done"], out["step"]) == (1, 2)
    assert out["metrics"]["data/rows_bad"] == 0 and out["metrics"]["data/rows_ok"] == 8  # 2 updates of 4 rows
    assert out["registered_version"] == "1"


@pytest.mark.timeout(RAY_TIMEOUT)
def test_limit_keeps_the_first_records_in_file_order(data, tmp_path, capsys, ray_cluster):
    rc, summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(data / "vqa_tsv"), "--split",
                                 "val", "--output", str(tmp_path / "out"), "--limit", "7", "--concurrency", "3")
    assert rc == 0 and summary["records"] == 7 and summary["files_read"] == 2
    assert summary["rows_ok"] == 4 and summary["rows_bad"] == {"bad_base64": 1, "empty_text": 1, "missing_column": 1}
    assert ids(str(tmp_path / "out")) == ["ofa-vqa/val/1", "ofa-vqa/val/2", "ofa-vqa/val/3", "ofa-vqa/val/6"]


@pytest.mark.timeout(RAY_TIMEOUT)
def test_webdataset_tars_local_and_on_s3(data, tmp_path, capsys, s3_server, ray_cluster):
    prefix = s3_server.uri("raw-wds")
    upload(data / "wds", prefix)
    results = []
    for src, out in ((str(data / "wds"), str(tmp_path / "wds_out")), (prefix, storage.join(prefix, "corpus"))):
        rc, summary, _ = run_prepare(capsys, "webdataset", "--input", src, "--split", "train", "--output", out,
                                     "--task", "caption", "--dataset", "toy")
        assert rc == 0
        assert summary["files"] == 3 and summary["rows_ok"] == WDS_OK
        assert summary["rows_bad"] == dict(sorted(WDS_BAD.items()))
        assert summary["bad_examples"]["unreadable_shard"] == [f"{src}/w-002.tar"]
        assert read_manifest(out).counts == {"train": {"caption": WDS_OK}}
        results.append((ids(out), summary["fingerprint"]))
    assert results[0] == results[1]
    assert results[0][0] == ["toy/train/k0", "toy/train/k1", "toy/train/k4"]


@pytest.mark.timeout(RAY_TIMEOUT)
def test_tsv_on_s3_matches_the_local_conversion(data, tmp_path, capsys, s3_server, ray_cluster):
    prefix = s3_server.uri("raw-tsv")
    upload(data / "vqa_tsv", prefix)
    out = storage.join(prefix, "corpus")
    rc, summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", prefix, "--split", "train",
                                 "--output", out, "--s3-region", "us-east-1")
    assert rc == 0 and summary["rows_ok"] == TSV_OK and summary["rows_bad"] == dict(sorted(TSV_BAD.items()))
    local = str(tmp_path / "local")
    rc, local_summary, _ = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(data / "vqa_tsv"),
                                       "--split", "train", "--output", local)
    assert summary["fingerprint"] == local_summary["fingerprint"]
    assert list(iter_rows(out)) == list(iter_rows(local))
    assert read_manifest(out).conversion["input"] == prefix


@pytest.mark.timeout(RAY_TIMEOUT)
def test_duplicate_ids_are_an_error_that_names_them_and_leaves_nothing(tmp_path, capsys, ray_cluster):
    d = tmp_path / "dup"
    write_lines(d / "a.tsv", [vqa(1), vqa(2)])
    write_lines(d / "b.tsv", [vqa(3), vqa(2, "another question?")])
    out = tmp_path / "out"
    rc, _, err = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(d), "--split", "train",
                             "--output", str(out))
    assert rc == 2
    assert f"1 row id(s) occur more than once in the input, e.g. 'ofa-vqa/train/2' in {d}/a.tsv and {d}/b.tsv" in err
    assert not out.exists() or not list(out.iterdir())
    write_lines(d / "b.tsv", [vqa(3), vqa(3, "again?")])  # now within one file
    rc, _, err = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(d), "--split", "train",
                             "--output", str(out))
    assert rc == 2 and f"{d}/b.tsv: row 'ofa-vqa/train/3': duplicate id" in err
    assert not out.exists() or not list(out.iterdir())


def test_bad_options_are_one_line_errors(data, tmp_path, capsys):
    for argv, code, text in [
        (["ofa-tsv", "--layout", "coco", "--input", "x", "--split", "train", "--output", "o"], 2, "invalid choice: 'coco'"),
        (["ofa-tsv", "--input", "x", "--split", "train", "--output", "o"], 2, "--layout"),
        (["webdataset", "--task", "detection", "--input", "x", "--split", "t", "--output", "o"], 2, "invalid choice"),
    ]:
        with pytest.raises(SystemExit) as exc:
            prepare_data.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == code and text in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.timeout(RAY_TIMEOUT)
def test_bad_inputs_and_outputs_exit_non_zero(data, tmp_path, capsys, ray_cluster):
    base = ["--split", "train", "--output", str(tmp_path / "out")]
    rc, _, err = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(tmp_path / "nothing"), *base)
    assert rc == 2 and "no .tsv files under" in err
    rc, _, err = run_prepare(capsys, "webdataset", "--input", str(data / "wds"), "--key-map", "text", *base)
    assert rc == 2 and "--key-map takes ROLE=CANDIDATE" in err
    rc, _, err = run_prepare(capsys, "webdataset", "--input", str(data / "wds"), "--key-map", "box=json:b", *base)
    assert rc == 2 and "key_map role 'box' is not used by task 'caption'" in err
    write_corpus([], str(tmp_path / "out"))
    rc, _, err = run_prepare(capsys, "ofa-tsv", "--layout", "vqa", "--input", str(data / "vqa_tsv"), *base)
    assert rc == 2 and "already holds a corpus" in err


@pytest.mark.timeout(RAY_TIMEOUT)
def test_job_runs_from_any_directory_on_the_cluster_of_ray_address(data, tmp_path, ray_cluster):
    """As `ray job submit` runs it: a separate driver joining the cluster, relative paths of its own cwd."""
    import ray

    work = tmp_path / "work"
    make_tsv_dir(work)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "ofa-tsv", "--layout", "vqa", "--input",
                           "vqa_tsv", "--split", "train", "--output", "corpus"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=RAY_TIMEOUT - 20)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["rows_ok"] == TSV_OK
    assert read_manifest(str(work / "corpus")).num_rows == TSV_OK


# --- the doctor on raw input ---------------------------------------------------------------------------------


def doctor_config(tmp_path: Path) -> str:
    """Small resources so the 2-core machine is not starved (4 logical CPUs in the test cluster)."""
    cfg = {"uri": "unused", "batch_size": 4, "num_actors": [1, 1], "actor_num_cpus": 0.5, "read_num_cpus": 0.25,
           "rows_per_map_batch": 4, "rows_per_read_block": 4, "read_retries": 0, "read_concurrency": 2,
           "preprocess": {"patch_image_size": 32}}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_doctor(capsys, *argv: str) -> dict:
    inspect_data.main(list(argv))
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_doctor_reads_an_ofa_tsv_file(tmp_path, capsys, ray_cluster):
    path = write_lines(tmp_path / "vqa_train.tsv", [
        vqa(1), vqa(2), "3\timg3\tq?\t1.0|!+yes\tobj",  # missing_column
        vqa(4, image=TRUNCATED_PNG),  # passes the reader, the pipeline finds it truncated
        vqa(5, answers="0.5|!+"),  # empty_text
    ])  # fmt: skip
    # the command: the layout comes from the one --task
    scratch = tmp_path / "scratch"
    report = run_doctor(capsys, "--input", str(path), "--task", "vqa", "--config", doctor_config(tmp_path),
                        "--scratch", str(scratch))
    assert report["uri"] == str(path) and report["input_layout"] == "vqa"
    assert report["rows_in_manifest"] == 5 and report["rows_seen"] == 5
    assert report["rows_ok"] == 2 and report["rows_bad"] == 3
    assert report["bad_by_reason"] == {"empty_text": 1, "missing_column": 1, "truncated_image": 1}
    assert report["bad_examples"] == {"empty_text": ["ofa-vqa/train/5"], "missing_column": ["ofa-vqa/train/3"],
                                      "truncated_image": ["ofa-vqa/train/4"]}
    assert report["ok_by_task"] == {"vqa": 2} and report["bad_by_task"] == {"vqa": 3}
    assert report["bad_fraction"] == 0.6 and report["over_threshold"] is True
    assert [(b["id"], b["reason"], b["source"]) for b in report["conversion"]["bad_rows"]] == [
        ("ofa-vqa/train/3", "missing_column", f"{path}:3"), ("ofa-vqa/train/5", "empty_text", f"{path}:5")]
    assert not scratch.exists() or not list(scratch.iterdir())  # the scratch corpus is gone


@pytest.mark.timeout(RAY_TIMEOUT)
def test_doctor_reads_a_tsv_directory_and_a_webdataset(data, tmp_path, capsys, ray_cluster):
    cfg = doctor_config(tmp_path)
    report = run_doctor(capsys, "--input", str(data / "vqa_tsv"), "--layout", "vqa", "--config", cfg)
    assert report["rows_seen"] == TSV_OK + sum(TSV_BAD.values())
    assert report["rows_ok"] == TSV_OK and report["bad_by_reason"] == dict(sorted(TSV_BAD.items()))
    assert len(report["conversion"]["bad_rows"]) == sum(TSV_BAD.values())
    assert {b["source"] for b in report["conversion"]["bad_rows"]} >= {f"{data}/vqa_tsv/sub/c.tsv:4"}

    report = run_doctor(capsys, "--input", str(data / "wds"), "--config", cfg, "--limit", "5")  # tars: guessed
    assert report["input_layout"] == "webdataset" and report["rows_in_manifest"] == 5
    assert report["rows_ok"] == 3 and report["bad_by_reason"] == {"bad_image": 1, "missing_member": 1}
    report = run_doctor(capsys, "--input", str(data / "wds" / "w-001.tar"), "--config", cfg)
    assert report["rows_ok"] == 1 and report["bad_by_reason"] == {"empty_text": 1}
    assert report["bad_examples"] == {"empty_text": ["webdataset/train/k5"]}


def test_doctor_says_which_layouts_it_needs(data, tmp_path, capsys):
    (tmp_path / "x.tsv").write_text("a\tb\n")
    for argv, text in [
        (["--input", str(tmp_path / "x.tsv")], "cannot tell the layout of the OFA TSV input"),
        (["--input", str(tmp_path / "x.tsv"), "--task", "vqa", "--task", "caption"], "pass --layout, one of: caption,"),
        (["--input", str(tmp_path / "x.tsv"), "--layout", "vqa", "--task", "caption"], "holds vqa rows, not caption"),
        (["--input", str(data / "wds"), "--task", "summarization"], "unsupported WebDataset task 'summarization'"),
        (["--input", str(data / "vqa_tsv"), "--layout", "vqa", "--split", "a", "--split", "b"], "one split"),
        (["--input", str(tmp_path / "missing")], "nothing at"),
    ]:
        with pytest.raises(SystemExit) as exc:
            inspect_data.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and text in err and len(err.strip().splitlines()) == 1, (argv, err)
    with pytest.raises(SystemExit) as exc:
        inspect_data.main(["--input", "x", "--layout", "parquet"])
    assert exc.value.code == 2 and "invalid choice: 'parquet'" in capsys.readouterr().err
