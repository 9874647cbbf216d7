"""What a chain strategy (progressive) gets to run its stages, each a complete run of its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdistill.core import checkpoint as ckpt
from kdistill.core import run_folder, summary
from kdistill.core.config import Plan, resolve


class StageRunner:
    """Resolves stage recipes with the run's registry, runs each through a new engine, and reports."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.flatten = summary.flatten

    def resolve(self, raw: dict[str, Any]) -> Plan:
        return resolve(raw, self.engine.registry, made_earlier=("teacher",))  # a stage's teacher is made by the stage before

    def run(self, plan: Plan, resume: bool, overwrite: bool, force: bool) -> dict[str, Any]:
        return type(self.engine)(plan, self.engine.pm, self.engine.registry).run(resume=resume, overwrite=overwrite, force=force)

    def has_checkpoint(self, out: Path) -> bool:
        return ckpt.latest_complete(Path(out) / "checkpoints")[0] is not None

    def write_recipe(self, plan: Plan, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_run_files(out, plan.recipe.model_dump(mode="json"), self.engine.registry)

    def write_summary(self, out: Path, result: dict[str, Any]) -> None:
        """summary.json as JSON (NaN as null), as every run writes it."""
        (Path(out) / "summary.json").write_text(json.dumps(summary.json_safe(result), indent=1, allow_nan=False))

    def say(self, text: str) -> None:
        self.engine.console.print(text, soft_wrap=True)
