"""`python -m jobs.prepare_data image-codes` (`pipelines.data.image_codes`) on the shared Ray cluster: a tiny
easy-VQA corpus with one corrupt image through an untrained, seeded vqgan-micro tokenizer, into a corpus on the S3
server. Its codes equal the tokenizer's own in-process encoding, bad images are counted by reason beside written
neighbours, its manifest records the tokenizer that made them, and the rows train (build_example, collate, an
ofa-micro forward) only at the code_image_size they were made for."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jobs import prepare_data
from ofa_model.architecture import get_config
from ofa_model.config_files import load_config
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig, collate
from ofa_model.tasks import INFILL_CODES, TASKS, for_code_image_size
from ofa_model.vocab import Vocabulary
from ofa_model.vqgan import VQGAN, VQGAN_SIZES, load_tokenizer, save_tokenizer, weights_digest
from pipelines.data.converters.easyvqa import convert_easy_vqa
from pipelines.data.image_codes import CodesRecord, codes_record
from pipelines.data.ingest import preprocess_row
from pipelines.data.readers.rows import BadRow
from pipelines.data.shards import iter_rows, read_manifest, write_corpus

RAY_TIMEOUT = 240
SIZE = 32  # the job's code_image_size: (32 / 8)^2 = 16 codes a target
CORRUPT = "easy-vqa/train/caption/corrupt"


def run_job(*argv: str) -> tuple[int, dict | None]:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            prepare_data.main(["image-codes", *argv])
    except SystemExit as exc:
        return exc.code, None
    text = out.getvalue()
    # the summary is the JSON object that opens a line; Ray's driver may forward a raylet warning to stdout before it
    # ("WARNING: 8 PYTHON worker processes have been started ..." in a loaded suite)
    start = 0 if text.startswith("{") else text.index("\n{") + 1
    return 0, json.loads(text[start:])


@pytest.fixture(scope="module")
def job_run(tmp_path_factory, ray_cluster, s3_server):
    """(summary, source rows by id, output rows, tokenizer, the tokenizer's path, the output's URI): the job run once
    on 3 easy-VQA train images (about 60 rows of 6 tasks showing them) and a caption row whose PNG is cut after 40
    bytes, writing to the S3 server."""
    root = tmp_path_factory.mktemp("image_codes")
    rows = [r for r in convert_easy_vqa(splits=["train"], limit=3, seed=0) if not isinstance(r, BadRow)]
    caption = next(r for r in rows if r["task"] == "caption")
    rows.append({**caption, "id": CORRUPT, "image": caption["image"][:40]})
    write_corpus(rows, str(root / "corpus"))
    torch.manual_seed(0)
    save_tokenizer(root / "tokenizer", VQGAN(VQGAN_SIZES["vqgan-micro"]))
    output = s3_server.uri("image-codes")
    rc, summary = run_job("--tokenizer", str(root / "tokenizer"), "--input", str(root / "corpus"), "--output",
                          output, "--code-image-size", str(SIZE), "--batch-size", "2",
                          "--num-cpus", "0.5", "--log-every-s", "0")
    assert rc == 0
    return (summary, {r["id"]: r for r in rows}, list(iter_rows(output)), load_tokenizer(root / "tokenizer"),
            root / "tokenizer", output)


@pytest.fixture(scope="module")
def job(job_run):
    """(summary, source rows by id, output rows, tokenizer) of `job_run`."""
    return job_run[:4]


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.timeout(RAY_TIMEOUT)
def test_codes_equal_the_tokenizers_own_encoding_and_bad_images_are_counted(job):
    summary, source, out, tokenizer = job
    good = [r for i, r in source.items() if i != CORRUPT]
    captions = [r for r in good if r["task"] == "caption"]
    distinct = {r["image"] for r in good if r["image"] is not None}
    assert len(captions) == len(distinct) == 3
    assert summary["rows_by_task"] == {"image_infilling": 3, "text_to_image": 3}
    assert summary["rows_bad"] == {"truncated_image": 2}  # the corrupt image: its infilling and caption rows
    assert summary["bad_by_task"] == {"image_infilling": 1, "text_to_image": 1}
    assert f"{CORRUPT}/text_to_image" in summary["bad_examples"]["truncated_image"]
    assert (summary["images"], summary["codes_per_image"], summary["counts"]) == (
        4, 16, {"train": {"image_infilling": 3, "text_to_image": 3}})

    t2i = sorted((r for r in out if r["task"] == "text_to_image"), key=lambda r: r["id"])
    assert [r["id"] for r in t2i] == sorted(f"{c['id']}/text_to_image" for c in captions)
    sources = [source[r["id"].removesuffix("/text_to_image")] for r in t2i]
    assert [r["text"] for r in t2i] == [s["target"] for s in sources] and all(r["image"] is None for r in t2i)
    expected = tokenizer.encode_images([pil(s["image"]) for s in sources], SIZE).tolist()
    assert [r["codes"] for r in t2i] == expected

    infill = [r for r in out if r["task"] == "image_infilling"]
    assert {r["image"] for r in infill} == distinct  # each distinct image once, its bytes as stored
    assert all(len(r["codes"]) == (SIZE // 8) ** 2 for r in infill)
    lo, hi = SIZE // 2, SIZE * 3 // 2  # the centre SIZE px of the image at 2 x SIZE, cut here with PIL
    centres = [pil(r["image"]).resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS).crop((lo, lo, hi, hi))
               for r in infill]
    assert [r["codes"] for r in infill] == tokenizer.encode_images(centres, SIZE).tolist()
    assert len({tuple(r["codes"]) for r in infill}) == 3  # three images, three different targets


@pytest.mark.timeout(RAY_TIMEOUT)
def test_the_manifest_records_the_tokenizer_that_made_the_codes(job_run):
    """What training checks its tokenizer against (`pipelines.train.setup.check_code_corpora`): the digest of the
    tokenizer's tensors, computed here from the loaded weights, its path and the code_image_size."""
    summary, _, _, tokenizer, path, output = job_run
    manifest = read_manifest(output)
    digest = weights_digest(tokenizer.model.state_dict())
    assert codes_record(manifest, output) == CodesRecord(str(path.resolve()), digest, SIZE)
    assert summary["tokenizer_sha256"] == digest
    conv = manifest.conversion
    assert (conv["source"], conv["task"], conv["images"], conv["rows_ok"], conv["rows_bad"]) == (
        "image-codes", "both", 4, 6, {"truncated_image": 2})
    assert conv["input_fingerprint"] == read_manifest(summary["input"]).fingerprint
    assert codes_record(dataclasses.replace(manifest, conversion=None), output) is None  # an older corpus
    with pytest.raises(ValueError, match="conversion.tokenizer_sha256 must be 64 lowercase hex digits"):
        codes_record(dataclasses.replace(manifest, conversion={**conv, "tokenizer_sha256": "x"}), output)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_rows_train_at_the_code_image_size_they_were_made_for_and_are_bad_rows_at_another(job):
    _, _, out, _ = job
    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)
    at_32, at_64 = for_code_image_size(TASKS, SIZE), for_code_image_size(TASKS, 64)
    samples = []
    for row in out:
        sample, reason, detail = preprocess_row(at_32[row["task"]], row, vocab, pcfg, train=True, rng=None)
        assert reason is None, detail
        assert sample["target"] == [vocab.code_id(c) for c in row["codes"]] + [vocab.eos_id]
        assert sample["code_mask"] and (sample["image"] is None) == (row["task"] == "text_to_image")
        samples.append(sample)
        sample, reason, detail = preprocess_row(at_64[row["task"]], row, vocab, pcfg, train=True, rng=None)
        assert (sample, reason) == (None, "wrong_code_count")
        assert "holds 16 image codes, the model trains on 64" in detail
    infill = next(s for s in samples if s["image"] is not None)
    assert torch.count_nonzero(infill["image"][:, 8:24, 8:24]) == 0  # the centre the codes describe is blanked
    model = OFAModel(get_config("ofa-micro", code_image_size=SIZE, vocab_size=len(vocab), pad_id=vocab.pad_id))
    batch = collate(samples, vocab.pad_id)
    logits = model(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"),
                   batch["prev_output_tokens"], batch["code_masks"])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(),
                                             ignore_index=vocab.pad_id)
    assert logits.shape[:2] == batch["target"].shape and torch.isfinite(loss)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_the_job_refuses_bad_options_with_status_2(job, tmp_path, capsys):
    corpus = str(Path(tmp_path) / "nothing")
    tokenizer = str(Path(tmp_path) / "tok")
    torch.manual_seed(0)
    save_tokenizer(tokenizer, VQGAN(VQGAN_SIZES["vqgan-micro"]))
    rc, _ = run_job("--tokenizer", tokenizer, "--input", corpus, "--output", str(tmp_path / "o"),
                    "--code-image-size", "30")
    assert rc == 2 and "code_image_size must be a multiple of 8" in capsys.readouterr().err
    rc, _ = run_job("--tokenizer", str(tmp_path), "--input", corpus, "--output", str(tmp_path / "o"))
    assert rc == 2 and "not a bundle directory" in capsys.readouterr().err


