"""Ray Data ingest (pipelines.data.dataset and the modules behind it) on a real S3 server and a local Ray cluster.

One small corpus on S3 holds good rows of five tasks and every kind of bad input, with exact expected
counts. Each real pipeline run costs a few seconds (preprocessing actors start cold and import torch), so
most checks share one materialised run of the pipeline; the others (resume from the source, two-worker
split, the doctor) run it for real.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from jobs import inspect_data
from ofa_model.errors import ConfigError
from ofa_model.preprocess import PreprocessConfig, blank_centre, collate, normalize_pixels
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines import storage
from pipelines.data.batches import (
    ConsumerOptions,
    StreamRow,
    _images,
    collate_rows,
    iter_mixture_batches,
    iter_train_batches,
    weighted_schedule,
)
from pipelines.data.data_config import SourceSection
from pipelines.data.dataset import (
    SINGLE,
    DataConfig,
    build_dataset,
    corpora,
    data_fingerprint,
    epoch_batches,
    epoch_plans,
    read_manifests,
)
from pipelines.data.ingest import _image_array, _Preprocess, output_schema, plan_epoch
from pipelines.data.rowstats import BadDataError, BadRowRule, MixtureState, ResumeState, RowStats
from pipelines.data.schema import normalize_row
from pipelines.data.shards import write_corpus
from pipelines.data.source import SOURCE_SCHEMA, EpochInfo, SeqSet, plan_part

PCFG = PreprocessConfig(patch_image_size=32, max_image_pixels=1000)  # 16x16 images pass, 40x40 is too large
RAY_TIMEOUT = 120


def _opts(threshold: float | None, early_check_rows: int = 1000, **options) -> ConsumerOptions:
    return ConsumerOptions(rule=BadRowRule(threshold, early_check_rows), **options)


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (size, size), color)
    img.putpixel((size // 2, size // 2), (255 - color[0], 255 - color[1], 255 - color[2]))
    img.save(buf, "PNG")
    return buf.getvalue()


def row(id_: str, task: str, **fields) -> dict:
    return {"id": id_, "task": task, "split": "train", **fields}


def good_rows() -> list[dict]:
    rows = []
    for i in range(6):
        answer = "red" if i % 2 == 0 else "blue"
        rows.append(row(f"vqa/{i}", "vqa", image=png((40 * i, 10, 200)), text=f"what color is shape {i}?",
                        target=answer, targets=[answer, "green"], target_weights=[0.5 if i % 3 == 0 else 1.0, 0.3]))
    for i in range(4):
        rows.append(row(f"caption/{i}", "caption", image=png((10, 50 * i, 20)), target=f"A red circle, number {i}."))
    for i in range(3):
        rows.append(row(f"grounding/{i}", "grounding", image=png((90, 90, 30 * i)), text="the red circle",
                        box=[2.0, 3.0, 10.0 + i, 12.5]))
    for i, label in enumerate(("yes", "no")):
        rows.append(row(f"visual_entailment/{i}", "visual_entailment", image=png((5, 5, 5 + i)),
                        text="there is a red shape", target=label))
    for i, label in enumerate(("positive", "negative")):
        rows.append(row(f"glue_sst2/{i}", "glue_sst2", text=f"a {'fine' if i == 0 else 'dull'} movie", target=label))
    return rows


def bad_rows() -> list[tuple[dict, str]]:
    """Rows the ShardWriter accepts but preprocessing must reject, with the reason each must get."""
    ok_png = png((1, 2, 3))
    vqa = {"text": "what is it?", "target": "red"}
    return [
        (row("bad/truncated", "vqa", image=ok_png[: len(ok_png) // 2], **vqa), "truncated_image"),
        (row("bad/not_an_image", "vqa", image=b"hello, this is text and no image", **vqa), "not_an_image"),
        (row("bad/too_large", "vqa", image=png((1, 2, 3), size=40), **vqa), "image_too_large"),
        (row("bad/missing_text", "vqa", image=ok_png, target="red"), "missing_field"),
        (row("bad/blank_text", "vqa", image=ok_png, text="   ", target="red"), "empty_text"),
        (row("bad/empty_caption", "caption", image=ok_png, target=""), "empty_text"),
        (row("bad/inverted_box", "grounding", image=ok_png, text="it", box=[10.0, 2.0, 4.0, 12.0]), "bad_box"),
        (row("bad/outside_box", "grounding", image=ok_png, text="it", box=[0.0, 0.0, 100.0, 100.0]), "bad_box"),
        (row("bad/label", "visual_entailment", image=ok_png, text="a shape", target="perhaps"), "unknown_label"),
        (row("bad/task", "mystery", text="x", target="y"), "unknown_task"),
    ]


TYPED_IDS = [f"typed/{i}" for i in range(3)]  # a shard whose `text` column is int64 -> bad_type
GARBAGE_ROWS = 5  # a .parquet of garbage bytes that the manifest says holds 5 rows -> unreadable_shard
EXPECTED_BAD = {"truncated_image": 1, "not_an_image": 1, "image_too_large": 1, "missing_field": 1, "empty_text": 2,
                "bad_box": 2, "unknown_label": 1, "unknown_task": 1, "bad_type": 3, "unreadable_shard": 5}
EXPECTED_OK = {"vqa": 6, "caption": 4, "grounding": 3, "visual_entailment": 2, "glue_sst2": 2}


def _add_shard(uri: str, name: str, data: bytes, task: str, num_rows: int, num_row_groups: int) -> None:
    """Put a hand-made file into the corpus and list it in the manifest."""
    storage.write_bytes(storage.join(uri, name), data)
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    manifest["shards"].append({"path": name, "split": "train", "task": task, "num_rows": num_rows,
                               "num_bytes": len(data), "num_row_groups": num_row_groups})
    manifest["shards"].sort(key=lambda s: s["path"])
    manifest["num_rows"] += num_rows
    manifest["counts"]["train"][task] = manifest["counts"]["train"].get(task, 0) + num_rows
    storage.write_bytes(storage.join(uri, "manifest.json"), json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.gpt2()


@pytest.fixture(scope="module")
def corpus(s3_server) -> str:
    """The test corpus on S3: good rows, bad rows, a wrongly typed shard and an unreadable one."""
    uri = s3_server.uri("dataset")
    rows = good_rows() + [r for r, _ in bad_rows()]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # bad rows among good ones
    write_corpus(rows, uri, shard_bytes=400, row_group_rows=3)
    typed = pa.table({"id": TYPED_IDS, "task": ["vqa"] * 3, "split": ["train"] * 3, "image": [png((9, 9, 9))] * 3,
                      "text": pa.array([1, 2, 3], pa.int64()), "target": ["red"] * 3})
    buf = io.BytesIO()
    pq.write_table(typed, buf)
    _add_shard(uri, "train-vqa-typed.parquet", buf.getvalue(), "vqa", 3, 1)
    _add_shard(uri, "train-caption-garbage.parquet", b"not parquet at all " * 20, "caption", GARBAGE_ROWS, 1)
    return uri


def config(uri: str, **kw) -> DataConfig:
    """Small resources so the 2-core machine is not starved (4 logical CPUs in the test cluster)."""
    base = dict(uri=uri, preprocess=PCFG, batch_size=4, num_actors=(1, 1), actor_num_cpus=0.5, read_num_cpus=0.25,
                rows_per_map_batch=4, rows_per_read_block=4, bad_row_threshold=0.6, read_retries=0, read_concurrency=2)
    return DataConfig(**{**base, **kw})


SEED, EPOCH = 3, 1


@pytest.fixture(scope="module")
def run(corpus, vocab, ray_cluster):
    """One real training-mode run of the pipeline (shuffled shards, augmentation), materialised, and its plan."""
    cfg = config(corpus, seed=SEED)
    plan = plan_epoch(cfg, train=True, epoch=EPOCH)
    return build_dataset(cfg, vocab, train=True, plan=plan).materialize(), plan


def by_id() -> dict[str, dict]:
    return {r["id"]: normalize_row(r) for r in good_rows()}


def consume(batches) -> tuple[list[str], list[dict]]:
    ids, out = [], []
    for b in batches:
        ids += b["ids"]
        out.append(b)
    return ids, out


def assert_expected_stats(stats: RowStats) -> None:
    assert stats.ok == 17 and stats.ok_by_task == EXPECTED_OK
    assert stats.bad_by_reason == EXPECTED_BAD


def expected_order(plan) -> list[str]:
    """Good ids in the order a preserve_order run must give them: plan's shard order, then file order."""
    good = set(by_id())
    out = []
    for shard in plan.shards:
        if shard.uri.endswith(("garbage.parquet", "typed.parquet")):
            continue
        fs, path = storage.resolve(shard.uri)
        out += [i for i in pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist() if i in good]
    return out


