"""Progressive distillation: a chain teacher -> intermediate student(s) -> final student (design 8.2)."""

from __future__ import annotations

import copy
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
    chain = True  # the engine runs stage_recipes() one after another instead of a training loop

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

    def trainable(self):  # pragma: no cover - a chain has no loop of its own
        raise NotImplementedError("progressive runs its stages; it trains nothing itself")

    def loss(self, batch):  # pragma: no cover
        raise NotImplementedError("progressive runs its stages; it trains nothing itself")


@kdistill.hookimpl
def kd_register_strategies():
    return [Progressive]
