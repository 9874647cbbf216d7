"""final/README.md: the student's model card, so that the folder says what it is wherever it goes
(the Hugging Face hub, an MLflow model, a colleague's disk): the teacher, the recipe, the data, the
steps and the measured results, and how to load it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from kdistill.__about__ import __version__

_CREDENTIALS = re.compile(r"://[^/@\s]+@")  # user:password@ in a URL (a served teacher's) is not for a model card


def _student(recipe: Mapping[str, Any], layer_choice: Mapping[str, Any] | None, parameters: int) -> str:
    spec = recipe["student"]
    if spec.get("from_teacher"):
        cut = spec["from_teacher"]
        layers = layer_choice["layers"] if layer_choice else cut["layers"]
        how = f"the teacher's layers {layers}" + (f", the {len(layers)} most important by {layer_choice['by']}"
                                                  if layer_choice and "by" in layer_choice else "")
        width = (layer_choice or {}).get("width")
        if width:
            how += (f"; {width['heads'] or 'all'} attention heads and {width['mlp'] or 'all'} MLP channels per layer, "
                    "the most important by activation")
    elif spec.get("model"):
        how = f"the model in `{spec['model']}`"
    else:
        how = "a fresh model built from `student.config`"
    lora = spec.get("lora")
    adapters = (f"; LoRA adapters (r {lora['r']}, alpha {lora['alpha']}, on {lora['target_modules']}"
                f"{', 4-bit base ' + lora['quantization'] if lora.get('quantization', 'none') != 'none' else ''}) trained and merged in; "
                "the adapter alone is in `adapter/`") if lora else ""
    return f"{parameters / 1e6:.1f}M parameters: {how}{adapters}"


def _results(result: Mapping[str, Any]) -> list[str]:
    before, after = result.get("before") or {}, result.get("after") or {}
    keys = [k for k in after if not k.startswith("train/")]
    if not keys:
        return ["No evaluator ran (the recipe lists none)."]
    rows = ["| metric | before distillation | after |", "|---|---|---|"]
    for key in keys:
        b = before.get(key)
        rows.append(f"| {key} | {'' if b is None else f'{b:.4g}'} | {after[key]:.4g} |")
    return rows


def model_card(recipe: Mapping[str, Any], result: Mapping[str, Any], parameters: int,
               layer_choice: Mapping[str, Any] | None = None) -> str:
    teacher = recipe.get("teacher") or {}
    teacher_model = (teacher.get("options") or {}).get("model", teacher.get("name", "none"))
    data = recipe.get("data") or {}
    paths = (data.get("options") or {}).get("paths", [])
    train = recipe["train"]
    losses = ", ".join(f"{item['name']} (weight {item.get('weight', 1.0)})" for item in recipe.get("losses", []))
    strategy = (recipe.get("strategy") or {}).get("name", "offline")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [kdistill, knowledge-distillation]",
        "---",
        f"# {recipe.get('run_name') or Path(recipe['output_dir']).name}: a student distilled with kdistill",
        "",
        f"- **Teacher:** `{teacher_model}` ({teacher.get('name', '')})",
        f"- **Student:** {_student(recipe, layer_choice, parameters)}",
        f"- **Data:** {', '.join(f'`{p}`' for p in paths) or data.get('name', '')} ({data.get('name', '')})",
        f"- **Training:** strategy {strategy}; losses {losses}; {train['steps']} steps of {train['batch_size']} sequences"
        f" x {train.get('grad_accum', 1)} accumulation, learning rate {train['lr']}, seed {train.get('seed', 0)}",
        f"- **Made with:** kdistill {__version__}; the whole recipe is below and in the run folder (`recipe.yaml`)",
        "",
        "## Results",
        "",
        "Measured by the recipe's evaluators on held-out data, before distillation and after it:",
        "",
        *_results(result),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        _CREDENTIALS.sub("://***@", yaml.safe_dump(dict(recipe), sort_keys=False).rstrip()),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, recipe: Mapping[str, Any], result: Mapping[str, Any], parameters: int,
                     layer_choice: Mapping[str, Any] | None = None) -> Path:
    """Write `folder/README.md` (through a temporary file: a reader never sees half a card)."""
    path = folder / "README.md"
    tmp = folder / ".README.md.tmp"
    tmp.write_text(model_card(recipe, result, parameters, layer_choice))
    tmp.replace(path)
    return path