# ---------------------------------------------------------------------------------------------------------
# Without Ray


def test_config_from_dict_validates_and_names_unknown_keys():
    cfg = DataConfig.from_dict({"uri": "s3://b/c", "tasks": ["vqa"], "num_actors": [1, 2],
                                "preprocess": {"patch_image_size": 64}, "s3": {"endpoint_url": "http://h:1"}})
    assert cfg.tasks == ("vqa",) and cfg.num_actors == (1, 2) and cfg.preprocess.patch_image_size == 64
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"DataConfig: bach_size: unknown key \(known: actor_num_cpus, .*; shuffle: "
                                         "unknown key"):
        DataConfig.from_dict({"uri": "x", "bach_size": 3, "shuffle": True})
    with pytest.raises(ValueError, match="preprocess.size: unknown key"):
        DataConfig.from_dict({"uri": "x", "preprocess": {"size": 3}})
    with pytest.raises(ValueError, match="s3.secret: unknown key"):
        DataConfig.from_dict({"uri": "x", "s3": {"secret": "no"}})
    for bad in ({"batch_size": 0}, {"bad_row_threshold": 1.5}, {"num_actors": (3, 1)}, {"image_dtype": "int8"},
                {"tasks": "vqa"}, {"uri": ""}, {"actor_num_cpus": 0}, {"shuffle_files": "yes"}):
        with pytest.raises(ValueError):
            DataConfig(**{"uri": "x", **bad})
    with pytest.raises(ValueError, match=r"preprocess_on: Input should be 'actors' or 'tasks'"):
        DataConfig.from_dict({"uri": "x", "preprocess_on": "threads"})


def test_example_yaml_config_loads():
    with open("configs/data.yaml") as f:
        raw = yaml.safe_load(f)
    with pytest.raises(ConfigError, match="uri is required: pass uri=..."):  # the corpus is the user's to name
        DataConfig.from_dict(raw)
    cfg = DataConfig.from_dict({**raw, "uri": "s3://b/corpora/easy-vqa"})
    assert cfg.uri == "s3://b/corpora/easy-vqa" and cfg.bad_row_threshold == 0.01


def test_seqset_intervals_mask_and_gaps():
    s = SeqSet([(5, 8), (0, 2)])
    s.add(2, 3)
    s.add(7, 12)
    s.add(20, 21)
    assert s.intervals() == [(0, 3), (5, 12), (20, 21)] and len(s) == 11
    assert 11 in s and 12 not in s and 4 not in s
    assert s.mask(2, 7).tolist() == [True, False, False, True, True]
    assert s.gaps(0, 22) == [(3, 5), (12, 20), (21, 22)]
    s.add(3, 20)
    assert s.intervals() == [(0, 21)]


def test_plan_part_shares_the_rows_left_in_equal_runs_whatever_the_world():
    rng = np.random.default_rng(5)
    for _ in range(200):
        total = int(rng.integers(0, 60))
        consumed = SeqSet()
        for a in rng.integers(0, max(1, total), size=int(rng.integers(0, 5))):
            consumed.add(int(a), int(a + rng.integers(1, 8)))
        left = [i for i in range(total) if i not in consumed]
        for world in (1, 2, 3, 7):
            parts = [plan_part(total, consumed, rank, world) for rank in range(world)]
            # numpy's array_split: the reference for "consecutive runs, the first len % world one longer"
            want = [list(p) for p in np.array_split(np.array(left, dtype=int), world)]
            assert [[i for i in range(total) if i in p] for p in parts] == want
    assert plan_part(10, SeqSet([(0, 4)]), 1, 2).intervals() == [(7, 10)]
    assert plan_part(10, SeqSet([(2, 4), (6, 8)]), 0, 2).intervals() == [(0, 2), (4, 5)]
    with pytest.raises(ValueError, match="rank 2 is not a worker of a world of 2"):
        plan_part(10, SeqSet(), 2, 2)
    with pytest.raises(ValueError, match="world must be an int >= 1"):
        plan_part(10, SeqSet(), 0, 0)


