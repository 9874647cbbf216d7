"""MLflow by default in a local store; training survives a tracker that is down."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch
from safetensors.torch import load_file

from test_engine import engine_for


def test_mlflow_default_local_store_has_metrics_params_and_model(recipe_factory, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = recipe_factory(steps=3, eval_every=3)
    raw["tracker"] = {"name": "mlflow", "options": {"experiment": "tests"}}
    summary = engine_for(raw).run()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert summary["mlflow_tracking_uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/student_ppl")] == [0, 3]
    assert run.data.params["train.steps"] == "3" and run.data.params["losses.0.options.temperature"] == "2.0"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "plugins.json", "model"} <= top
    model_files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model_files and "model/config.json" in model_files


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is


def test_unreachable_tracking_server_warns_once_and_keeps_metrics(recipe_factory, tmp_path):
    raw = recipe_factory(steps=3)
    raw["tracker"] = {"name": "mlflow", "options": {"tracking_uri": f"http://127.0.0.1:{closed_port()}"}}
    raw["output_dir"] = str(tmp_path / "down")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine_for(raw).run()
    ours = [w for w in caught if "MLflow tracking failed" in str(w.message)]
    assert len(ours) == 1
    records = [json.loads(line) for line in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "metrics" in r and "train/loss" in r["metrics"]] == [1, 2, 3]
    off = recipe_factory(steps=3)
    off["output_dir"] = str(tmp_path / "off")
    engine_for(off).run()
    a = load_file(str(tmp_path / "down" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "off" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
