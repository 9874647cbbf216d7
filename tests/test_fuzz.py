"""Fuzzing the recipe reader: every input is valid or rejected with exit code 2 and a message.

The same examples on every run, so that CI is reproducible; `KDISTILL_FUZZ_EXPLORE=1` draws
fresh ones (and ten times as many) to look for new faults."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kdistill.cli import app

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

EXPLORE = os.environ.get("KDISTILL_FUZZ_EXPLORE") == "1"
RUNS = settings(max_examples=1500 if EXPLORE else 150, deadline=None, derandomize=not EXPLORE,
                suppress_health_check=[HealthCheck.too_slow])

FOLDER = Path(tempfile.mkdtemp(prefix="kdistill-fuzz-"))
(FOLDER / "teacher").mkdir()  # the inputs exist, so that recipes can be valid (validate checks them)
(FOLDER / "corpus.txt").write_text("some text\n")

BASE = {
    "student": {"from_teacher": {"layers": [0, 3]}},
    "teacher": {"name": "hf", "options": {"model": str(FOLDER / "teacher")}},
    "data": {"name": "text-files", "options": {"paths": [str(FOLDER / "corpus.txt")], "seq_len": 32}},
    "losses": [{"name": "forward-kl", "weight": 0.5, "options": {"temperature": 2.0}}, {"name": "cross-entropy"}],
    "scheduler": {"name": "cosine-warmup", "options": {"warmup_steps": 2}},
    "evaluators": [{"name": "perplexity"}],
    "tracker": {"name": "jsonl"},
    "train": {"steps": 6, "lr": 1e-3, "batch_size": 4},
    "output_dir": str(FOLDER / "out"),
}


def paths(node, prefix=()):
    """Every place in the recipe a mutation can hit: (container path, key)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, prefix + (index,))


PLACES = list(paths(BASE))[1:]


def validate(text: str):
    path = FOLDER / "recipe.yaml"
    path.write_text(text)
    return CliRunner().invoke(app, ["validate", str(path)])


def check(result):
    # exit code 0 (valid) or 2 with one 'error:' line per problem; any other exception fails the test
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), result.stderr


def test_the_unmutated_recipe_is_valid():
    result = validate(yaml.safe_dump(BASE, sort_keys=False))
    assert result.exit_code == 0, result.stderr


@RUNS
@given(st.lists(st.tuples(st.sampled_from(PLACES), st.sampled_from(["replace", "delete", "add"]), values),
                min_size=1, max_size=3))
def test_mutated_recipes_are_valid_or_rejected_with_exit_code_2(mutations):
    recipe = copy.deepcopy(BASE)
    for place, op, value in mutations:
        parent = recipe
        try:
            for key in place[:-1]:
                parent = parent[key]
            if op == "replace":
                parent[place[-1]] = value
            elif op == "delete":
                del parent[place[-1]]
            elif isinstance(parent, dict):
                parent[f"extra_{place[-1]}"] = value
            else:
                parent.append(value)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier mutation removed or replaced this place
    check(validate(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)))


SYMBOLS = list(":-[]{}'\"#\n\t &*!|>%@`,?=\\") + ["!!python/object:os.system", "<<: *a", "&a ", "1e400", "null", "~", "0x1F"]


@RUNS
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 12), st.sampled_from(SYMBOLS)), min_size=1, max_size=4))
def test_mutated_yaml_text_is_valid_or_rejected_with_exit_code_2(edits):
    text = yaml.safe_dump(BASE, sort_keys=False)
    for position, cut, insert in edits:
        position %= len(text) + 1
        text = text[:position] + insert + text[position + cut:]
    check(validate(text))