def test_weighted_schedule_proportions_and_seed():
    weights = {"a": 5, "b": 3, "c": 2}
    names = list(_take(weighted_schedule(weights, seed=7), 6400))
    assert [names.count(n) for n in "abc"] == [3200, 1920, 1280]  # 100 blocks of 64: exact shares
    for k in (10, 100, 1000, 5000):  # any prefix is within one block of the exact share
        assert abs(names[:k].count("b") - k * 0.3) <= 64
    assert [names[i:i + 64].count("a") for i in range(0, 6400, 64)] == [32] * 100
    assert names == list(_take(weighted_schedule(weights, seed=7), 6400))
    assert names[:64] != list(_take(weighted_schedule(weights, seed=8), 64))
    with pytest.raises(ValueError):
        next(weighted_schedule({"a": 0}, seed=0))


def _take(it, n):
    for _ in range(n):
        yield next(it)


def test_image_column_round_trip_with_slices_and_chunks():
    images = [None if k % 3 == 0 else np.arange(12, dtype=np.float32) + 100 * k for k in range(7)]
    column = _image_array(images, pa.large_list(pa.float32()))
    chunked = pa.chunked_array([column.slice(0, 3), column.slice(3, 4)]).slice(1, 5)  # as iter_batches slices
    out = _images(chunked)
    assert [o is None for o in out] == [i is None for i in images[1:6]]
    for got, want in zip(out, images[1:6], strict=True):
        if want is not None:
            assert got.shape == (3, 2, 2) and got.flatten().tolist() == want.tolist()


class _Batches:
    """Stands in for a Ray DataIterator: iter_batches over fixed pyarrow tables."""

    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, **kwargs):
        yield from self.tables


def test_preprocess_udf_float16_images_match_build_example(vocab):
    rows = [normalize_row(r) for r in good_rows() if r["task"] in ("vqa", "glue_sst2")]
    source = pa.Table.from_pylist([{**r, "seq": i, "span": 1} for i, r in enumerate(rows)], schema=SOURCE_SCHEMA)
    udf = _Preprocess(vocab, PCFG, TASKS, train=False, seed=0, epoch=0, image_dtype="float16")
    out = udf(source)
    assert out.column("ok").to_pylist() == [True] * len(rows)
    batches = list(iter_train_batches(_Batches([out]), vocab, 8))
    expected = collate([build_example(TASKS[r["task"]], r, vocab, PCFG) for r in rows], vocab.pad_id)
    got = batches[0]
    assert got["patch_images"].dtype == torch.float16
    assert torch.equal(got["patch_images"], expected["patch_images"].half())
    for key in ("src_tokens", "prev_output_tokens", "target", "target_weights", "patch_masks", "ntokens"):
        assert torch.equal(got[key], expected[key]), key


def test_preprocess_udf_uint8_pixels_normalise_to_build_example_exactly(vocab):
    pcfg = PreprocessConfig(patch_image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    rows = [normalize_row(r) for r in good_rows() if r["task"] in ("vqa", "glue_sst2")]
    rows.insert(2, normalize_row(row("infill/0", "image_infilling", image=buf.getvalue(), codes=[1, 2, 3])))
    source = pa.Table.from_pylist([{**r, "seq": i, "span": 1} for i, r in enumerate(rows)], schema=SOURCE_SCHEMA)
    out = _Preprocess(vocab, pcfg, TASKS, train=False, seed=0, epoch=0, image_dtype="uint8")(source)
    assert out.column("ok").to_pylist() == [True] * len(rows)
    assert out.schema.field("image").type == pa.large_list(pa.uint8())
    assert out.column("image").combine_chunks().values.nbytes == 7 * 3 * 32 * 32  # 7 images, 1 byte per value
    blank = [r["task"] == "image_infilling" if r["image"] is not None else None for r in rows]
    assert out.column("image_blank").to_pylist() == blank
    norm = np.float32([0.485, 0.456, 0.406, 0.229, 0.224, 0.225]).tolist()
    assert out.column("image_norm").to_pylist() == [None if r["image"] is None else norm for r in rows]
    got = list(iter_train_batches(_Batches([out]), vocab, len(rows)))[0]
    expected = collate([build_example(TASKS[r["task"]], r, vocab, pcfg) for r in rows], vocab.pad_id)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
    assert got["patch_images"][2, :, 8:24, 8:24].eq(0).all() and got["patch_images"][2, :, :8].ne(0).any()



def test_uint8_rows_under_different_norms_are_normalised_one_by_one():
    """collate_rows normalises a batch once when every image shares a mean/std; rows of two corpora (two norms),
    a blanked row and a row without an image still get exactly their own normalisation."""
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(3)]
    a, b = (0.5, 0.5, 0.5, 0.5, 0.5, 0.5), (0.485, 0.456, 0.406, 0.229, 0.224, 0.225)

    def stream_row(i, image, norm, blank=False):
        return StreamRow(i, f"r{i}", "caption", {"source": [5, 6], "prev_output": [0, 7], "target": [7, 2],
                                                  "image": image, "image_norm": norm, "image_blank": blank})

    def expected(image, norm, blank=False):
        out = normalize_pixels(image, PreprocessConfig(mean=norm[:3], std=norm[3:]))
        return blank_centre(out) if blank else out

    for norms in ((a, a, a), (a, b, a)):  # one norm: the batch path; two: row by row
        rows = [stream_row(0, pixels[0], norms[0]), stream_row(1, pixels[1], norms[1], blank=True),
                stream_row(2, None, None), stream_row(3, pixels[2], norms[2])]
        got = collate_rows(rows, pad_id=1)["patch_images"]
        assert got.dtype == torch.float32
        assert torch.equal(got[0], expected(pixels[0], norms[0]))
        assert torch.equal(got[1], expected(pixels[1], norms[1], blank=True)) and got[1, :, 2:6, 2:6].eq(0).all()
        assert torch.equal(got[2], torch.zeros(3, 8, 8))
        assert torch.equal(got[3], expected(pixels[2], norms[2]))

