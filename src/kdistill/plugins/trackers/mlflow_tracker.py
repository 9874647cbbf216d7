"""MLflow tracking; with no tracking URI, a local SQLite store in the working folder (no server).

Metrics are also written to `<output_dir>/metrics.jsonl` as they are logged, so a tracking outage
(a server that is down or dies mid-run, a full disk) loses nothing: training goes on with one
warning, and from then on artifacts are copied into the run folder instead.

The experiment is marked as model training (`mlflow.experimentKind`, unless it has a kind already).
A run is tagged with the kdistill version, the recipe's hash, its components, the teacher and
student and the working folder's git commit, and described (`mlflow.note.content`): teacher ->
student, data, steps, and once the run finished, the before/after figures. The final student is
logged as an MLflow model of the `transformers` flavor (`log_model: full`, the default), as a
reference to its folder (`reference`), or not at all (`none`); see docs/tracking.md.

A file whose name ends in `.table.json` (`{"columns": [...], "data": [[...]]}`, pandas' "split"
layout, what `mlflow.log_table` writes) is logged as a table: the MLflow UI lists it among the run's
tables (Evaluation / Traces views). Unlike `mlflow.log_table`, logging it again replaces it instead of
appending its rows.

`python -m kdistill.plugins.trackers.mlflow_tracker RUN_FOLDER...` prints the MLflow UI address that
shows those runs side by side (a sweep's, say).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import Field

import kdistill
from kdistill.plugins.trackers.jsonl import JsonlTracker

_RUN_ID_FILE = "mlflow_run.json"
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
TABLE_SUFFIX = ".table.json"
_LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what the MLflow 3 UI reads to choose an experiment's views
TRAINING_KIND = "custom_model_development"  # shown as "Machine learning": runs, metrics, charts
DESCRIPTION_TAG = "mlflow.note.content"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE: the run's description
SLOTS = ("strategy", "teacher", "data", "losses", "layer_mapper", "scheduler", "evaluators", "generator")
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|apikey|access_key|credentials?)$", re.IGNORECASE)


class MlflowTracker(kdistill.Tracker):
    """Logs params, metrics with steps, artifacts and the final model to MLflow."""

    name = "mlflow"
    is_default = True

    class Options(kdistill.Options):
        experiment: str = "kdistill"
        tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
                                         "the working folder")
        artifact_location: str | None = Field(
            None, description="where a new experiment keeps its artifacts (a folder, s3://..., ...); default: MLflow's "
            "(./mlruns beside a local mlflow.db, the server's own store). An existing experiment keeps its location")
        log_model: Literal["full", "reference", "none"] = Field(
            "full", description="the final student in MLflow: full (an MLflow transformers model, a copy of final/; "
            "registrable, loads with mlflow.transformers.load_model), reference (a logged model that only names "
            "final/: no copy), none")

    def _fail(self, what: str, exc: Exception) -> None:
        if not self._failed:
            warnings.warn(f"MLflow tracking failed ({what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"training goes on and metrics go to {self._local.path}", stacklevel=3)
            self._failed = True

    def start(self, run_name, params, output_dir):
        self._failed = False  # after the first MLflow failure only the local file is written
        self._last_step = 0
        self._params = dict(params)
        self._tags: dict[str, str] = {}
        self._local = JsonlTracker()
        self._local.start(run_name, params, output_dir)
        # fail fast against an unreachable server instead of retrying for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            self._tags = run_tags(params)
            import mlflow

            # mlflow configures its own INFO logging on import; its lines would drown the progress bar
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self._mlflow = mlflow
            uri = self.options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(experiment_id=self._experiment_id(mlflow.MlflowClient()))
            id_file = Path(output_dir) / _RUN_ID_FILE
            previous = json.loads(id_file.read_text())["run_id"] if id_file.exists() else None
            nested = mlflow.active_run() is not None  # a stage of a progressive chain: a child of the chain's run
            if previous:
                run = mlflow.start_run(run_id=previous, nested=nested)
            else:
                run = mlflow.start_run(run_name=run_name, nested=nested)
                mlflow.log_params({k: redact(k, v)[:6000] for k, v in params.items()})
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                id_file.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}))
            self.run_id = run.info.run_id
            self.tracking_uri = uri
            # where `mlflow ui` shows this run, in its model-training view (the UI opens on GenAI otherwise)
            self.run_url = f"{UI}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
            mlflow.set_tags(self._tags)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("start", exc)

    def _experiment_id(self, client) -> str:
        """The experiment's id; made (with `artifact_location`) if new, marked as model training if it has no kind."""
        o = self.options
        experiment = client.get_experiment_by_name(o.experiment)
        if experiment is None:
            location = o.artifact_location
            if location and "://" not in location:
                location = str(Path(location).expanduser().resolve())
            try:
                return client.create_experiment(o.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
            except Exception:  # noqa: BLE001 - made meanwhile by another run: use that one
                experiment = client.get_experiment_by_name(o.experiment)
                if experiment is None:
                    raise
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind the user chose is kept
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        if o.artifact_location and Path(o.artifact_location.removeprefix("file://")).expanduser().resolve() != Path(
                experiment.artifact_location.removeprefix("file://")).resolve():
            warnings.warn(f"tracker.options.artifact_location applies to a new experiment; experiment {o.experiment!r} exists "
                          f"and keeps its artifacts in {experiment.artifact_location}", stacklevel=4)
        return experiment.experiment_id

    def log_metrics(self, metrics, step):
        self._local.log_metrics(metrics, step)
        self._last_step = max(self._last_step, step)
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

    def log_model(self, path):
        """The final student as an MLflow logged model of this run, with the metrics of the last step."""
        folder = Path(path).resolve()
        mode = self.options.log_model
        if self._failed:
            return self._local.log_model(str(folder)) if mode == "full" else None
        try:
            self._mlflow.set_tag("kdistill.final_model", str(folder))
            if not hasattr(self._mlflow, "create_external_model"):  # MLflow 2 has no logged models: files, as before
                return self.log_artifact(str(folder), "model") if mode == "full" else None
            if mode == "reference":
                self._log_reference(folder)
            elif mode == "full":
                self._log_transformers_model(folder)
        except Exception as exc:  # noqa: BLE001
            self._fail("log_model", exc)
            if mode == "full":
                self._local.log_model(str(folder))

    def _model_tags(self) -> dict[str, str]:
        return {k: v for k, v in self._tags.items() if k != DESCRIPTION_TAG}

    def _log_transformers_model(self, folder: Path) -> None:
        """An MLflow `transformers` model (text-generation: text in, text out) made from the folder's model and
        tokenizer, loaded on the CPU for the time it takes (MLflow's own way of logging a folder fails with
        transformers 5.18 and later, as of MLflow 3.17). Nothing is fetched from the network."""
        try:
            import mlflow.transformers
            import transformers
            from huggingface_hub import ModelCard
            from packaging.version import Version
            from transformers import AutoModelForCausalLM, AutoTokenizer

            remote = bool(self._params.get("student.trust_remote_code") or self._params.get("teacher.options.trust_remote_code"))
            load = {"local_files_only": True, "trust_remote_code": remote}
            dtype = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # the weights' own
            model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, **{dtype: "auto"}, **load)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **load)
            # a card of our own (the folder's README.md where there is one): else MLflow would look for one, and for a
            # license, on the Hugging Face Hub under the folder's name
            readme = folder / "README.md"
            card = ModelCard.load(readme) if readme.is_file() else ModelCard(
                f"---\nlibrary_name: transformers\ntags: [kdistill, distillation]\n---\n\n{describe(self._params, None)}\n")
            mlflow.transformers.log_model({"model": model, "tokenizer": tokenizer}, name="student", task="text-generation",
                                          model_card=card, pip_requirements=_requirements(), step=self._last_step,
                                          tags=self._model_tags())
        except Exception as exc:  # noqa: BLE001 - not an MLflow model (an unusual architecture, a version mismatch)
            warnings.warn(f"could not log the student as an MLflow model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); logging its files as the artifact folder model/ "
                          "instead", stacklevel=3)
            self.log_artifact(str(folder), "model")

    def _log_reference(self, folder: Path) -> None:
        """A logged model that names the folder (nothing copied), linked to the run and its last step's metrics."""
        from mlflow.entities import LoggedModelOutput, Metric

        model = self._mlflow.create_external_model(name="student", source_run_id=self.run_id, model_type="student",
                                                   tags={**self._model_tags(), "kdistill.model_path": str(folder)},
                                                   params={k: redact(k, v)[:6000] for k, v in self._params.items()})
        client = self._mlflow.MlflowClient()
        client.log_outputs(self.run_id, models=[LoggedModelOutput(model.model_id, step=self._last_step)])
        latest = client.get_run(self.run_id).data.metrics
        metrics = [Metric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, run_id=self.run_id, model_id=model.model_id)
                   for key in latest for m in client.get_metric_history(self.run_id, key) if m.step == self._last_step]
        client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary):
        if self._failed:
            return
        try:
            self._mlflow.set_tag(DESCRIPTION_TAG, describe(self._params, summary))
        except Exception as exc:  # noqa: BLE001
            self._fail("log_summary", exc)

    def finish(self, status="FINISHED"):
        self._local.finish(status)
        if self._failed:
            return
        try:
            self._mlflow.end_run(status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)


