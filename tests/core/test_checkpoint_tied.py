"""Tied weights (an embedding that is also the output matrix) are stored once in a checkpoint and come back
tied: the checkpoint of a tied student is smaller by one copy of the embedding, and resuming restores the
same weights and optimizer state."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill.core import checkpoint as ckpt

VOCAB, HIDDEN = 512, 32


def tied_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def trained_step(model: LlamaForCausalLM) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    model = tied_model(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer = trained_step(model)
    folder = ckpt.save_checkpoint(tmp_path, 1, {"student": model}, optimizer, {"step": 1}, keep=1)

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    every = {f"student.{k}" for k in model.state_dict()}
    assert every - stored == {"student.lm_head.weight"}  # the tied copy is an alias, not a second matrix
    embedding_bytes = VOCAB * HIDDEN * 4
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = (folder / "model.safetensors").stat().st_size
    assert size < weight_bytes - embedding_bytes + 4096  # one copy of the embedding (plus the header)

    other = tied_model(1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    trained_step(other)  # different weights and state to overwrite
    ckpt.load_checkpoint(folder, {"student": other}, other_optimizer)
    assert other.lm_head.weight is other.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name
    for (_, a), (_, b) in zip(sorted(optimizer.state_dict()["state"].items()), sorted(other_optimizer.state_dict()["state"].items())):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_untied_weights_that_are_equal_are_both_stored(tmp_path):
    """Only shared memory is an alias: two separate tensors with equal values are two tensors."""
    model = tied_model(0)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    folder = ckpt.save_checkpoint(tmp_path, 1, {"student": model}, torch.optim.AdamW(model.parameters()), {"step": 1}, keep=1)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        assert "student.lm_head.weight" in set(handle.keys())
        assert ckpt.ALIASES not in (handle.metadata() or {})