# ---------------------------------------------------------------------------------------------------------
# With Ray and S3


@pytest.mark.timeout(RAY_TIMEOUT)
def test_batches_from_s3_equal_direct_preprocessing_and_bad_rows_are_counted(run, vocab, corpus):
    output, plan = run
    assert output.schema().base_schema.field("image").type == pa.large_list(pa.uint8())  # the default ships pixels
    it = iter_train_batches(output, vocab, 4, info=plan.info, with_meta=True, options=_opts(0.6))
    ids, batches = consume(it)
    rows = by_id()
    assert ids == expected_order(plan)  # every good row once, in the seeded shard order (preserve_order)
    for batch in batches:
        samples = [build_example(TASKS[rows[i]["task"]], rows[i], vocab, PCFG, train=True,
                                 rng=np.random.default_rng([SEED, EPOCH, seq]))  # the pipeline's per-row seed
                   for i, seq in zip(batch["ids"], batch["seqs"], strict=True)]
        expected = collate(samples, vocab.pad_id)
        assert set(batch) == set(expected) | {"ids", "tasks", "seqs", "image_sizes"}
        for key, value in expected.items():
            assert value.dtype == batch[key].dtype and torch.equal(value, batch[key]), key
        assert batch["image_sizes"] == [None if rows[i]["image"] is None else (16, 16) for i in batch["ids"]]
    mixed = [b for b in batches if "patch_masks" in b and not b["patch_masks"].all()]
    assert mixed and all(b["patch_images"][~b["patch_masks"]].eq(0).all() for b in mixed)  # text-only rows
    assert_expected_stats(it.stats)
    examples = it.stats.examples
    assert set(examples["bad_box"]) == {"bad/inverted_box", "bad/outside_box"}
    assert examples["unreadable_shard"] == [storage.join(corpus, "train-caption-garbage.parquet")]
    assert set(examples["bad_type"]) == set(TYPED_IDS)
    assert it.stats.bad_by_task["vqa"] == 5 + 3 and it.stats.bad_by_task["caption"] == 1 + GARBAGE_ROWS


@pytest.mark.timeout(RAY_TIMEOUT)
def test_preprocessing_fused_into_read_tasks_gives_the_same_rows(run, corpus, vocab):
    output, plan = run
    tasks = build_dataset(config(corpus, seed=SEED, preprocess_on="tasks"), vocab, train=True, plan=plan)
    assert "ActorPool" not in str(tasks)  # no actor to start: the map runs in the read tasks' workers

    def rows(ds):
        return sorted(ds.take_all(), key=lambda r: r["seq"])

    got, want = rows(tasks), rows(output)
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 31  # good rows and markers
    for a, b in zip(got, want, strict=True):  # every column, images byte for byte
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            same = np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
            assert same, (a["id"], key)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_bad_row_threshold(run, vocab):
    output, _ = run
    with pytest.raises(BadDataError) as err:
        list(iter_train_batches(output, vocab, 4, options=_opts(0.01)))
    assert err.value.stats.bad == 18 and err.value.stats.rows == 35 and err.value.threshold == 0.01
    message = str(err.value)
    assert "18 of 35 rows (51.43%)" in message and "bad_row_threshold=1.00%" in message
    assert "unreadable_shard 5" in message and "at the end of the epoch" in message
    with pytest.raises(BadDataError, match="after the first"):  # early: 10+ rows seen, > 3 x 10% bad
        list(iter_train_batches(output, vocab, 4, options=_opts(0.1, 10)))
    assert len(list(iter_train_batches(output, vocab, 4, options=_opts(0.52)))) == 5  # 51.4% <= 52%


@pytest.mark.timeout(RAY_TIMEOUT)
def test_local_shuffle_is_seeded(run, vocab):
    output, _ = run
    def order(seed):
        return consume(iter_train_batches(output, vocab, 4, with_meta=True,
                                          options=_opts(None, local_shuffle_buffer=8, seed=seed)))[0]

    first = order(1)
    assert order(1) == first and sorted(first) == sorted(by_id())
    assert order(2) != first


