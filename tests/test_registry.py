"""pipelines.tracking.registry on a real MLflow (sqlite tracking + registry, artifacts on local disk)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from mlflow import MlflowClient

from pipelines.tracking.registry import ModelSourceError, promote_if_better, register_bundle, resolve_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def mlflow_env(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("reg", artifact_location=str(tmp_path / "artifacts"))
    return uri, client, exp


def _logged_bundle(client, exp, tmp_path, tag: str) -> tuple[str, str]:
    """A fake bundle directory (config.json + weights bytes) logged as run artifacts; (run_id, source URI)."""
    d = tmp_path / f"bundle-{tag}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"tag": tag}))
    (d / "model.safetensors").write_bytes(tag.encode() * 100)
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(d), "bundle")
    return run.info.run_id, f"{run.info.artifact_uri}/bundle"


def test_a_local_bundle_directory_is_used_in_place(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    got = resolve_model(str(tmp_path))
    assert got.path == tmp_path.resolve() and got.name is None and got.version is None


@pytest.mark.parametrize("uri,match", [
    ("", "bundle directory, s3://bucket/prefix or models"),
    ("models:/", "expected models"),
    ("models:/a@", "expected models"),
    ("models:/a/b", "expected models"),
    ("models:/../x@champion", "expected models"),
])
def test_malformed_sources_are_refused(uri, match):
    with pytest.raises(ModelSourceError, match=match):
        resolve_model(uri)


def test_a_directory_without_config_is_not_a_bundle(tmp_path):
    with pytest.raises(ModelSourceError, match="not a bundle directory"):
        resolve_model(str(tmp_path))


def test_champion_moves_only_on_improvement_and_resolves(mlflow_env, tmp_path, caplog):
    uri, client, exp = mlflow_env
    versions = []
    for tag, acc in (("a", 0.5), ("b", 0.4), ("c", 0.7), ("d", 0.7)):
        run_id, source = _logged_bundle(client, exp, tmp_path, tag)
        v = register_bundle("ofa-vqa", source, run_id=run_id, metric="vqa_acc", value=acc, split="val",
                            data_fingerprint="fp", tags={"task": "vqa"}, tracking=uri)
        versions.append((v, promote_if_better("ofa-vqa", v, tracking=uri)))
    assert versions == [("1", True), ("2", False), ("3", True), ("4", False)]  # a tie does not move it
    champ = client.get_model_version_by_alias("ofa-vqa", "champion")
    assert str(champ.version) == "3" and champ.tags["task"] == "vqa" and champ.tags["metric.vqa_acc"] == "0.7"

    cache = tmp_path / "cache"
    got = resolve_model("models:/ofa-vqa@champion", tracking=uri, cache_dir=cache)
    assert (got.name, got.version) == ("ofa-vqa", "3")
    assert json.loads((got.path / "config.json").read_text()) == {"tag": "c"}
    assert (got.path / "model.safetensors").read_bytes() == b"c" * 100
    assert got.path.parent == cache / "ofa-vqa" and got.path.name.startswith("3-")
    # a version is immutable: the cached copy serves once the artifacts are gone
    (tmp_path / "artifacts").rename(tmp_path / "moved")
    again = resolve_model("models:/ofa-vqa/3", tracking=uri, cache_dir=cache)
    assert again.path == got.path and again.version == "3"


def test_lower_is_better_and_unknown_models(mlflow_env, tmp_path):
    uri, client, exp = mlflow_env
    moved = []
    for tag, loss in (("a", 2.0), ("b", 1.0), ("c", 3.0)):
        run_id, source = _logged_bundle(client, exp, tmp_path, tag)
        v = register_bundle("ofa-sum", source, run_id=run_id, metric="loss", value=loss, split="val",
                            data_fingerprint="fp", mode="min", tracking=uri)
        moved.append(promote_if_better("ofa-sum", v, tracking=uri))
    assert moved == [True, True, False]
    with pytest.raises(ModelSourceError, match="not in the registry"):
        resolve_model("models:/ofa-sum@nonexistent", tracking=uri, cache_dir=tmp_path / "c")
    with pytest.raises(ModelSourceError, match="not in the registry"):
        resolve_model("models:/nothing/1", tracking=uri, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="not finite"):
        register_bundle("ofa-sum", "x", run_id=None, metric="loss", value=float("nan"), split="val",
                        data_fingerprint="fp", tracking=uri)


def test_a_champion_chosen_by_another_metric_stays(mlflow_env, tmp_path, caplog):
    uri, client, exp = mlflow_env
    run_id, source = _logged_bundle(client, exp, tmp_path, "a")
    v1 = register_bundle("m", source, run_id=run_id, metric="cider", value=1.0, split="val", data_fingerprint="fp",
                         tracking=uri)
    assert promote_if_better("m", v1, tracking=uri)
    v2 = register_bundle("m", source, run_id=run_id, metric="bleu4", value=99.0, split="val", data_fingerprint="fp",
                         tracking=uri)
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking.registry"):
        assert not promote_if_better("m", v2, tracking=uri)
    assert "chosen by cider, not bleu4" in caplog.text
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1


def test_only_versions_scored_on_the_same_split_and_data_compete(mlflow_env, tmp_path, caplog):
    uri, client, exp = mlflow_env
    run_id, source = _logged_bundle(client, exp, tmp_path, "a")

    def register(value: float, split: str, fingerprint: str) -> str:
        return register_bundle("m", source, run_id=run_id, metric="cider", value=value, split=split,
                               data_fingerprint=fingerprint, tracking=uri)

    v1 = register(1.0, "val", "fp-a")
    assert promote_if_better("m", v1, tracking=uri)
    tags = client.get_model_version("m", v1).tags
    assert (tags["metric_split"], tags["data_fingerprint"], tags["metric_name"]) == ("val", "fp-a", "cider")
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking.registry"):
        assert not promote_if_better("m", register(9.0, "test", "fp-a"), tracking=uri)  # better, another split
        assert not promote_if_better("m", register(9.0, "val", "fp-b"), tracking=uri)  # better, other data
    assert "scored on split val, not test" in caplog.text and "on data fp-a, not fp-b" in caplog.text
    assert "alias left in place" in caplog.text
    assert str(client.get_model_version_by_alias("m", "champion").version) == v1
    v4 = register(2.0, "val", "fp-a")  # measured alike and better: it moves
    assert promote_if_better("m", v4, tracking=uri)
    assert str(client.get_model_version_by_alias("m", "champion").version) == v4

    # a champion registered before the split and fingerprint tags existed is not comparable either
    old = client.create_model_version("m", source=source, run_id=run_id,
                                      tags={"metric_name": "cider", "metric_mode": "max", "metric.cider": "0.5"})
    client.set_registered_model_alias("m", "champion", old.version)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking.registry"):
        assert not promote_if_better("m", register(3.0, "val", "fp-a"), tracking=uri)
    assert "scored on split None, not val" in caplog.text
    with pytest.raises(ValueError, match="needs the split"):
        register(1.0, "", "fp-a")


def test_jobs_starting_at_once_share_one_experiment(mlflow_env):
    """Several jobs creating the same experiment at the same moment (the demo's fine-tunes, parallel cluster jobs)
    all get its id; none fails on the losing side of the create."""
    import threading

    from pipelines.tracking.runs import client_for, experiment_id

    uri, _, _ = mlflow_env
    barrier, ids, errors = threading.Barrier(4), [], []

    def start():
        client, resolved = client_for(uri)
        barrier.wait()
        try:
            ids.append(experiment_id(client, resolved, "ofa-at-once"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(ids) == 4 and len(set(ids)) == 1
    assert MlflowClient(uri).get_experiment_by_name("ofa-at-once").experiment_id == ids[0]


def test_another_registry_with_the_same_name_and_version_is_not_served_from_the_cache(tmp_path):
    """Two registries (a demo rerun's fresh tracking server, a second project) each have ofa-vqa version 1, with
    different weights: one shared cache must give each its own bundle."""
    cache, got = tmp_path / "cache", []
    for tag in ("first", "second"):
        uri = f"sqlite:///{tmp_path / tag}.db"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.create_experiment("reg", artifact_location=str(tmp_path / f"artifacts-{tag}"))
        run_id, source = _logged_bundle(client, exp, tmp_path, tag)
        assert register_bundle("ofa-vqa", source, run_id=run_id, metric="acc", value=0.5, split="val",
                               data_fingerprint="fp", tracking=uri) == "1"
        assert promote_if_better("ofa-vqa", "1", tracking=uri)
        got.append(resolve_model("models:/ofa-vqa@champion", tracking=uri, cache_dir=cache))
    assert [g.version for g in got] == ["1", "1"] and got[0].path != got[1].path
    assert [json.loads((g.path / "config.json").read_text()) for g in got] == [{"tag": "first"}, {"tag": "second"}]


# --- bundles on S3 (the session's SeaweedFS) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_bundle(tmp_path_factory):
    """A real (tiny) bundle directory: ofa-micro, GPT-2 vocabulary."""
    from ofa_model.architecture import get_config
    from ofa_model.bundle import save_bundle
    from ofa_model.model import OFAModel
    from ofa_model.preprocess import PreprocessConfig
    from ofa_model.vocab import Vocabulary

    path = tmp_path_factory.mktemp("micro") / "bundle"
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return save_bundle(path, OFAModel(get_config("ofa-micro")).eval(), Vocabulary.gpt2(),
                       preprocess=PreprocessConfig(patch_image_size=64))


def _upload(directory, prefix: str) -> None:
    from pipelines import storage

    for f in sorted(directory.iterdir()):
        if f.is_dir():
            _upload(f, storage.join(prefix, f.name))
        else:
            storage.write_bytes(storage.join(prefix, f.name), f.read_bytes())


def test_an_s3_bundle_is_downloaded_once_and_again_when_it_changes(s3_server, micro_bundle, tmp_path):
    from ofa_model.bundle import load_bundle
    from pipelines import storage

    prefix, cache = s3_server.uri("bundles/ofa-micro"), tmp_path / "cache"
    _upload(micro_bundle, prefix)
    storage.write_bytes(storage.join(prefix, "nested", "other.bin"), b"x" * 10)  # below the prefix's top: not taken
    got = resolve_model(prefix, cache_dir=cache)
    assert got.uri == prefix and got.name is None and got.path.parent == cache / "s3"
    assert sorted(p.name for p in got.path.iterdir()) == sorted(p.name for p in micro_bundle.iterdir())
    for f in micro_bundle.iterdir():
        assert (got.path / f.name).read_bytes() == f.read_bytes()
    bundle = load_bundle(got.path)
    assert bundle.preprocess.patch_image_size == 64 and bundle.config.name == "ofa-micro"

    # unchanged: the same copy, not downloaded again (its files keep their times), no temporary directories left
    weights = got.path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = resolve_model(prefix + "/", cache_dir=cache)
    assert again.path == got.path and weights.stat().st_mtime_ns == before
    assert [p.name for p in (cache / "s3").iterdir()] == [got.path.name]

    # the weights rewritten at the same prefix: a new copy with the new bytes. S3 times have 1 s resolution and a
    # same-size rewrite within the second is not seen (registry.py says so): the rewrite comes a second later
    time.sleep(1.1)
    new_weights = weights.read_bytes()[:-4] + b"\0\0\0\0"
    storage.write_bytes(storage.join(prefix, "model.safetensors"), new_weights)
    fresh = resolve_model(prefix, cache_dir=cache)
    assert fresh.path != got.path and (fresh.path / "model.safetensors").read_bytes() == new_weights
    assert (got.path / "model.safetensors").read_bytes() == micro_bundle.joinpath("model.safetensors").read_bytes()


def test_an_s3_bundle_brings_its_image_tokenizer_directory(s3_server, tmp_path):
    from ofa_model.bundle import load_bundle
    from pipelines import storage
    from tests.serving import micro_image_bundle

    local = micro_image_bundle(tmp_path / "t2i")
    prefix = s3_server.uri("bundles/t2i")
    _upload(local, prefix)  # image_tokenizer/ too
    storage.write_bytes(storage.join(prefix, "image_tokenizer", "deeper", "x.bin"), b"x")  # below it: not taken
    got = resolve_model(prefix, cache_dir=tmp_path / "cache").path
    assert sorted(p.name for p in (got / "image_tokenizer").iterdir()) == ["config.json", "model.safetensors"]
    for f in (local / "image_tokenizer").iterdir():
        assert (got / "image_tokenizer" / f.name).read_bytes() == f.read_bytes()
    assert load_bundle(got).image_tokenizer.config.n_embed == 512


def test_s3_sources_that_are_not_bundles_are_refused_naming_the_uri(s3_server, micro_bundle, tmp_path,
                                                                    monkeypatch):
    from pipelines import storage
    from pipelines.tracking import registry

    empty = s3_server.uri("nothing")
    with pytest.raises(ModelSourceError, match=f"{empty}: not a bundle \\(no config.json"):
        resolve_model(empty, cache_dir=tmp_path)
    no_config = s3_server.uri("no-config")
    storage.write_bytes(storage.join(no_config, "model.safetensors"), b"w" * 10)
    with pytest.raises(ModelSourceError, match=f"{no_config}: not a bundle"):
        resolve_model(no_config, cache_dir=tmp_path)
    with pytest.raises(ModelSourceError, match="s3://: cannot list"):
        resolve_model("s3://", cache_dir=tmp_path)

    big = s3_server.uri("big")
    _upload(micro_bundle, big)
    size = (micro_bundle / "model.safetensors").stat().st_size
    monkeypatch.setattr(registry, "WEIGHTS_MAX_BYTES", size - 1)
    with pytest.raises(ModelSourceError, match=f"{big}: model.safetensors is {size:,} bytes, over the "
                                               f"{size - 1:,}-byte cap"):
        resolve_model(big, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_evaluate_takes_a_model_on_s3(s3_server, micro_bundle, tmp_path, monkeypatch, capsys):
    from jobs.evaluate import main
    from pipelines.data.shards import write_corpus
    from pipelines.tracking import registry
    from tests.test_dataset import png
    from tests.test_storage import make_row

    prefix = s3_server.uri("bundles/eval")
    _upload(micro_bundle, prefix)
    write_corpus([make_row(i, split="test", image=png((200, 10, 10))) for i in range(2)], str(tmp_path / "corpus"))
    monkeypatch.setattr(registry, "DEFAULT_CACHE", tmp_path / "cache")
    main(["--model", prefix, "--data", str(tmp_path / "corpus"), "--task", "vqa", "--split", "test",
          "--mode", "allcand", "--candidates", "red,blue", "--batch-size", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["uri"] == prefix and out["model"]["path"].startswith(str(tmp_path / "cache" / "s3"))
    assert [p["id"] for p in out["predictions"]] == ["ds/test/000", "ds/test/001"]
    assert all(p["prediction"] in ("red", "blue") for p in out["predictions"]), out["predictions"]
    missing = s3_server.uri("bundles/missing")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", missing, "--data", str(tmp_path / "corpus"), "--task", "vqa"])
    assert exit_.value.code == 2 and f"{missing}: not a bundle" in capsys.readouterr().err
