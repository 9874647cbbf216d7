"""MLflow by default in a local store; training survives a tracker that is down."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import engine_for


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the tests that make their own experiments (a new store takes seconds to set up)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def no_network(monkeypatch):
    """Any connection to another machine fails the test (a local store needs none)."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_mlflow_default_local_store_has_metrics_params_model_tags_and_description(recipe_factory, tmp_path, monkeypatch):
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient

    from kdistill import __version__
    from kdistill.core.summary import flatten
    from kdistill.plugins.trackers.mlflow_tracker import recipe_hash

    attempts = no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no git repository: no commit tag, no error
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = recipe_factory(steps=3, eval_every=3)
    raw["tracker"] = {"name": "mlflow", "options": {"experiment": "tests"}}
    engine = engine_for(raw)
    summary = engine.run()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert summary["mlflow_tracking_uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tests")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # model training, not GenAI
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # the address printed at the end opens the run in the UI's model-training view
    assert summary["mlflow_run_url"] == (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{run_id}"
                                         "?workflowType=machine_learning")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "val/student_ppl")] == [0, 3]
    assert run.data.params["train.steps"] == "3" and run.data.params["losses.0.options.temperature"] == "2.0"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"recipe.yaml", "plugins.json"}

    tags = run.data.tags
    params = flatten(engine.recipe.model_dump(mode="json"))
    assert tags["kdistill.version"] == __version__
    assert tags["kdistill.recipe_sha256"] == recipe_hash(params)
    assert recipe_hash({**params, "output_dir": "elsewhere", "run_name": "other"}) == recipe_hash(params)
    assert recipe_hash({**params, "train.lr": 0.5}) != recipe_hash(params)
    assert tags["kdistill.strategy"] == "offline" and tags["kdistill.teacher_provider"] == "hf"
    assert tags["kdistill.losses"] == "forward-kl,cross-entropy" and tags["kdistill.data"] == "text-files"
    assert tags["kdistill.teacher"] == raw["teacher"]["options"]["model"]
    assert tags["kdistill.student"] == "teacher layers 0, 3"
    assert tags["kdistill.final_model"] == str(tmp_path / "run" / "final")
    assert "kdistill.git_commit" not in tags
    description = tags["mlflow.note.content"]
    ppl = f"val/student_ppl {summary['before']['val/student_ppl']:.4g} -> {summary['after']['val/student_ppl']:.4g}"
    assert ppl in description and "forward-kl x0.5" in description and "for 3 steps" in description, description

    # the student: an MLflow model of the run, with the last step's metrics, that loads as a pipeline
    (model,) = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert model.source_run_id == run_id and model.name == "student"
    linked = {m.key: m.value for m in model.metrics}
    assert linked["val/student_ppl"] == summary["after"]["val/student_ppl"] and linked["train/loss"] == summary["after"]["train/loss"]
    assert model.tags["kdistill.strategy"] == "offline"
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.flavors["transformers"]["task"] == "text-generation"
    assert info.signature.inputs.to_dict() == info.signature.outputs.to_dict() == [{"type": "string", "required": True}]
    pipe = mlflow.transformers.load_model(f"models:/{model.model_id}")
    assert pipe.model.config.num_hidden_layers == 2 and pipe.tokenizer is not None
    assert isinstance(pipe("the king", max_new_tokens=2, do_sample=False)[0]["generated_text"], str)
    assert (tmp_path / "mlruns").is_dir()  # where a local store's artifacts go (docs/tracking.md)
    assert attempts == []


def test_a_tracker_with_only_the_four_methods_still_gets_the_model_and_the_summary(tmp_path):
    """`log_model` and `log_summary` have defaults: a third-party tracker written before them works as before."""
    import kdistill

    calls = []

    class Old(kdistill.Tracker):
        name = "old"

        def start(self, run_name, params, output_dir):
            calls.append("start")

        def log_metrics(self, metrics, step):
            calls.append("metrics")

        def log_artifact(self, path, artifact_path=None):
            calls.append(("artifact", path, artifact_path))

        def finish(self, status="FINISHED"):
            calls.append(status)

    tracker = Old()
    tracker.log_model(str(tmp_path / "final"))
    tracker.log_summary({"before": {}, "after": {}})
    assert calls == [("artifact", str(tmp_path / "final"), "model")]


def test_jsonl_tracker_copies_the_model_as_before(tiny_assets, tmp_path):
    from kdistill.plugins.trackers.jsonl import JsonlTracker

    tracker = JsonlTracker()
    tracker.start("r", {"a": 1}, str(tmp_path / "run"))
    tracker.log_model(tiny_assets["teacher"])
    tracker.log_summary({"before": {}, "after": {"val/x": 1.0}})
    tracker.finish()
    assert (tmp_path / "run" / "artifacts" / "model" / "teacher" / "config.json").exists()