@pytest.mark.timeout(RAY_TIMEOUT)
def test_resume_in_the_consumer(run, vocab):
    output, plan = run
    it = iter_train_batches(output, vocab, 4, info=plan.info, with_meta=True, options=_opts(None))
    seen = []
    for k, batch in enumerate(it):
        seen += batch["ids"]
        if k == 1:
            state = ResumeState.from_dict(json.loads(json.dumps(it.resume_state().to_dict())))
            break  # "crash" after two batches
    rest = iter_train_batches(output, vocab, 4, info=plan.info, with_meta=True, resume=state, options=_opts(None))
    after, _ = consume(rest)
    assert seen + after == expected_order(plan)  # nothing lost, nothing twice, same order
    assert_expected_stats(rest.stats)  # bad rows seen before the crash are not counted twice
    assert rest.resume_state().consumed == ((0, 35),)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_epoch_batches_of_one_corpus_build_its_dataset_and_resume(corpus, vocab, ray_cluster):
    cfg = config(corpus, seed=SEED)
    plan = plan_epoch(cfg, train=True, epoch=EPOCH)
    assert epoch_plans(cfg, train=True, epoch=EPOCH) == {"data": plan}
    it = epoch_batches(cfg, vocab, train=True, epoch=EPOCH, with_meta=True)  # the Dataset built inside
    ids, _ = consume(it)
    assert ids == expected_order(plan)
    assert_expected_stats(it.stats)  # the config's rule (threshold 0.6) let the epoch through
    with pytest.raises(BadDataError, match="bad_row_threshold=1.00%"):  # the options given replace the config's
        list(epoch_batches(cfg, vocab, train=True, plans={"data": plan},
                           options=ConsumerOptions.of(cfg.replace(bad_row_threshold=0.01))))
    given = epoch_batches(cfg, vocab, train=True, plans={"data": plan}, with_meta=True)
    first = next(iter(given))["ids"]
    state = ResumeState.from_dict(json.loads(json.dumps(given.resume_state().to_dict())))
    rest = epoch_batches(cfg, vocab, train=True, epoch=EPOCH, resume=state, with_meta=True)  # the source skips
    assert first + consume(rest)[0] == expected_order(plan)
    assert_expected_stats(rest.stats)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_epoch_batches_of_a_mixture_read_one_corpus_per_task(corpus, vocab, ray_cluster):
    cfg = config(corpus, seed=SEED)
    weights = {"vqa": 3, "caption": 1}
    assert {n: c.tasks for n, c in corpora(cfg, weights).items()} == {"caption": ("caption",), "vqa": ("vqa",)}
    plans = epoch_plans(cfg, weights, train=True, epoch=EPOCH)
    built = epoch_batches(cfg, vocab, train=True, mixture=weights, plans=plans, with_meta=True)
    names, ids = [], []
    for b in built:
        names += b["sources"]
        ids += b["ids"]
        assert b["tasks"] == b["sources"]  # each source is its task's corpus
    # the mixture ends when its first source runs out: caption's 4 good rows at a quarter of the slots
    assert names.count("caption") == EXPECTED_OK["caption"] and names.count("vqa") <= EXPECTED_OK["vqa"]
    assert {n: set(s.ok_by_task) for n, s in built.stats_by_source.items()} == {"caption": {"caption"},
                                                                                "vqa": {"vqa"}}
    # a worker's part of a mixture: its part of every corpus (`plan_part`), the other worker's rows never read
    for rank in range(2):
        # options without the rule: a part alone may be over it (training workers apply it to all parts together)
        mine = epoch_batches(cfg, vocab, train=True, mixture=weights, plans=plans, part=(rank, 2), with_meta=True,
                             options=_opts(None))
        seqs = [(n, q) for b in mine for n, q in zip(b["sources"], b["seqs"], strict=True)]
        assert seqs and all(q in plan_part(plans[n].total_rows, SeqSet(), rank, 2) for n, q in seqs)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_shard_deleted_between_planning_and_reading_is_counted_and_the_epoch_goes_on(s3_server, vocab,
                                                                                       ray_cluster):
    """A shard the plan holds is gone from the store when the epoch reads it: its rows are unreadable_shard rows
    (the shard's URI the example), every other row is read, and the bad-row rule decides whether the epoch
    fails."""
    uri = s3_server.uri("vanishing")
    rows = [row(f"cap/{i}", "caption", image=png((10, 20 * i, 30)), target=f"a shape number {i}") for i in range(12)]
    write_corpus(rows, uri, shard_bytes=600, row_group_rows=2)
    cfg = config(uri)
    plans = epoch_plans(cfg, train=False)
    shards = plans[SINGLE].shards
    assert len(shards) >= 3, shards
    gone = shards[1]
    fs, path = storage.resolve(gone.uri)
    lost = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
    storage.delete_file(gone.uri)  # after planning, before reading
    assert not storage.exists(gone.uri)
    it = epoch_batches(cfg, vocab, train=False, plans=plans, with_meta=True, options=_opts(0.5))
    ids, _ = consume(it)
    assert sorted(ids) == sorted(r["id"] for r in rows if r["id"] not in lost) and len(lost) == gone.num_rows
    assert it.stats.bad_by_reason == {"unreadable_shard": gone.num_rows} and it.stats.ok == 12 - gone.num_rows
    assert it.stats.examples["unreadable_shard"] == [gone.uri]
    with pytest.raises(BadDataError, match="unreadable_shard"):  # a rule it breaks still stops the epoch
        list(epoch_batches(cfg, vocab, train=False, plans=plans, options=_opts(0.01, early_check_rows=4)))


@pytest.fixture(scope="module")
def two_corpora(s3_server) -> tuple[str, str]:
    """Two corpora converted apart: captions in one, VQA (with a split of its own) in the other."""
    captions, questions = s3_server.uri("mix-captions"), s3_server.uri("mix-vqa")
    write_corpus([row(f"cap/{i}", "caption", image=png((10, 20 * i, 30)), target=f"a shape number {i}")
                  for i in range(12)], captions, shard_bytes=600, row_group_rows=2)
    write_corpus([row(f"q/{i}", "vqa", split="trainval", image=png((30 * i, 10, 10)), text=f"what is {i}?",
                      target="red", targets=["red"], target_weights=[1.0]) for i in range(20)],
                 questions, shard_bytes=600, row_group_rows=2)
    return captions, questions


def test_a_mixture_reads_each_task_from_its_own_corpus(two_corpora):
    captions, questions = two_corpora
    cfg = config(captions, sources={"vqa": SourceSection(questions, ("trainval",))})
    got = corpora(cfg, {"caption": 1, "vqa": 2})
    assert {n: (c.uri, c.splits, c.tasks, c.sources) for n, c in got.items()} == {
        "caption": (captions, ("train",), ("caption",), {}), "vqa": (questions, ("trainval",), ("vqa",), {})}
    manifests = read_manifests(cfg, {"caption": 1, "vqa": 2})
    assert set(manifests) == {captions, questions}
    expected = hashlib.sha256("\n".join(f"{u}\t{manifests[u].fingerprint}"
                                         for u in sorted(manifests)).encode()).hexdigest()
    assert data_fingerprint(manifests) == "corpora-sha256:" + expected
    assert data_fingerprint({captions: manifests[captions]}) == manifests[captions].fingerprint
    with pytest.raises(ValueError, match=r"data\.sources\.grounding: not a task of the mixture \(caption, vqa\)"):
        corpora(config(captions, sources={"grounding": SourceSection(questions)}), {"caption": 1, "vqa": 2})
    with pytest.raises(ValueError, match=r"data\.sources \(vqa\) is for a mixture's tasks"):
        corpora(cfg)


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_two_corpus_mixture_resumes_each_source_where_it_stopped(two_corpora, vocab, ray_cluster):
    """Stopped after its first batch, the mixture resumed from its saved state yields exactly the rows an
    uninterrupted run yields after that batch: each corpus's position is kept."""
    captions, questions = two_corpora
    cfg = config(captions, seed=SEED, sources={"vqa": SourceSection(questions, ("trainval",))})
    weights = {"caption": 1, "vqa": 3}
    plans = epoch_plans(cfg, weights, train=True, epoch=EPOCH, manifests=read_manifests(cfg, weights))

    def batches(**kw):
        return epoch_batches(cfg, vocab, train=True, mixture=weights, plans=plans, with_meta=True,
                             options=_opts(None, seed=5), **kw)

    whole = [(n, i) for b in batches() for n, i in zip(b["sources"], b["ids"], strict=True)]
    assert {n for n, _ in whole} == {"caption", "vqa"}
    assert all(i.startswith("cap/" if n == "caption" else "q/") for n, i in whole)  # each from its corpus
    assert sum(n == "vqa" for n, _ in whole) == 20  # the epoch ends when its first source (VQA) runs out
    first = batches()
    head = next(iter(first))
    state = MixtureState.from_dict(json.loads(json.dumps(first.resume_state().to_dict())))
    rest = batches(resume=state)
    tail = [(n, i) for b in rest for n, i in zip(b["sources"], b["ids"], strict=True)]
    assert list(zip(head["sources"], head["ids"], strict=True)) + tail == whole