# ----------------------------------------------------------------------------- what a run is tagged with


def redact(key: str, value: Any) -> str:
    """A parameter's value as logged: credentials in URLs (user:password@) and values of secret-named keys masked."""
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
        return "***"
    return _URL_CREDENTIALS.sub("***@", str(value))


def _is_recipe(params: Mapping[str, Any]) -> bool:
    return "train.steps" in params and "output_dir" in params  # not a side run's few parameters (sweep, analyze)


def recipe_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the resolved recipe (canonical JSON; where the run is written and its name left out): runs with
    the same hash trained with the same settings, however their YAML was written."""
    content = {k: v for k, v in params.items() if k not in ("output_dir", "run_name")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _names(params: Mapping[str, Any], slot: str) -> str | None:
    if params.get(f"{slot}.name"):
        return str(params[f"{slot}.name"])
    many = [str(params[f"{slot}.{i}.name"]) for i in range(100) if params.get(f"{slot}.{i}.name")]
    return ",".join(many) or None


def teacher_identity(params: Mapping[str, Any]) -> str | None:
    """What the teacher is: its model (a path, a pkg:// file, a served model's name) or cache folder."""
    for key in ("model", "source.model", "served.model", "path"):
        if params.get(f"teacher.options.{key}"):
            return redact(key, params[f"teacher.options.{key}"])
    return None


def student_identity(params: Mapping[str, Any]) -> str | None:
    if params.get("student.model"):
        return f"model {redact('model', params['student.model'])}"
    if "student.from_teacher.layers" in params:
        return f"teacher layers {', '.join(str(x) for x in params['student.from_teacher.layers'])}"
    config = {k: v for k, v in params.items() if k.startswith("student.config")}
    if config:
        return f"config {redact('config', params['student.config'])}" if "student.config" in config else "config (inline)"
    return None


def data_identity(params: Mapping[str, Any]) -> str | None:
    paths = [str(p) for k, v in params.items() if k.startswith("data.options.") and k.endswith("paths")
             for p in (v if isinstance(v, (list, tuple)) else [v])]
    return ", ".join(redact("path", p) for p in paths) or None


def git_commit(folder: Path | None = None) -> tuple[str, bool] | None:
    """The working folder's commit and whether tracked files changed since; None without git or outside a repository."""
    run = dict(capture_output=True, text=True, timeout=10, cwd=folder or Path.cwd(), env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], **run)  # type: ignore[call-overload]
        if head.returncode != 0:
            return None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)  # type: ignore[call-overload]
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip(), bool(changed.stdout.strip())


