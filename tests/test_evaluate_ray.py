"""`jobs.evaluate --workers N`: Ray Data batch inference on an actor pool, against the single-process path."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from tests.test_registry import micro_bundle  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(300)

COLOURS = {"red": (200, 20, 20), "blue": (20, 20, 200), "green": (20, 200, 20)}


def easy_vqa_rows(n: int) -> list[dict]:
    """Easy-VQA-like test rows: a coloured image, a question, ten-annotator-style answers."""
    from tests.test_dataset import png
    from tests.test_storage import make_row

    names = sorted(COLOURS)
    rows = []
    for i in range(n):
        colour = names[i % 3]
        rows.append(make_row(i, split="test", image=png(COLOURS[colour], size=24 + 8 * (i % 2)),
                             text="what color is the shape?" if i % 2 else "which color is it?", target=colour,
                             targets=[colour, names[(i + 1) % 3]], target_weights=[1.0, 0.3 * (i % 3)]))
    return rows


def test_workers_2_writes_parquet_logs_mlflow_and_equals_one_process(ray_cluster, micro_bundle,  # noqa: F811
                                                                    tmp_path, capsys):
    from jobs.evaluate import main
    from pipelines.data.shards import write_corpus
    from pipelines.evaluate import PARQUET_COLUMNS, evaluate_corpus

    corpus, out_dir = str(tmp_path / "corpus"), tmp_path / "eval"
    write_corpus(easy_vqa_rows(14), corpus, shard_bytes=2000, row_group_rows=3)  # several shards and blocks
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--model", str(micro_bundle), "--data", corpus, "--task", "vqa", "--split", "test", "--mode",
              "allcand", "--candidates", "red,blue,green"]
    main([*common, "--batch-size", "3", "--workers", "2", "--output", str(out_dir), "--tracking-uri", uri,
          "--progress-every", "0"])
    printed = json.loads(capsys.readouterr().out)
    single = evaluate_corpus(str(micro_bundle), corpus, "vqa", mode="allcand", candidates=["red", "blue", "green"],
                             batch_size=5)

    assert printed["metrics"] == single.metrics and single.metrics["rows"] == 14  # exactly, not approximately
    table = pq.read_table(out_dir / "predictions.parquet")
    assert tuple(table.column_names) == PARQUET_COLUMNS and table.num_rows == 14
    got = table.to_pylist()
    assert [r["id"] for r in got] == [f"ds/test/{i:03d}" for i in range(14)]
    for mine, theirs in zip(got, single.predictions, strict=True):
        assert (mine["prediction"], mine["reference"], mine["example_score"]) == (
            theirs["prediction"], theirs["reference"], theirs["example_score"])
        assert mine["score"] == pytest.approx(theirs["score"], rel=1e-5)  # batches of 3 vs 5: float rounding
        assert mine["prediction"] in COLOURS and mine["latency_s"] > 0 and mine["error"] is None
    assert json.loads((out_dir / "metrics.json").read_text())["metrics"] == single.metrics

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(printed["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2"
    assert run.data.metrics["vqa_score"] == single.metrics["vqa_score"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "progress/rows_done")][-1] == 14
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")  # the driver's
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "evaluation")) == [
        "evaluation/metrics.json", "evaluation/predictions.parquet", "evaluation/report.html"]
    page = (out_dir / "report.html").read_text()
    assert printed["report_uri"] == str(out_dir / "report.html") and printed["run_id"] in page
    assert f"<td class='num'>{single.metrics['vqa_score']:.4f}</td>" in page  # the headline, as gathered

    # --limit: the first rows in manifest order, as the single process takes them
    main([*common, "--limit", "5", "--batch-size", "2", "--workers", "1", "--tracking-uri", uri])
    limited = json.loads(capsys.readouterr().out)
    assert limited["metrics"] == evaluate_corpus(str(micro_bundle), corpus, "vqa", mode="allcand", limit=5,
                                                 candidates=["red", "blue", "green"]).metrics


def test_bad_options_and_models_fail_before_any_actor(tmp_path, capsys):
    from jobs.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--task", "vqa", "--workers", "0"])
    assert exit_.value.code == 2 and "workers must be an int >= 1" in capsys.readouterr().err


def test_both_paths_read_alike_count_an_unreadable_shard_and_give_the_same_records(ray_cluster, micro_bundle,  # noqa: F811
                                                                                 tmp_path):
    """One process and the actor pool share the row selection, the records and the scoring: a shard that cannot be
    read is counted by reason and left out of the metrics by both (the single process used to fail on it), and
    both files carry each row's latency."""
    from pipelines.data.shards import write_corpus
    from pipelines.evaluate import evaluate_corpus, evaluate_on_ray

    corpus = tmp_path / "corpus"
    manifest = write_corpus(easy_vqa_rows(14), str(corpus), shard_bytes=2000, row_group_rows=3)
    broken = manifest.shards[1]
    (corpus / broken["path"]).write_bytes(b"not parquet")
    kept = 14 - broken["num_rows"]
    common = {"mode": "allcand", "candidates": ["red", "blue", "green"], "batch_size": 4}
    single = evaluate_corpus(str(micro_bundle), str(corpus), "vqa", output=str(tmp_path / "one"), **common)
    pooled = evaluate_on_ray(str(micro_bundle), str(corpus), "vqa", output=str(tmp_path / "pool"), **common,
                             tracking=f"sqlite:///{tmp_path / 'mlflow.db'}", progress_every_s=0, report=False)

    assert single.bad_rows == pooled.bad_rows == {"unreadable_shard": broken["num_rows"]}
    assert single.metrics == pooled.metrics and single.metrics["rows"] == kept  # exactly, not approximately
    lines = [json.loads(t) for t in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert lines == single.predictions and len(lines) == kept + 1  # the unreadable shard: one marker record
    marker = [r for r in lines if "rows" in (r.get("error") or {})]
    assert len(marker) == 1 and marker[0]["error"]["rows"] == broken["num_rows"]
    assert marker[0]["error"]["reason"] == "unreadable_shard" and broken["path"] in marker[0]["error"]["message"]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["bad_rows"] == single.bad_rows
    for mine, theirs in zip(single.predictions, pooled.predictions, strict=True):
        assert {k: v for k, v in mine.items() if k not in ("score", "latency_s")} == {
            k: v for k, v in theirs.items() if k not in ("score", "latency_s")}
        if mine["prediction"] is not None:
            assert mine["latency_s"] > 0 and theirs["latency_s"] > 0
            assert mine["score"] == pytest.approx(theirs["score"], rel=1e-5)
    assert "mean latency per row" in (tmp_path / "one" / "report.html").read_text()