@pytest.mark.timeout(300)
def test_two_workers_read_disjoint_parts_and_resume_from_their_merged_position(corpus, vocab, ray_cluster):
    """Two training workers each read their part of the epoch (`part=(rank, 2)`): disjoint, together the epoch.
    Stopped after a batch each, their positions merged as a checkpoint merges them, the epoch resumes on two
    workers or on three: every good row is delivered once over both runs and every bad row counted once."""
    from pipelines.train.checkpointing import merge_positions, worker_resume

    cfg = config(corpus, seed=SEED, preprocess_on="tasks")
    plan = plan_epoch(cfg, train=True, epoch=EPOCH)
    want = expected_order(plan)

    def read(rank: int, world: int, resume=None, stop_after: int | None = None):
        it = epoch_batches(cfg, vocab, train=True, plans={"data": plan}, part=(rank, world), resume=resume,
                           with_meta=True, options=_opts(None))
        ids = []
        for batch in it:
            ids += batch["ids"]
            if stop_after is not None and len(ids) >= stop_after:
                break  # "crash"
        return ids, it.resume_state()

    whole = [read(rank, 2) for rank in range(2)]
    assert whole[0][0] + whole[1][0] == want  # rank 0 the first half of the plan's rows, rank 1 the second
    assert whole[0][0] and whole[1][0]
    merged = ResumeState.merge([state for _, state in whole])
    assert merged.consumed == ((0, plan.total_rows),)
    assert_expected_stats(merged.row_stats())

    stopped = [read(rank, 2, stop_after=4) for rank in range(2)]
    first = stopped[0][0] + stopped[1][0]
    assert len(first) == 8 and not set(stopped[0][0]) & set(stopped[1][0])
    state = json.loads(json.dumps({"epoch": EPOCH, "epoch_done": False,  # what a checkpoint keeps of it
                                   "data": merge_positions([s for _, s in stopped], mixture=False)}))
    for world in (2, 3):
        rest = [read(rank, world, resume=worker_resume(state, EPOCH, rank)) for rank in range(world)]
        ids = [i for part, _ in rest for i in part]
        assert sorted(first + ids) == sorted(want) and len(first + ids) == len(want)  # once each
        assert all(part for part, _ in rest)
        final = ResumeState.merge([s for _, s in rest])
        assert final.consumed == ((0, plan.total_rows),)
        assert_expected_stats(final.row_stats())  # the bad rows read before the stop are counted once


@pytest.mark.timeout(RAY_TIMEOUT)
def test_mixture_realises_weights_reproducibly_and_resumes(run, vocab):
    output, _ = run
    sources = {task: output.filter(lambda r, t=task: r["task"] == t).materialize() for task in ("vqa", "caption")}
    weights = {"vqa": 3, "caption": 1}

    def run(**kw):
        it = iter_mixture_batches(sources, weights, vocab, 4, num_rows=8, block=4, with_meta=True,
                                  options=_opts(None, seed=11), **kw)
        batches = list(it)
        return [s for b in batches for s in b["sources"]], [i for b in batches for i in b["ids"]], it

    names, ids, it = run()
    assert names.count("vqa") == 6 and names.count("caption") == 2  # 3:1 in every block of 4
    assert [names[i:i + 4].count("vqa") for i in (0, 4)] == [3, 3]
    assert all(i.startswith(n + "/") for n, i in zip(names, ids, strict=True))
    assert run()[:2] == (names, ids)  # same seed, same rows in the same order
    assert it.stats_by_source["vqa"].ok == 6 and it.stats_by_source["caption"].ok == 2 and it.stats.ok == 8
    assert set(it.stats_by_source["vqa"].bad_by_reason) <= {"truncated_image", "not_an_image", "image_too_large",
                                                  "missing_field", "empty_text", "bad_type"}

    first = iter_mixture_batches(sources, weights, vocab, 4, num_rows=8, block=4, with_meta=True,
                                 options=_opts(None, seed=11))
    head = next(iter(first))["ids"]
    state = MixtureState.from_dict(json.loads(json.dumps(first.resume_state().to_dict())))
    _, tail, _ = run(resume=state)
    assert head + tail == ids


@pytest.mark.timeout(RAY_TIMEOUT)
def test_doctor_prints_exact_json(corpus, tmp_path, capsys, caplog, ray_cluster):
    caplog.set_level(logging.INFO, logger="pipelines.data.batches")
    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(yaml.safe_dump({**config(corpus).to_dict(), "bad_row_threshold": 0.01}))
    inspect_data.main(["--config", str(cfg_path), "--input", corpus, "--task", "vqa"])
    # the progress helper's last line: rows seen of the manifest's, the bad rows so far, rate and ETA
    last = [m for m in caplog.messages if " rows/s" in m][-1]
    assert ": 14/14 rows (100%), 8 bad, " in last and last.endswith(", ETA 0m00s")
    report = json.loads(capsys.readouterr().out)
    assert report["rows_in_manifest"] == 14 and report["rows_seen"] == 14
    assert report["rows_ok"] == 6 and report["rows_bad"] == 8 and report["over_threshold"] is True
    assert report["ok_by_task"] == {"vqa": 6}
    assert report["bad_by_reason"] == {"bad_type": 3, "empty_text": 1, "image_too_large": 1, "missing_field": 1,
                                       "not_an_image": 1, "truncated_image": 1}
    assert report["bad_examples"]["missing_field"] == ["bad/missing_text"]
    assert report["rows_per_s"] > 0