def run_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The kdistill tags of a run: version, recipe hash, components, teacher, student, git commit, description."""
    tags = {"kdistill.version": kdistill.__version__}
    if _is_recipe(params):
        tags["kdistill.recipe_sha256"] = recipe_hash(params)
        for slot in SLOTS:
            names = _names(params, slot)
            if names:
                tags["kdistill.teacher_provider" if slot == "teacher" else f"kdistill.{slot}"] = names
        for name, identity in (("teacher", teacher_identity(params)), ("student", student_identity(params))):
            if identity:
                tags[f"kdistill.{name}"] = identity
        tags[DESCRIPTION_TAG] = describe(params, None)
    commit = git_commit()
    if commit is not None:
        tags["kdistill.git_commit"], tags["kdistill.git_dirty"] = commit[0], str(commit[1]).lower()
    return tags


def _figure(value: Any) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return str(value)
    return f"{value:,.0f}" if 1e4 <= abs(value) < 1e12 else f"{value:.4g}"


def describe(params: Mapping[str, Any], summary: Mapping[str, Any] | None, most: int = 8) -> str:
    """One paragraph: teacher -> student, strategy and losses, data, steps; with a summary, the before/after figures."""
    if not _is_recipe(params):
        return ""
    teacher, data = teacher_identity(params), data_identity(params)
    losses = ", ".join(f"{params[f'losses.{i}.name']} x{_figure(params.get(f'losses.{i}.weight', 1))}"
                       for i in range(100) if params.get(f"losses.{i}.name"))
    source = f"the teacher `{teacher}` ({params.get('teacher.name')})" if teacher else "without a teacher"
    student = student_identity(params) or "see the parameters"
    text = (f"kdistill distilled {source} into a student ({student}) with the {params.get('strategy.name')} strategy"
            + (f" (losses: {losses})" if losses else "")
            + f", on {params.get('data.name')} data" + (f" (`{data}`)" if data else "")
            + f", for {params['train.steps']} steps of {params.get('train.batch_size')} sequences"
            + f" x {params.get('train.grad_accum', 1)} accumulation at lr {_figure(params.get('train.lr'))}.")
    if summary is None:
        return text
    before, after = summary.get("before") or {}, summary.get("after") or {}
    keys = [k for k in after if k.startswith(("val/", "retention/"))] or [k for k in after if k.startswith("train/loss")]
    figures = [f"{k} {_figure(before[k])} -> {_figure(after[k])}" if k in before and before[k] != after[k]
               else f"{k} {_figure(after[k])}{' (unchanged)' if k in before else ''}" for k in keys]
    if figures:
        more = f" ({len(figures) - most} more in the run's metrics)" if len(figures) > most else ""
        text += f" Before -> after training: {'; '.join(figures[:most])}{more}."
    if summary.get("final_model"):
        text += f" The student: `{summary['final_model']}`."
    return text


def _requirements() -> list[str]:
    """The model's pip requirements, pinned to what is installed (MLflow would otherwise load the model to infer them)."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        try:
            pinned.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pinned


