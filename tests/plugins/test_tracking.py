"""MLflow by default in a local store; training survives a tracker that is down."""

from __future__ import annotations

import json
import socket
import warnings

import torch
from safetensors.torch import load_file

from conftest import engine_for


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


def start_mlflow_server(tmp_path):
    """A real local MLflow server in its own process group (so its workers die with it)."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    exe = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    port = closed_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server, port
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, 9)
    raise AssertionError("the local MLflow server did not come up in 120 s")


def test_mlflow_server_killed_mid_run(recipe_factory, tmp_path):
    """The run finishes (same weights as without tracking), warns once, keeps every metric locally,
    and no step waits on the dead server."""
    import os
    import signal
    import time

    import kdistill
    from kdistill.core.config import resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    server, port = start_mlflow_server(tmp_path)
    finished_at: dict[int, float] = {}

    class KillServer:
        @kdistill.hookimpl
        def kd_step_finished(self, step, metrics):
            finished_at[step] = time.perf_counter()
            if step == 2:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()

    try:
        raw = recipe_factory(steps=6, eval_every=3)
        raw["tracker"] = {"name": "mlflow", "options": {"tracking_uri": f"http://127.0.0.1:{port}", "experiment": "outage"}}
        raw["output_dir"] = str(tmp_path / "outage")
        pm = make_plugin_manager(extra_plugins=[("kill-server", KillServer())])
        registry = Registry.from_plugins(pm)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = Engine(resolve(raw, registry), pm, registry).run()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    ours = [str(w.message) for w in caught if "MLflow tracking failed" in str(w.message)]
    assert len(ours) == 1, ours
    assert "mlflow_run_id" in summary  # the run had started on the server before it died
    records = [json.loads(line) for line in (tmp_path / "outage" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "metrics" in r and "train/loss" in r["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "metrics" in r and "val/student_loss" in r["metrics"]] == [0, 3, 6]
    assert records[-1] == {**records[-1], "event": "finish", "status": "FINISHED"}
    gaps = [finished_at[s + 1] - finished_at[s] for s in range(2, 6)]
    assert max(gaps) < 5.0, gaps
    off = recipe_factory(steps=6, eval_every=3)
    off["output_dir"] = str(tmp_path / "off")
    engine_for(off).run()
    a = load_file(str(tmp_path / "outage" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "off" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