class _Blocks:
    """Stands in for a Ray DataIterator: yields prepared output tables."""

    def __init__(self, tables):
        self.tables = tables

    def iter_batches(self, **kw):
        yield from self.tables


def _marker(seq, span):
    schema = output_schema()
    row = {"task": "caption", "seq": seq, "span": span, "ok": False, "reason": "unreadable_shard",
           "detail": "s3://b/x.parquet: OSError"}
    return pa.Table.from_pydict({n: [row.get(n)] for n in schema.names}, schema=schema)


@pytest.mark.parametrize("consumed", [((0, 50),), ((50, 100),), ((20, 30), (60, 70))])
def test_resumed_consumer_counts_each_row_of_a_marker_once(consumed):
    before = sum(b - a for a, b in consumed)
    state = ResumeState(0, "k", consumed, RowStats(ok=before, ok_by_task={"caption": before}).to_dict())
    it = iter_train_batches(_Blocks([_marker(0, 100)]), 0, 4, info=EpochInfo("k", 0, 100), resume=state,
                            options=_opts(None))
    list(it)
    assert it.stats.rows == 100 and it.stats.bad == 100 - before
    assert it.resume_state().consumed == ((0, 100),)


def test_an_unreadable_shard_first_does_not_fail_an_epoch_that_stays_under_the_threshold():
    # 10 of 1000 rows in one unreadable shard arriving first: 1.0% is not over a 1% threshold
    it = iter_train_batches(_Blocks([_marker(0, 10)]), 0, 4, info=EpochInfo("k", 0, 1000), options=_opts(0.01, 5))
    with pytest.raises(BadDataError, match="at the end of the epoch"):  # not early: only 10 rows exist here
        list(it)
    assert it.stats.bad == 10


# ---------------------------------------------------------------------------------------------------------
# One consumer for single corpora and mixtures: the same bad-row rule


def _good(seqs, prefix="a"):
    """Preprocessed good rows (text-only) at positions `seqs`, as the actors ship them."""
    schema = output_schema()
    rows = [{"id": f"{prefix}/{s}", "task": "glue_sst2", "seq": s, "span": 1, "ok": True, "source": [0, 10 + s % 7, 2],
             "prev_output": [0, 5], "target": [5, 2], "target_weight": 1.0, "code_mask": False} for s in seqs]
    return pa.Table.from_pylist(rows, schema=schema)


def _shard_first(prefix="a"):
    """200 rows: an unreadable 2-row shard first (1% of the epoch), then 198 good rows in blocks of 50."""
    return _Blocks([_marker(0, 2)] + [_good(range(a, min(a + 50, 200)), prefix) for a in range(2, 200, 50)])


INFO_A, INFO_B = EpochInfo("a", 0, 200), EpochInfo("b", 0, 200)


def _single(threshold, **kw):
    return iter_train_batches(_shard_first(), 1, 8, info=INFO_A, options=_opts(threshold, 1),
                              with_meta=True, **kw)


def _mixture_of_one(threshold, **kw):
    return iter_mixture_batches({"a": _shard_first()}, {"a": 1}, 1, 8, infos={"a": INFO_A},
                                options=_opts(threshold, 1), with_meta=True, **kw)


def test_a_mixture_does_not_fail_early_on_one_unreadable_shard_like_a_single_corpus():
    # 2 of 200 rows bad (1.0%): under a 1% threshold, although the unreadable shard comes first
    single, mixture = _single(0.01), _mixture_of_one(0.01)
    single_ids, single_batches = consume(single)
    mixture_ids, mixture_batches = consume(mixture)
    assert single_ids == mixture_ids == [f"a/{s}" for s in range(2, 200)]
    assert all(b["sources"] == ["a"] * len(b["ids"]) for b in mixture_batches)
    for s, m in zip(single_batches, mixture_batches, strict=True):
        assert torch.equal(s["src_tokens"], m["src_tokens"]) and s["seqs"] == m["seqs"]
    assert single.stats.to_dict() == mixture.stats.to_dict() == mixture.stats_by_source["a"].to_dict()
    assert single.stats.ok == 198 and single.stats.bad_by_reason == {"unreadable_shard": 2}
    assert mixture.resume_state().sources["a"] == single.resume_state()
    assert single.resume_state().consumed == ((0, 200),)


def test_a_mixture_fails_early_exactly_when_a_single_corpus_does():
    # 2 bad rows > 0.5% of 200: the epoch cannot stay under the threshold, known after the first marker
    errors = []
    for it in (_single(0.005), _mixture_of_one(0.005)):
        with pytest.raises(BadDataError, match="after the first 2 rows") as err:
            list(it)
        errors.append(err.value)
    assert [e.stats.to_dict() for e in errors][0] == errors[1].stats.to_dict()
    assert errors[0].stats.bad == 2 and errors[0].stats.ok == 0


def test_a_mixture_stopped_before_a_source_ends_gives_that_source_the_early_check_only():
    # source a: the unreadable shard first; the mixture stops after 40 good rows, 20 from each source, when
    # a's bad fraction so far (2 of 22) is far over 1% but its epoch (2 of 200) can still stay under it
    it = iter_mixture_batches({"a": _shard_first("a"), "b": _Blocks([_good(range(200), "b")])}, {"a": 1, "b": 1}, 1,
                              8, infos={"a": INFO_A, "b": INFO_B}, num_rows=40, block=2, options=_opts(0.01, 1),
                              with_meta=True)
    ids, batches = consume(it)
    assert len(ids) == 40 and [s for b in batches for s in b["sources"]].count("a") == 20
    assert it.stats_by_source["a"].bad == 2 and it.stats_by_source["a"].ok == 20
    assert it.stats.ok == 40 and it.stats.bad == 2
    state = it.resume_state()
    assert state.slots == 40 and state.sources["a"].consumed == ((0, 22),)
    assert state.sources["b"].consumed == ((0, 20),)


