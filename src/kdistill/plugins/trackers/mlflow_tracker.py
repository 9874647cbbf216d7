"""MLflow tracking; with no tracking URI, a local SQLite store in the working folder (no server).

Metrics are also written to `<output_dir>/metrics.jsonl` as they are logged, so a tracking outage
(a server that is down or dies mid-run, a full disk) loses nothing: training goes on with one
warning, and from then on artifacts are copied into the run folder instead.

A file whose name ends in `.table.json` (`{"columns": [...], "data": [[...]]}`, pandas' "split"
layout, what `mlflow.log_table` writes) is logged as a table: the MLflow UI lists it among the run's
tables (Evaluation / Traces views). Unlike `mlflow.log_table`, logging it again replaces it instead of
appending its rows.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import kdistill
from kdistill.plugins.trackers.jsonl import JsonlTracker

_RUN_ID_FILE = "mlflow_run.json"
TABLE_SUFFIX = ".table.json"
_LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS


class MlflowTracker(kdistill.Tracker):
    """Logs params, metrics with steps, artifacts and the final model to MLflow."""

    name = "mlflow"
    is_default = True

    class Options(kdistill.Options):
        experiment: str = "kdistill"
        tracking_uri: str | None = None

    def _fail(self, what: str, exc: Exception) -> None:
        if not self._failed:
            warnings.warn(f"MLflow tracking failed ({what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"training goes on and metrics go to {self._local.path}", stacklevel=3)
            self._failed = True

    def start(self, run_name, params, output_dir):
        self._failed = False  # after the first MLflow failure only the local file is written
        self._local = JsonlTracker()
        self._local.start(run_name, params, output_dir)
        # fail fast against an unreachable server instead of retrying for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            import mlflow

            # mlflow configures its own INFO logging on import; its lines would drown the progress bar
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self._mlflow = mlflow
            uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(self.options.experiment)
            id_file = Path(output_dir) / _RUN_ID_FILE
            previous = json.loads(id_file.read_text())["run_id"] if id_file.exists() else None
            nested = mlflow.active_run() is not None  # a stage of a progressive chain: a child of the chain's run
            if previous:
                run = mlflow.start_run(run_id=previous, nested=nested)
            else:
                run = mlflow.start_run(run_name=run_name, nested=nested)
                mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                id_file.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
            self.run_id = run.info.run_id
            self.tracking_uri = uri
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("start", exc)

    def log_metrics(self, metrics, step):
        self._local.log_metrics(metrics, step)
        if self._failed:
            return
        try:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_metrics", exc)

    def log_artifact(self, path, artifact_path=None):
        if self._failed:
            return self._local.log_artifact(path, artifact_path)
        try:
            if Path(path).is_dir():
                self._mlflow.log_artifacts(path, artifact_path=artifact_path)
            else:
                self._mlflow.log_artifact(path, artifact_path=artifact_path)
                if Path(path).name.endswith(TABLE_SUFFIX):
                    self._mark_table(f"{artifact_path.strip('/')}/{Path(path).name}" if artifact_path else Path(path).name)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_artifact", exc)
            self._local.log_artifact(path, artifact_path)

    def _mark_table(self, artifact_file: str) -> None:
        """Tag the run as `mlflow.log_table` does, so that the UI shows the artifact as a table."""
        run = self._mlflow.get_run(self.run_id)
        logged = json.loads(run.data.tags.get(_LOGGED_ARTIFACTS_TAG, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self._mlflow.set_tag(_LOGGED_ARTIFACTS_TAG, json.dumps(logged + [entry]))

    def finish(self, status="FINISHED"):
        self._local.finish(status)
        if self._failed:
            return
        try:
            self._mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)


@kdistill.hookimpl
def kd_register_trackers():
    return [MlflowTracker]
