"""Progressive distillation: a chain teacher -> intermediate student(s) -> final student (design 8.2)."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

import kdistill


class Stage(kdistill.Options):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the stage's folder under OUTPUT_DIR/stages/")
    student: dict[str, Any] = Field(description="the intermediate student, as the recipe's `student` section; "
                                    "from_teacher cuts layers from this stage's teacher")
    steps: int = Field(ge=1, description="optimizer steps of this stage")
    strategy: dict[str, Any] = Field(default_factory=lambda: {"name": "offline"}, description="this stage's strategy")


class Progressive(kdistill.Strategy):
    """A chain of distillation runs in one recipe: the recipe's teacher teaches the first stage's
    student, each trained student becomes the next stage's teacher, and the recipe's own `student`
    (trained for `train.steps`) is the last. Each stage is a complete run in OUTPUT_DIR/stages/NAME
    with its own checkpoints, tracked as a nested MLflow run under the chain's run; a resumed chain
    skips the stages that finished and resumes the one that was interrupted."""

    name = "progressive"
    no_lora = "its stages hand whole students on from one to the next"
    chain = True  # runs whole stages (run_chain) instead of a training loop

    class Options(kdistill.Options):
        stages: list[Stage] = Field(min_length=1, description="the intermediate students, teacher side first")
        final_strategy: dict[str, Any] = Field(default_factory=lambda: {"name": "offline"},
                                               description="the strategy of the last stage (the recipe's student)")

    def stage_recipes(self, raw: dict[str, Any], output_dir: Path, run_name: str) -> list[tuple[str, dict[str, Any]]]:
        """(stage name, a complete recipe) for every stage, the last one training the recipe's student."""
        stages = [(s.name, s.student, s.steps, s.strategy) for s in self.options.stages]
        stages.append(("final", raw["student"], raw["train"]["steps"], self.options.final_strategy))
        recipes, teacher = [], raw.get("teacher")
        for name, student, steps, strategy in stages:
            recipe = copy.deepcopy(raw)
            recipe.update(student=copy.deepcopy(student), strategy=copy.deepcopy(strategy), teacher=copy.deepcopy(teacher),
                          output_dir=str(output_dir / "stages" / name), run_name=f"{run_name}-{name}")
            recipe["train"] = {**raw["train"], "steps": steps}
            recipes.append((name, recipe))
            teacher = {"name": "hf", "options": {"model": str(output_dir / "stages" / name / "final")}}
        return recipes

    def run_chain(self, plan, runner, resume: bool, overwrite: bool, force: bool) -> dict[str, Any]:
        """Stages one after another, each a complete run of its own, tracked as nested runs of this
        one; finished stages are skipped on --resume. `runner` is the engine's StageRunner."""
        if resume and overwrite:
            raise kdistill.KdistillError("--resume and --overwrite exclude each other")
        out = Path(plan.recipe.output_dir)
        run_name = plan.recipe.run_name or out.name
        stages = self.stage_recipes(plan.raw, out, run_name)
        plans, problems = [], []
        for i, (name, raw) in enumerate(stages):  # every stage validated before anything runs
            try:
                plans.append(runner.resolve(raw))
            except kdistill.KdistillError as exc:
                problems += [f"strategy.options.stages[{i}] ({name}): {p}" for p in exc.problems]
        if problems:
            raise kdistill.KdistillError(problems)
        folder = out / "stages"
        if resume and not folder.is_dir():
            raise kdistill.KdistillError(f"--resume: nothing to resume under {folder}")
        if folder.exists() and not (resume or overwrite):
            raise kdistill.KdistillError(f"output_dir: {out} already holds stages; pass --resume to continue or --overwrite to start over")
        if overwrite:
            shutil.rmtree(folder, ignore_errors=True)
            for name in ("final", "summary.json", "metrics.jsonl", "mlflow_run.json"):
                target = out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        runner.write_recipe(plan, out)
        tracker = plan.one("tracker").build()
        tracker.start(run_name, runner.flatten(plan.recipe.model_dump(mode="json")), str(out))
        status, results = "FAILED", {}
        try:
            for i, ((name, raw), stage_plan) in enumerate(zip(stages, plans)):
                stage_out = Path(raw["output_dir"])
                if (stage_out / "summary.json").is_file() and (stage_out / "final").is_dir():
                    runner.say(f"stage {name}: finished earlier, skipped")
                    results[name] = json.loads((stage_out / "summary.json").read_text())
                    continue
                again = resume and runner.has_checkpoint(stage_out)
                runner.say(f"stage {i + 1}/{len(stages)}: {name}" + (" (resuming)" if again else ""))
                results[name] = runner.run(stage_plan, resume=again, overwrite=not again and stage_out.exists(), force=force)
                tracker.log_metrics({f"{name}/{k}": v for k, v in results[name]["after"].items()
                                     if isinstance(v, (int, float))}, step=i + 1)
            last = results[stages[-1][0]]
            final, tmp = out / "final", out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last["final_model"], tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            summary = {"output_dir": str(out), "final_model": str(final),
                       "before": results[stages[0][0]]["before"], "after": last["after"],
                       "stages": {name: {"before": r["before"], "after": r["after"], "final_model": r["final_model"]}
                                  for name, r in results.items()}}
            runner.write_summary(out, summary)
            tracker.log_artifact(str(final), "model")
            status = "FINISHED"
            return summary
        finally:
            tracker.finish(status)

    def trainable(self):  # pragma: no cover - a chain has no loop of its own
        raise NotImplementedError("progressive runs its stages; it trains nothing itself")

    def loss(self, batch):  # pragma: no cover
        raise NotImplementedError("progressive runs its stages; it trains nothing itself")


@kdistill.hookimpl
def kd_register_strategies():
    return [Progressive]
