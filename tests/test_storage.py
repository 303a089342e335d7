"""Tests for pipelines.storage (local, file://, s3:// on SeaweedFS) and pipelines.data.shards (canonical corpus)."""

import hashlib
import json
import pickle
import struct

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.data.schema import FIELDS, normalize_row, row_digest
from pipelines.data.shards import (
    Manifest,
    ShardWriter,
    iter_rows,
    read_manifest,
    row_nbytes,
    write_corpus,
)
from pipelines.storage import S3Options

# --- storage ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "file", "s3"])
def base_uri(request, tmp_path):
    """An empty directory as a plain path, a file:// URI and an s3:// prefix on the test server."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    return request.getfixturevalue("s3_server").uri("store")


def test_storage_round_trip(base_uri):
    data = bytes(range(256)) * 3
    a = storage.join(base_uri, "a", "b.bin")
    c = storage.join(base_uri, "c.txt")
    assert not storage.exists(a)
    storage.write_bytes(a, data)
    storage.write_bytes(c, b"hello")
    assert storage.exists(a) and storage.exists(c)
    assert storage.read_bytes(a) == data
    assert storage.read_bytes(c) == b"hello"
    assert storage.list_files(base_uri) == [a, c]
    assert storage.list_files(base_uri, suffix=".txt") == [c]
    assert storage.list_files(a) == [a]  # a file lists as itself
    storage.write_bytes(c, b"bye")  # overwrite
    assert storage.read_bytes(c) == b"bye"
    storage.delete_file(c)
    assert not storage.exists(c)
    assert storage.list_files(base_uri) == [a]


def test_file_sizes_and_a_checked_copy_find_what_did_not_arrive_whole(base_uri, tmp_path):
    local = tmp_path / "ckpt"
    (local / "bundle").mkdir(parents=True)
    (local / "state.pt").write_bytes(b"s" * 1000)
    (local / "bundle" / "model.safetensors").write_bytes(b"w" * 300)
    (local / "summary.json").write_text("{}")
    dest = storage.join(base_uri, "ckpt")
    fs, path = storage.resolve(dest)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert storage.file_sizes(dest) == {storage.join(dest, "state.pt"): 1000,
                                        storage.join(dest, "bundle", "model.safetensors"): 300,
                                        storage.join(dest, "summary.json"): 2}
    storage.check_copied(local, fs, path)  # whole: no error
    storage.delete_file(storage.join(dest, "bundle", "model.safetensors"))  # an upload cut short...
    storage.write_bytes(storage.join(dest, "state.pt"), b"s" * 999)  # ...or a file written in part
    with pytest.raises(OSError, match=r"ckpt incomplete: bundle/model.safetensors, state.pt missing or cut short"):
        storage.check_copied(local, fs, path)


def test_storage_errors_name_the_uri(base_uri):
    missing = storage.join(base_uri, "nope", "x.bin")
    with pytest.raises(FileNotFoundError, match="nope/x.bin"):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.list_files(storage.join(base_uri, "nope"))
    with pytest.raises(FileNotFoundError, match="nope/x.bin"):
        storage.delete_file(missing)


def test_join_and_resolve(tmp_path):
    assert storage.join("s3://b/corpus/", "/x/", "y.json") == "s3://b/corpus/x/y.json"
    assert storage.join("s3://", "b", "k") == "s3://b/k"
    assert storage.join("/data", "a") == "/data/a"
    fs, path = storage.resolve(f"file://{tmp_path}/x/../y")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/y"
    fs, path = storage.resolve("s3://bucket/some/key/", S3Options(endpoint_url="http://127.0.0.1:9", region="eu-west-1"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key"
    opts = fs.__reduce__()[1][0]
    assert (opts["scheme"], opts["endpoint_override"], opts["region"]) == ("http", "127.0.0.1:9", "eu-west-1")
    assert opts["access_key"] is None and opts["secret_key"] is None  # credentials stay in the environment
    for bad in ("gs://bucket/x", "file://otherhost/x", "s3://", ""):
        with pytest.raises(ValueError):
            storage.resolve(bad)
    with pytest.raises(ValueError, match="http"):
        storage.resolve("s3://b/k", S3Options(endpoint_url="127.0.0.1:9000"))


def test_s3_options_override_the_environment(s3_server, monkeypatch):
    uri = storage.join(s3_server.uri("override"), "f.bin")
    storage.write_bytes(uri, b"abc")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    assert storage.read_bytes(uri, S3Options(endpoint_url=s3_server.endpoint, region="us-east-1")) == b"abc"


def test_resolved_s3_filesystem_pickles_without_credentials(s3_server):
    fs, _ = storage.resolve(s3_server.uri())
    blob = pickle.dumps(fs)
    assert b"testsecret" not in blob


def test_redact_hides_secrets():
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    key_id = "AKIAIOSFODNN7EXAMPLE"
    text = (
        f"aws_access_key_id={key_id} aws_secret_access_key={secret} "
        f"url=https://alice:hunter2@example.com/x "
        f'json {{"SecretAccessKey": "abc123", "SessionToken": "tok"}} password: pw1 lone {secret}. {key_id}'
    )
    out = storage.redact(text)
    for leaked in (secret, key_id, "hunter2", "alice", "abc123", "tok\"", "pw1"):
        assert leaked not in out, leaked
    assert "https://***@example.com/x" in out
    assert '"SecretAccessKey": "***"' in out
    # ordinary text, URIs and hex digests are left alone
    keep = "s3://test-bucket/corpus/train-vqa-00000.parquet sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12 ok"
    assert storage.redact(keep) == keep


# --- canonical rows and shards ----------------------------------------------------------------------------

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(992)  # 1000 bytes; shards store image bytes as given


def make_row(i: int, split: str = "train", task: str = "vqa", **extra) -> dict:
    row = {
        "id": f"ds/{split}/{i:03d}",  # 10 characters
        "task": task,
        "split": split,
        "dataset": "ds",
        "image": IMAGE,
        "text": f"q{i:03d}",
        "target": "red",
        "targets": ["red", "blue"],
        "target_weights": [0.3, 1.0],
    }
    row.update(extra)
    return row


def test_row_nbytes_is_the_raw_size():
    row = normalize_row(make_row(1))
    # id 12 + task 3 + split 5 + dataset 2 + image 1000 + text 4 + target 3 + targets (3+4 + 4*2) + weights 4*2
    assert row_nbytes(row) == 12 + 3 + 5 + 2 + 1000 + 4 + 3 + 15 + 8


def test_shards_roll_at_shard_bytes_and_split_into_row_groups(tmp_path):
    uri = str(tmp_path / "corpus")
    # each row is 1052 raw bytes: a shard closes after the row that reaches 3500 -> 4 rows per shard
    manifest = write_corpus((make_row(i) for i in range(10)), uri, shard_bytes=3500, row_group_rows=3)
    assert [s["path"] for s in manifest.shards] == [f"train-vqa-0000{i}.parquet" for i in range(3)]
    assert [s["num_rows"] for s in manifest.shards] == [4, 4, 2]
    assert [s["num_row_groups"] for s in manifest.shards] == [2, 2, 1]
    for shard in manifest.shards:
        meta = pq.ParquetFile(f"{uri}/{shard['path']}").metadata
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert groups == ([3, 1] if shard["num_rows"] == 4 else [2])
        assert shard["num_bytes"] == (tmp_path / "corpus" / shard["path"]).stat().st_size
    assert manifest.num_rows == 10 and manifest.counts == {"train": {"vqa": 10}}
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == [
        "manifest.json", "train-vqa-00000.parquet", "train-vqa-00001.parquet", "train-vqa-00002.parquet",
    ]  # fmt: skip


def mixed_rows() -> list[dict]:
    rows = [make_row(i) for i in range(5)]
    rows += [make_row(i, split="val") for i in range(3)]
    rows += [make_row(i, task="caption", target=f"a caption {i}", targets=None, target_weights=None) for i in range(5, 9)]
    rows += [
        make_row(20, task="grounding", box=[1, 2.5, 30, 40], targets=None, target_weights=None),
        make_row(21, task="cola", image=None, text2="second", targets=None, target_weights=None),
        make_row(22, task="text_to_image", image=None, codes=[0, 5, 8191], targets=None, target_weights=None),
        make_row(
            23, split="test", task="detection", object_boxes=[[0, 0, 1, 1], [2, 2, 3, 3]], object_labels=["a", "b"],
            targets=None, target_weights=None,
        ),
    ]  # fmt: skip
    return rows


def expected_fingerprint(rows: list[dict]) -> str:
    """Independent statement of the fingerprint: sum mod 2**256 of sha256("<id>\\t<digest>\\n") per row."""
    total = 0
    for r in rows:
        line = f"{r['id']}\t{row_digest(normalize_row(r))}\n".encode()
        total += int(hashlib.sha256(line).hexdigest(), 16)
    return "sum-sha256:" + format(total % 2**256, "064x")


def test_manifest_counts_and_fingerprint(tmp_path):
    rows = mixed_rows()
    m1 = write_corpus(rows, str(tmp_path / "c1"), shard_bytes=2500, row_group_rows=2)
    assert m1.counts == {
        "test": {"detection": 1},
        "train": {"caption": 4, "cola": 1, "grounding": 1, "text_to_image": 1, "vqa": 5},
        "val": {"vqa": 3},
    }
    assert m1.num_rows == len(rows) == 16
    assert m1.fingerprint == expected_fingerprint(rows)
    # other order, other shard size, file:// -> same fingerprint
    m2 = write_corpus(list(reversed(rows)), "file://" + str(tmp_path / "c2"), shard_bytes=10**9, row_group_rows=7)
    assert len(m2.shards) < len(m1.shards)
    assert m2.fingerprint == m1.fingerprint
    # one value changed -> different fingerprint
    changed = [dict(r) for r in rows]
    changed[3]["target_weights"] = [0.3, 0.9]
    m3 = write_corpus(changed, str(tmp_path / "c3"))
    assert m3.fingerprint != m1.fingerprint
    # the manifest on disk round-trips
    assert read_manifest(str(tmp_path / "c1")) == m1
    assert Manifest.from_json(m1.to_json()) == m1
    assert json.loads((tmp_path / "c1" / "manifest.json").read_text())["fingerprint"] == m1.fingerprint


def test_row_digest_sees_every_field():
    base = normalize_row(make_row(1))
    digests = {row_digest(base)}
    variants = [
        {"text": None}, {"text": "q00"}, {"text2": "q001"}, {"image": IMAGE + b"\x00"}, {"target_weights": [0.3, 0.5]},
        {"targets": ["red", "blu"], "target_weights": [0.3, 1.0]}, {"box": [0, 0, 1, 1]}, {"codes": []},
    ]  # fmt: skip
    for change in variants:
        digests.add(row_digest(normalize_row({**make_row(1), **change})))
    assert len(digests) == len(variants) + 1


def test_iter_rows_returns_the_rows_written(tmp_path):
    rows = mixed_rows()
    uri = str(tmp_path / "corpus")
    write_corpus(rows, uri, shard_bytes=3000, row_group_rows=2)
    got = sorted(iter_rows(uri), key=lambda r: r["id"])
    want = sorted((normalize_row(r) for r in rows), key=lambda r: r["id"])
    assert got == want
    by_id = {r["id"]: r for r in got}
    first = by_id["ds/train/000"]
    assert first["target_weights"] == [struct.unpack("<f", struct.pack("<f", 0.3))[0], 1.0]  # float32 0.3
    assert first["target_weights"][0] == pytest.approx(0.3) and first["target_weights"][0] != 0.3
    assert first["image"] == IMAGE and first["text2"] is None and first["box"] is None
    assert by_id["ds/train/020"]["box"] == [1.0, 2.5, 30.0, 40.0]
    assert by_id["ds/train/022"]["codes"] == [0, 5, 8191]
    assert by_id["ds/test/023"]["object_boxes"] == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert set(first) == set(FIELDS)
    # projection and split/task selection
    assert sorted(iter_rows(uri, columns=["id", "target"], splits=["val"]), key=lambda r: r["id"]) == [
        {"id": f"ds/val/00{i}", "target": "red"} for i in range(3)
    ]
    assert [r["id"] for r in iter_rows(uri, columns=["id"], tasks=["caption"])] == [
        f"ds/train/00{i}" for i in range(5, 9)
    ]
    with pytest.raises(ValueError, match="unknown column"):
        next(iter_rows(uri, columns=["id", "caption"]))


def test_duplicate_id_is_an_error(tmp_path):
    with ShardWriter(str(tmp_path / "c")) as writer:
        writer.write(make_row(1))
        with pytest.raises(ValueError, match=r"'ds/train/001'.*duplicate id"):
            writer.write(make_row(1, task="caption"))


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"box": [1, 2, 3]}, r"row 'ds/train/001': field 'box' must be a list of 4 numbers"),
        ({"box": [1, 2, 3, float("nan")]}, r"field 'box'\[3\] must be a finite float32"),
        ({"caption": "x"}, r"row 'ds/train/001': unknown field\(s\) \['caption'\]"),
        ({"task": None}, r"row 'ds/train/001': field 'task' is required"),
        ({"split": ""}, r"field 'split' must be a non-empty string"),
        ({"text": 5}, r"field 'text' must be a str, got int"),
        ({"image": "aGVsbG8="}, r"field 'image' must be encoded image bytes, got str"),
        ({"target_weights": [1.0]}, r"field 'target_weights' has 1 entries but 'targets' has 2"),
        ({"codes": [1, 2**31]}, r"field 'codes'\[1\] must be an int32"),
        ({"targets": ["a", 3], "target_weights": None}, r"field 'targets'\[1\] must be a str"),
        ({"object_labels": ["a"]}, r"field 'object_labels' has 1 entries but 'object_boxes' has None"),
        ({"task": "v/qa"}, r"row 'ds/train/001': field 'task' = 'v/qa' must match"),
    ],
)
def test_schema_validation_names_id_and_field(tmp_path, change, pattern):
    with ShardWriter(str(tmp_path / "c")) as writer:
        with pytest.raises(ValueError, match=pattern):
            writer.write({**make_row(1), **change})


def test_failed_write_leaves_no_corpus(tmp_path):
    uri = str(tmp_path / "c")
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(uri, shard_bytes=2000) as writer:
            for i in range(5):
                writer.write(make_row(i))
            raise RuntimeError("boom")
    assert list((tmp_path / "c").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(uri)


def test_writer_refuses_an_existing_corpus(tmp_path):
    uri = str(tmp_path / "c")
    write_corpus([make_row(1)], uri)
    with pytest.raises(FileExistsError, match="already holds a corpus"):
        ShardWriter(uri)


def test_corpus_on_s3(s3_server):
    rows = mixed_rows()
    uri = s3_server.uri("corpus")
    manifest = write_corpus(rows, uri, shard_bytes=3000, row_group_rows=2)
    assert read_manifest(uri) == manifest
    assert manifest.fingerprint == expected_fingerprint(rows)
    listed = storage.list_files(uri, suffix=".parquet")
    assert listed == [storage.join(uri, s["path"]) for s in manifest.shards]
    got = sorted(iter_rows(uri), key=lambda r: r["id"])
    assert got == sorted((normalize_row(r) for r in rows), key=lambda r: r["id"])


@pytest.mark.slow
def test_ray_reads_a_canonical_shard_from_s3(s3_server, ray_cluster):
    import ray

    rows = [make_row(i, box=[i, 0, i + 1, 1] if i % 2 else None) for i in range(7)]
    rows += [make_row(i, split="val") for i in range(3)]
    uri = s3_server.uri("ray")
    write_corpus(rows, uri, shard_bytes=4000, row_group_rows=2)
    fs, _ = storage.resolve(uri)
    train = [storage.join(uri, s["path"]) for s in read_manifest(uri).select(["train"], None)]
    assert len(train) == 2
    ds = ray.data.read_parquet(train, filesystem=fs).select_columns(["id", "box"])
    got = sorted(ds.take_all(), key=lambda r: r["id"])  # one execution: Ray Data start-up is slow on 2 cores
    assert [r["id"] for r in got] == [f"ds/train/{i:03d}" for i in range(7)]
    assert [None if r["box"] is None else list(r["box"]) for r in got] == [
        None if i % 2 == 0 else [i, 0, i + 1, 1] for i in range(7)
    ]
