"""final/README.md, the student's model card: the teacher, the student, the data, the steps, the measured
results (the same figures as summary.json) and the recipe."""

from __future__ import annotations

import json

import yaml

from conftest import engine_for
from kdistill.core.model_card import model_card


def test_the_final_folder_carries_a_model_card_with_the_runs_figures(recipe_factory, tmp_path):
    raw = recipe_factory(steps=3)
    engine_for(raw).run()
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    result = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"- **Teacher:** `{raw['teacher']['options']['model']}` (hf)" in card
    assert "the teacher's layers [0, 3]" in card
    assert f"`{raw['data']['options']['paths'][0]}` (text-files)" in card
    assert "3 steps of 4 sequences x 1 accumulation, learning rate 0.001" in card
    before, after = result["before"]["val/student_ppl"], result["after"]["val/student_ppl"]
    assert f"| val/student_ppl | {before:.4g} | {after:.4g} |" in card
    recipe_block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe_block) == yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())


def test_credentials_in_urls_stay_out_of_the_card():
    recipe = {"student": {"model": "s"}, "teacher": {"name": "vllm", "options": {"urls": ["http://user:secret@host:8000"]}},
              "train": {"steps": 1, "batch_size": 1, "lr": 0.1}, "output_dir": "runs/x", "losses": []}
    card = model_card(recipe, {"before": {}, "after": {}}, 1000)
    assert "secret" not in card and "http://***@host:8000" in card
