"""Per-task retention: multiple-choice accuracy of teacher and student through lm-evaluation-harness,
offline, on local Arrow files, and the student's share of the teacher's score per task."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

import kdistill
from kdistill import KdistillError, resolve_path


class TaskData(kdistill.Options):
    task: str = Field(description="an lm-evaluation-harness task to reuse, e.g. arc_easy, piqa, sciq")
    data: kdistill.LocalPath = Field(description="its split as a local Arrow file (or a folder holding one); pkg:// allowed")


class Retention(kdistill.Evaluator):
    """Teacher and student accuracy per task and the student's share of the teacher's (needs kdistill[eval])."""

    name = "retention"
    provides = ("retention/mean_share",)

    class Options(kdistill.Options):
        tasks: list[TaskData] = Field(min_length=1)
        limit: int | None = Field(50, ge=1, description="examples per task (None: all)")
        metric: Literal["acc", "acc_norm"] = "acc"
        batch_size: int = Field(8, ge=1)
        phases: list[Literal["before", "during", "final"]] = Field(["final"], description="evaluations that run it")

    def _task_dir(self, folder: Path) -> list[str]:
        from lm_eval.tasks import TaskManager

        if not hasattr(self, "_index"):  # indexing lm-eval's tasks takes seconds: once per run
            self._index = TaskManager()
        manager = self._index
        known = manager.all_tasks
        names = []
        for i, item in enumerate(self.options.tasks):
            if item.task not in known:
                raise KdistillError(f"evaluators: retention.tasks[{i}].task: lm-eval has no task '{item.task}'")
            data = resolve_path(item.data, f"retention.tasks[{i}].data")
            if data.is_dir():
                found = sorted(data.rglob("*.arrow"))
                data = found[0] if found else data
            if not data.is_file():
                raise KdistillError(f"evaluators: retention.tasks[{i}].data: no Arrow file at {item.data}")
            entry = manager.task_index[item.task]
            source = Path(entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path)
            name = f"kd_{item.task}"
            spec = {"include": str(source), "task": name, "tag": [], "dataset_path": "arrow", "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"validation": str(data)}},
                    "training_split": None, "test_split": None, "validation_split": "validation", "fewshot_split": None}
            (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
            names.append(name)
        return names

    def _accuracy(self, model, tokenizer, names, manager) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        model.eval()
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.options.batch_size),
                                  tasks=names, limit=self.options.limit, task_manager=manager,
                                  log_samples=False, verbosity="ERROR")
        model.train(was_training)
        key = f"{self.options.metric},none"
        return {name: float(results["results"][name][key]) for name in names}

    def evaluate(self, context):
        if context.phase not in self.options.phases or context.teacher is None or context.teacher.model is None:
            return {}
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise KdistillError("evaluators: retention needs lm-evaluation-harness: pip install 'kdistill[eval]'") from None
        from lm_eval.tasks import TaskManager

        with tempfile.TemporaryDirectory() as tmp:
            names = self._task_dir(Path(tmp))
            manager = TaskManager(include_path=tmp)
            if not hasattr(self, "_teacher_acc"):  # the teacher is frozen: score it once
                self._teacher_acc = self._accuracy(context.teacher.model, context.teacher.tokenizer or context.tokenizer, names, manager)
            student = self._accuracy(context.student, context.tokenizer, names, manager)
        rows, metrics = [], {}
        for name in names:
            task = name.removeprefix("kd_")
            t, s = self._teacher_acc[name], student[name]
            share = s / t if t > 0 else float("nan")
            rows.append({"task": task, "teacher": t, "student": s, "share": share})
            metrics.update({f"retention/{task}/teacher_{self.options.metric}": t, f"retention/{task}/student_{self.options.metric}": s,
                            f"retention/{task}/share": share})
        metrics["retention/mean_share"] = sum(r["share"] for r in rows) / len(rows)
        self._write(rows, context)
        return metrics

    def _write(self, rows, context) -> None:
        if context.output_dir is None:
            return
        folder = Path(context.output_dir) / "retention"
        folder.mkdir(parents=True, exist_ok=True)
        table = folder / f"retention_{context.phase}.json"
        table.write_text(json.dumps({"metric": self.options.metric, "limit": self.options.limit, "tasks": rows}, indent=1))
        paths = [table]
        try:
            from kdistill.toolkit import bars

            paths.append(bars([r["task"] for r in rows], {"teacher": [r["teacher"] for r in rows],
                                                           "student": [r["student"] for r in rows]},
                              self.options.metric, folder / f"retention_{context.phase}.png"))
        except ImportError:  # pragma: no cover - matplotlib is a dependency
            pass
        if context.log_artifact is not None:
            for path in paths:
                context.log_artifact(str(path), "retention")


@kdistill.hookimpl
def kd_register_evaluators():
    return [Retention]
