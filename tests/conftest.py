"""Shared fixtures: a tiny tokenizer, teacher and corpus built locally (no network, no downloads)."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# dequantized GGUF copies go to a folder of this test session's, never to the user's ~/.cache
os.environ["KDISTILL_CACHE"] = tempfile.mkdtemp(prefix="kdistill-test-cache-")
atexit.register(shutil.rmtree, os.environ["KDISTILL_CACHE"], True)

WORDS = ("the king queen lord lady speak shall will not thou thee my our good night day love war peace "
         "sword crown house come go stay fly rest sleep dream of and to in with for but is was").split()


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return "\n".join(lines) + "\n"


def byte_level_bpe(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on `text` (with <pad> and <eos>), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A byte-level BPE tokenizer, a 4-layer Llama teacher (safetensors) and a text file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    text = make_text()
    corpus = root / "corpus.txt"
    corpus.write_text(text)

    fast = byte_level_bpe(text, 128)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(config)
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir, safe_serialization=True)
    fast.save_pretrained(teacher_dir)
    return {"root": root, "teacher": str(teacher_dir), "corpus": str(corpus)}


def numeric_grad(fn, x, eps=1e-6):
    """Central differences of a float64 function of the tensor x, element by element."""
    import torch

    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = fn(x)
        flat[i] = old - eps
        lo = fn(x)
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return grad


def tiny_recipe(assets, output_dir, **train) -> dict:
    recipe = {
        "student": {"from_teacher": {"layers": [0, 3]}},
        "teacher": {"name": "hf", "options": {"model": assets["teacher"]}},
        "data": {"name": "text-files", "options": {"paths": [assets["corpus"]], "seq_len": 32, "val_fraction": 0.1,
                                                    "max_val_blocks": 4}},
        "losses": [{"name": "forward-kl", "weight": 0.5, "options": {"temperature": 2.0}},
                   {"name": "cross-entropy", "weight": 0.5}],
        "scheduler": {"name": "cosine-warmup", "options": {"warmup_steps": 2}},
        "evaluators": [{"name": "perplexity"}],
        "tracker": {"name": "jsonl"},
        "train": {"steps": 6, "lr": 1e-3, "batch_size": 4, "seed": 0, "num_threads": 1, **train},
        "output_dir": str(output_dir),
    }
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_factory(tiny_assets, tmp_path):
    def make(**train):
        return tiny_recipe(tiny_assets, tmp_path / "run", **train)
    return make


def cut_after(raw: dict, resumed: Path, last: str) -> dict:
    """A copy of the finished run of `raw` in `resumed`, as if it died before checkpoint `last` and the
    final model: the recipe for resuming it there."""
    import json
    import shutil

    shutil.copytree(raw["output_dir"], resumed)
    shutil.rmtree(resumed / "checkpoints" / last)
    shutil.rmtree(resumed / "final")
    again = json.loads(json.dumps(raw))
    again["output_dir"] = str(resumed)
    return again


def engine_for(raw):
    """An engine for a raw recipe mapping, with the installed plugins."""
    from kdistill.core.config import resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    pm = make_plugin_manager()
    registry = Registry.from_plugins(pm)
    return Engine(resolve(raw, registry), pm, registry)


def nan_at(engine, call):
    """Make the strategy's loss NaN at its `call`-th micro-batch (counting from 1)."""
    original = engine.build

    def poisoned():
        original()
        step_loss = engine.strategy.loss
        calls = {"n": 0}

        def loss(batch):
            calls["n"] += 1
            total, terms = step_loss(batch)
            return (total * float("nan") if calls["n"] == call else total), terms
        engine.strategy.loss = loss
    engine.build = poisoned
    return engine


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT_QA = [("who is the king", "the lord of the house"), ("what is war", "no peace"), ("speak of love", "love is good"),
           ("where do we go", "to the house of the queen"), ("when will we rest", "at night"),
           ("dream of what", "of peace and day")]


def chat_assets(assets, folder: Path) -> tuple[Path, dict]:
    """The tiny teacher with a chat template (<eos> ends a turn), and a conversations data section of
    prompt + completion rows, one per row (layout pad)."""
    import json
    import shutil

    from transformers import AutoTokenizer

    teacher = folder / "chat-teacher"
    if not teacher.exists():
        shutil.copytree(assets["teacher"], teacher)
        tok = AutoTokenizer.from_pretrained(teacher)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(teacher)
    path = folder / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{q} {i}", "completion": a}) + "\n" for i in range(4) for q, a in CHAT_QA))
    return teacher, {"name": "conversations", "options": {"paths": [str(path)], "seq_len": 64, "layout": "pad",
                                                          "val_fraction": 0.1}}


def cli_result(*args) -> tuple[int, str, str]:
    """Runs `kdistill ARGS` in this process; the exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from kdistill.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard of a generated folder, by name (for byte-for-byte comparisons)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}