def test_git_commit_of_the_working_folder_is_a_tag(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from kdistill.plugins.trackers.mlflow_tracker import git_commit, run_tags

    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run(git + ["-C", str(tmp_path), "add", "a.txt"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    tags = run_tags({})
    assert tags["kdistill.git_commit"] == head and tags["kdistill.git_dirty"] == "false"
    (tmp_path / "a.txt").write_text("b")
    assert git_commit() == (head, True)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git at all: no tag, no error
    assert git_commit() is None and "kdistill.git_commit" not in run_tags({})


def test_a_users_experiment_kind_is_kept_and_artifact_location_applies_to_a_new_experiment(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    uri = store
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    tracker = MlflowTracker(MlflowTracker.Options(experiment="mine", tracking_uri=uri))
    tracker.start("r", {}, str(tmp_path / "r"))
    tracker.finish()
    assert client.get_experiment_by_name("mine").tags["mlflow.experimentKind"] == "finetuning"

    options = MlflowTracker.Options(experiment="elsewhere", tracking_uri=uri, artifact_location=str(tmp_path / "store"))
    tracker = MlflowTracker(options)
    tracker.start("r", {}, str(tmp_path / "e"))
    (tmp_path / "note.txt").write_text("n")
    tracker.log_artifact(str(tmp_path / "note.txt"))
    tracker.finish()
    experiment = client.get_experiment_by_name("elsewhere")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.endswith(str(tmp_path / "store")) and list((tmp_path / "store").rglob("note.txt"))
    with warnings.catch_warnings(record=True) as caught:  # an existing experiment keeps its location, with a warning
        warnings.simplefilter("always")
        again = MlflowTracker(MlflowTracker.Options(experiment="elsewhere", tracking_uri=uri, artifact_location=str(tmp_path / "x")))
        again.start("r2", {}, str(tmp_path / "e2"))
        again.finish()
    assert any("applies to a new experiment" in str(w.message) for w in caught)
    assert not any("MLflow tracking failed" in str(w.message) for w in caught)


def test_log_model_reference_and_none_copy_nothing(tiny_assets, store, tmp_path):
    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    uri = store
    client = MlflowClient(tracking_uri=uri)
    for mode in ("reference", "none"):
        tracker = MlflowTracker(MlflowTracker.Options(experiment=mode, tracking_uri=uri, log_model=mode))
        tracker.start(mode, {}, str(tmp_path / mode))
        tracker.log_metrics({"val/x": 2.0}, step=1)
        tracker.log_metrics({"val/x": 1.0}, step=2)
        tracker.log_model(tiny_assets["teacher"])
        tracker.finish()
        experiment = client.get_experiment_by_name(mode).experiment_id
        models = client.search_logged_models(experiment_ids=[experiment])
        assert client.get_run(tracker.run_id).data.tags["kdistill.final_model"] == tiny_assets["teacher"]
        assert client.list_artifacts(tracker.run_id) == []
        if mode == "none":
            assert models == []
        else:
            (model,) = models
            assert [a.path for a in client.list_logged_model_artifacts(model.model_id)] == ["MLmodel"]  # nothing copied
            assert model.source_run_id == tracker.run_id and model.tags["kdistill.model_path"] == tiny_assets["teacher"]
            assert [(m.key, m.value, m.step) for m in model.metrics] == [("val/x", 1.0, 2)]


def test_the_model_card_is_the_students_readme_where_there_is_one(tiny_assets, store, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    attempts = no_network(monkeypatch)
    folder = tmp_path / "final"
    shutil.copytree(tiny_assets["teacher"], folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\nThe student's own card.\n")
    tracker = MlflowTracker(MlflowTracker.Options(experiment="card", tracking_uri=store))
    tracker.start("r", {}, str(tmp_path / "r"))
    tracker.log_model(str(folder))
    tracker.finish()
    client = MlflowClient(tracking_uri=store)
    (model,) = client.search_logged_models(experiment_ids=[client.get_experiment_by_name("card").experiment_id])
    stored = Path(model.artifact_location.removeprefix("file://"))  # a local store's folder
    assert "The student's own card." in (stored / "model_card.md").read_text() and attempts == []


def test_with_mlflow_2_the_student_is_logged_as_files_as_before(tiny_assets, store, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    monkeypatch.delattr(mlflow, "create_external_model")  # what tells MLflow 2 (no logged models) from 3
    tracker = MlflowTracker(MlflowTracker.Options(experiment="mlflow2", tracking_uri=store))
    tracker.start("r", {}, str(tmp_path / "r"))
    tracker.log_model(tiny_assets["teacher"])
    tracker.finish()
    client = MlflowClient(tracking_uri=store)
    assert "model/config.json" in {a.path for a in client.list_artifacts(tracker.run_id, "model")}
    assert client.search_logged_models(experiment_ids=[client.get_experiment_by_name("mlflow2").experiment_id]) == []


def test_secrets_in_urls_and_secret_named_options_are_not_logged(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker

    uri = store
    tracker = MlflowTracker(MlflowTracker.Options(experiment="secrets", tracking_uri=uri))
    tracker.start("r", {"teacher.options.urls": ["http://me:hunter2@host:8000/v1"], "x.options.api_key": "hunter2",
                        "teacher.options.api_key_env": "MY_KEY", "train.max_new_tokens": 4}, str(tmp_path / "r"))
    tracker.finish()
    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert "hunter2" not in json.dumps(params)
    assert params["teacher.options.urls"] == "['http://***@host:8000/v1']" and params["x.options.api_key"] == "***"
    assert params["teacher.options.api_key_env"] == "MY_KEY" and params["train.max_new_tokens"] == "4"


def test_compare_url_names_the_runs_of_the_folders(store, tmp_path, capsys):
    import urllib.parse

    from kdistill.plugins.trackers.mlflow_tracker import MlflowTracker, compare_url, main

    ids = []
    for name in ("a", "b"):
        tracker = MlflowTracker(MlflowTracker.Options(experiment="sweep", tracking_uri=store))
        tracker.start(name, {}, str(tmp_path / name))
        tracker.finish()
        ids.append(tracker.run_id)
    url = compare_url([tmp_path / "a", tmp_path / "b"])
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?")
    query = urllib.parse.parse_qs(url.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ids and len(json.loads(query["experiments"][0])) == 1
    assert query["workflowType"] == ["machine_learning"]  # the MLflow 3.17 UI's "Model training" side
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--ui", "http://h:1/"])
    assert capsys.readouterr().out.strip() == url.replace("http://127.0.0.1:5000", "http://h:1")


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