class _SlowStart(_Blocks):
    """A source whose first block waits until every source of the mixture has asked for its first block (a
    Ray Data execution takes seconds to start: a mixture must not start its sources one after another)."""

    def __init__(self, tables, barrier: threading.Barrier):
        super().__init__(tables)
        self.barrier = barrier

    def iter_batches(self, **kw):
        self.barrier.wait(timeout=10)  # BrokenBarrierError when the sources start one at a time
        yield from self.tables


def test_a_mixture_starts_all_its_sources_side_by_side():
    barrier = threading.Barrier(3)
    sources = {n: _SlowStart([_good(range(50), n)], barrier) for n in "abc"}
    it = iter_mixture_batches(sources, {"a": 4, "b": 1, "c": 1}, 1, 8, num_rows=16, block=6, with_meta=True)
    ids, batches = consume(it)
    assert len(ids) == 16 and not barrier.broken
    assert [s for b in batches for s in b["sources"]].count("a") > 8  # the schedule is unchanged by the start
    assert {n: st.ok for n, st in it.stats_by_source.items()} == {
        n: sum(s == n for b in batches for s in b["sources"]) for n in "abc"}  # a fetched first row is not counted


# ---------------------------------------------------------------------------------------------------------
# Only input errors count as bad rows


def test_a_bug_in_preprocessing_raises_instead_of_counting_a_bad_row(vocab, monkeypatch):
    from ofa_model.errors import InputError
    from ofa_model.tasks import TaskInputError
    from pipelines.data import ingest

    good = normalize_row(good_rows()[-1])  # glue_sst2, text only
    source = pa.Table.from_pylist([{**good, "seq": 0, "span": 1}], schema=SOURCE_SCHEMA)
    udf = _Preprocess(vocab, PCFG, TASKS, train=False, seed=0, epoch=0, image_dtype="uint8")
    def raising(exc):
        def build_example(*args, **kwargs):
            raise exc

        return build_example

    for bug in (RuntimeError("bug in our code"), ValueError("bug in our code"), TypeError("bug in our code")):
        monkeypatch.setattr(ingest, "build_example", raising(bug))
        with pytest.raises(type(bug), match="bug in our code"):
            ingest.preprocess_row(TASKS["glue_sst2"], good, vocab, PCFG, train=False, rng=None)
        with pytest.raises(type(bug), match="bug in our code"):
            udf(source)
    for bad, reason in ((TaskInputError("no box", "bad_box"), "bad_box"), (InputError("odd row"), "bad_row")):
        monkeypatch.setattr(ingest, "build_example", raising(bad))
        out = udf(source)
        assert out.column("ok").to_pylist() == [False] and out.column("reason").to_pylist() == [reason]
        assert out.column("detail").to_pylist() == [f"{type(bad).__name__}: {bad}"]


def test_a_box_in_the_margin_outside_the_image_is_a_bad_row_in_training(vocab):
    """grounding_train_augment used to raise a plain ValueError for it (a crash once only input errors count)."""
    from pipelines.data.ingest import preprocess_row

    grounding = normalize_row(row("g/0", "grounding", image=png((1, 2, 3)), text="it", box=[-1.0, 2.0, -0.5, 10.0]))
    sample, reason, detail = preprocess_row(TASKS["grounding"], grounding, vocab, PCFG, train=True,
                                            rng=np.random.default_rng(0))
    assert sample is None and reason == "bad_box" and "empty inside the 16x16 image" in detail


@pytest.mark.timeout(RAY_TIMEOUT)
def test_a_bug_fails_the_ray_pipeline(corpus, vocab, ray_cluster):
    # a broken TaskSpec (a format code str does not have) is our bug: a ValueError that is not an InputError.
    # TaskSpec refuses such a prompt when built, so the bug is planted past its check
    broken = TASKS["glue_sst2"].replace()
    object.__setattr__(broken, "prompt", broken.prompt + "{text:q}")
    cfg = config(corpus, tasks=("glue_sst2",))
    ds = build_dataset(cfg, vocab, train=False, specs={**TASKS, "glue_sst2": broken})
    with pytest.raises(Exception, match="Unknown format code 'q'") as err:
        list(iter_train_batches(ds, vocab, 4, options=_opts(None)))
    assert not isinstance(err.value, BadDataError)


def test_read_blocks_are_sized_by_their_preprocessed_bytes():
    """Large images get small blocks (one 256-row block of 480x480 pixels is 177 MB: it held one actor's output
    past the object store's budget while the other actor idled); small ones keep the 256-row cap."""
    from ofa_model.preprocess import PreprocessConfig
    from pipelines.data.data_config import read_block_rows

    def rows(size, dtype="uint8", per_map=16, fixed=None):
        return read_block_rows(DataConfig(uri="s3://b/c", preprocess=PreprocessConfig(patch_image_size=size),
                                          image_dtype=dtype, rows_per_map_batch=per_map, rows_per_read_block=fixed))

    assert rows(480) == 32 and rows(480, per_map=32) == 32 and rows(480, "float32") == 16  # 24 MB / 691 KB = 36
    assert rows(256) == 128 and rows(64) == 256 and rows(64, per_map=300) == 300  # never below one map batch
    assert rows(480, fixed=7) == 7  # an explicit setting wins
    with pytest.raises(ValueError, match="rows_per_read_block"):
        DataConfig(uri="s3://b/c", rows_per_read_block=0)


def test_the_scheduling_loop_throttle_keeps_a_step_to_its_minimum_period(monkeypatch):
    """A step that returns at once sleeps the rest of the period; one that already took it is not slowed."""
    from pipelines.data import ingest

    now, slept = [100.0], []

    class Clock:
        @staticmethod
        def monotonic():
            return now[0]

        @staticmethod
        def sleep(s):
            slept.append(s)
            now[0] += s

    monkeypatch.setattr(ingest, "time", Clock)
    throttle = ingest.IdleLoopThrottle()
    period = ingest.IdleLoopThrottle.MIN_PERIOD_S
    throttle.on_execution_step(None)  # the first step: long after the (zero) start
    assert slept == []
    now[0] += 0.004  # a spinning step: 4 ms of bookkeeping, no task to wait on
    throttle.on_execution_step(None)
    assert slept == [pytest.approx(period - 0.004)]
    now[0] += period + 0.01  # a step that waited on a running task for longer than the period
    throttle.on_execution_step(None)
    assert len(slept) == 1