# ----------------------------------------------------------------------------- several runs side by side


def compare_url(run_folders: list[str | Path], ui: str = UI) -> str:
    """The MLflow UI's address that compares the runs written to these folders (their `mlflow_run.json`)."""
    from mlflow.tracking import MlflowClient

    runs, experiments = [], []
    for folder in run_folders:
        record = json.loads((Path(folder) / _RUN_ID_FILE).read_text())
        runs.append(record["run_id"])
        experiment = MlflowClient(tracking_uri=record.get("tracking_uri")).get_run(record["run_id"]).info.experiment_id
        experiments += [experiment] if experiment not in experiments else []
    query = urllib.parse.urlencode({"runs": json.dumps(runs, separators=(",", ":")), "experiments": json.dumps(
        experiments, separators=(",", ":")), "workflowType": "machine_learning"}, quote_via=urllib.parse.quote)
    return f"{ui.rstrip('/')}/#/compare-runs?{query}"


@kdistill.hookimpl
def kd_register_trackers():
    return [MlflowTracker]


def main(argv: list[str] | None = None) -> None:
    """python -m kdistill.plugins.trackers.mlflow_tracker RUN_FOLDER... [--ui URL]: print the compare page's address."""
    args = list(sys.argv[1:] if argv is None else argv)
    ui = args.pop(args.index("--ui") + 1) if "--ui" in args[:-1] else "http://127.0.0.1:5000"
    folders = [a for a in args if a != "--ui"]
    if not folders:
        sys.exit("usage: python -m kdistill.plugins.trackers.mlflow_tracker RUN_FOLDER... [--ui http://127.0.0.1:5000]")
    print(compare_url(folders, ui))


if __name__ == "__main__":
    main()
