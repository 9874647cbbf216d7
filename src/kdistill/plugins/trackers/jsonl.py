"""Metrics as JSON lines in the run's folder: no dependencies, always readable."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import kdistill


class JsonlTracker(kdistill.Tracker):
    """Appends params and metrics to `<output_dir>/metrics.jsonl`; artifacts are copied beside it."""

    name = "jsonl"

    class Options(kdistill.Options):
        filename: str = "metrics.jsonl"

    def start(self, run_name, params, output_dir):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / self.options.filename
        self._write({"event": "start", "run_name": run_name, "params": dict(params)})

    def _write(self, record):
        record = {"time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics, step):
        self._write({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path, artifact_path=None):
        target = self.dir / "artifacts" / (artifact_path or "")
        target.mkdir(parents=True, exist_ok=True)
        src = Path(path)
        if src.resolve().parent == target.resolve() or src.resolve() == target.resolve():
            return
        if src.is_dir():
            shutil.copytree(src, target / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target / src.name)

    def finish(self, status="FINISHED"):
        self._write({"event": "finish", "status": status})


@kdistill.hookimpl
def kd_register_trackers():
    return [JsonlTracker]
