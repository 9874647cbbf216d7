"""The README's commands and the recipe reference stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from kdistill.core.config import DistributedSpec, Recipe, StudentSpec, TrainSpec

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_recipe_reference_lists_every_field():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for heading, model in (("## Top level", Recipe), ("## `student`", StudentSpec), ("## `train`", TrainSpec),
                           ("## `distributed`", DistributedSpec)):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
        assert documented == set(model.model_fields), heading