def test_pretraining_configs_read_image_infilling_from_an_image_codes_corpus():
    from pipelines.data.dataset import corpora
    from pipelines.train.setup import run_code_image_size, task_specs
    from pipelines.train.train_config import TrainConfig

    micro = "configs/pretrain/easyvqa_micro.yaml"
    demo = load_config(TrainConfig, micro)
    assert "image_infilling" not in demo.mixture  # the demo's pretraining, as shipped: no codes corpus needed
    opted = load_config(TrainConfig, micro, [
        "mixture={image_infilling: 1}", "data.sources={image_infilling: {uri: s3://ofa-demo/corpora/easy-vqa-codes}}"])
    assert opted.mixture == {**demo.mixture, "image_infilling": 1}
    assert corpora(opted.data, opted.mixture)["image_infilling"].uri == "s3://ofa-demo/corpora/easy-vqa-codes"
    specs = task_specs(opted, run_code_image_size(opted))
    assert specs["image_infilling"].code_count == specs["text_to_image"].code_count == 256  # ofa-micro's 128 px
    assert specs["caption"].code_count is None

    base = load_config(TrainConfig, "configs/pretrain/ofa-base.yaml", [
        "data.uri=s3://c/pretrain", "data.sources.image_infilling.uri=s3://c/codes", "model.init=null",
        "run.storage_path=s3://c/runs"])
    assert corpora(base.data, base.mixture)["image_infilling"].uri == "s3://c/codes"
    assert task_specs(base, run_code_image_size(base))["image_infilling"].code_count == INFILL_CODES  # OFA's 256


@pytest.mark.timeout(RAY_TIMEOUT)
def test_training_refuses_codes_of_another_tokenizer_or_size_before_any_worker_starts(job_run, tmp_path, caplog):
    """`pipelines.train.train` on the job's corpus (data.sources.text_to_image) with a tokenizer of the same
    architecture but other weights, and at another code_image_size: a ConfigError naming the key and both digests,
    from config files alone, before the MLflow run or any worker starts. The tokenizer that made the codes, named
    or carried by the init bundle, passes; a corpus without the record is a warning."""
    import logging

    from ofa_model.errors import ConfigError
    from pipelines.data.dataset import read_manifests
    from pipelines.train import train
    from pipelines.train.setup import check_code_corpora, run_code_image_size, task_specs, with_init_bundle
    from pipelines.train.train_config import TrainConfig
    from tests.serving import micro_image_bundle

    summary, _, _, tokenizer, path, output = job_run
    torch.manual_seed(1)
    other = save_tokenizer(tmp_path / "other", VQGAN(VQGAN_SIZES["vqgan-micro"]))
    theirs, ours = tokenizer.digest, weights_digest(load_tokenizer(other).model.state_dict())
    assert theirs != ours

    def config(size: int, tokenizer: Path | None = None, init: Path | None = None) -> TrainConfig:
        """The shipped text-to-image fine-tune (a mixture: text_to_image from data.sources) on the job's corpus."""
        return load_config(TrainConfig, "configs/finetune/text_to_image_easyvqa.yaml", [
            f"data.uri={summary['input']}", f"data.sources.text_to_image.uri={output}",
            f"model.image_tokenizer={tokenizer or 'null'}", f"model.init={init or 'null'}",
            f"model.dims.code_image_size={size}", f"run.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.registered_model=null"])

    with pytest.raises(ConfigError) as refused:
        train(config(SIZE, other))
    assert str(refused.value).startswith(
        f"data.sources.text_to_image.uri: the corpus {output} (text_to_image) holds codes of the image tokenizer "
        f"{path.resolve()} (weights_sha256 {theirs}), not of this run's, model.image_tokenizer {other} "
        f"(weights_sha256 {ours})")
    assert f"--tokenizer {other} ...`), or train with the one that made it" in str(refused.value)
    with pytest.raises(ConfigError, match=r"data.sources.text_to_image.uri: the corpus .* holds codes made at "
                                          r"code_image_size 32 \(16 a target\); this run's model trains at 64"):
        train(config(64, path))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing started

    def check(cfg: TrainConfig, manifests=None) -> None:
        cfg = with_init_bundle(cfg)
        size = run_code_image_size(cfg)
        check_code_corpora(cfg, manifests or read_manifests(cfg.data, cfg.mixture), task_specs(cfg, size), size)

    check(config(SIZE, path))
    carrying = micro_image_bundle(tmp_path / "carrying")  # its tokenizer: vqgan-micro, seed 0, as the job's
    check(config(SIZE, init=carrying))
    other_init = micro_image_bundle(tmp_path / "other-init", n_embed=256)
    with pytest.raises(ConfigError, match=r"not of this run's, the image tokenizer of model.init .*other-init"):
        check(config(SIZE, init=other_init))
    cfg = config(SIZE, other)
    older = {uri: dataclasses.replace(m, conversion=None) for uri, m in read_manifests(cfg.data, cfg.mixture).items()}
    with caplog.at_level(logging.WARNING, logger="pipelines.train.setup"):
        check(cfg, older)
    assert [r.getMessage() for r in caplog.records] == [
        f"data.sources.text_to_image.uri: the corpus {output} (text_to_image) keeps no record of the image tokenizer "
        "that made its codes (written before `jobs.prepare_data image-codes` kept one, or by another conversion): "
        "not checked against the run's tokenizer"]
