"""LoRA students (student.lora, through peft): only the adapters train and are checkpointed, resume is exact,
and final/ is both the merged model (AutoModelForCausalLM) and the adapter (peft), which agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import cli_result, cut_after, engine_for, write_recipe
from kdistill.core import adapters

peft = pytest.importorskip("peft", reason="needs peft (pip install 'kdistill[lora]'; the dev extra has it)")

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def lora_recipe(recipe_factory, **train):
    raw = recipe_factory(**{"steps": 4, "save_every": 2, "keep_checkpoints": 3, **train})
    raw["student"]["lora"] = dict(LORA)
    return raw


def stored(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_only_the_adapters_train_and_are_checkpointed_and_final_is_merged_and_adapter(recipe_factory, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = lora_recipe(recipe_factory)
    engine = engine_for(raw)
    engine.run()
    student = engine.student
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert {id(p) for g in engine.optimizer.param_groups for p in g["params"]} == {id(p) for p in student.parameters() if p.requires_grad}

    checkpoint = stored(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert set(checkpoint) == {f"student.{n}" for n in trained}
    adapter_numel = sum(t.numel() for t in checkpoint.values())
    assert adapter_numel < 0.1 * sum(p.numel() for p in student.parameters())
    lora_b = [v for k, v in checkpoint.items() if ".lora_B." in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # the adapters did move (lora_B starts at zero)

    ids = torch.randint(0, student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    student.eval()
    with torch.no_grad():
        expected = student(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        base = engine_for({**raw, "student": {"from_teacher": raw["student"]["from_teacher"]}, "output_dir": str(tmp_path / "base")})
        base.build()  # the same base student, rebuilt from the teacher without adapters
        adapted = PeftModel.from_pretrained(base.student, tmp_path / "run" / "final" / "adapter").eval()
        torch.testing.assert_close(adapted(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_lora_run_resumes_exactly(recipe_factory, tmp_path):
    raw = lora_recipe(recipe_factory)
    engine_for(raw).run()
    again = cut_after(raw, tmp_path / "resumed", "step-00000004")
    engine_for(again).run(resume=True)
    a = stored(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = stored(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_target_modules_that_match_nothing_list_the_candidates(recipe_factory, tmp_path):
    raw = lora_recipe(recipe_factory)
    raw["student"]["lora"]["target_modules"] = ["q_proj", "qkv"]
    code, out, err = cli_result("run", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2
    assert err.strip().splitlines()[-1] == ("error: student.lora.target_modules: 'qkv' match no module of the student; its linear "
                                            "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("strategy, reason", [
    ("online", "it trains the teacher too, and a LoRA student's adapters are the student's alone"),
    ("ema-self", "its teacher is an average of the student's whole weights, not of adapters"),
])
def test_strategies_that_do_not_fit_a_lora_student_are_refused_at_validation(recipe_factory, tmp_path, strategy, reason):
    raw = lora_recipe(recipe_factory)
    raw["strategy"] = {"name": strategy}
    code, out, err = cli_result("validate", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2
    assert f"student.lora: not with strategy '{strategy}': {reason}" in err


def test_qlora_trains_adapters_on_a_4_bit_base_and_resumes_exactly(recipe_factory, tmp_path):
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'kdistill[quant]')")
    from transformers import AutoModelForCausalLM

    raw = lora_recipe(recipe_factory, lr=3e-2)  # adapters that move far enough to tell merged from not
    vocab = json.loads((Path(raw["teacher"]["options"]["model"]) / "config.json").read_text())["vocab_size"]
    # widths that bitsandbytes' packed 4-bit CPU kernel takes (multiples of 64)
    raw["student"] = {"config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1},
                      "lora": {**LORA, "quantization": "nf4"}}
    engine = engine_for(raw)
    engine.run()
    q_proj = engine.student.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    # never repacked for the AVX-512 BF16 kernel (no backward): on such a CPU the resume below differed
    assert q_proj.base_layer.support_avx512bf16_for_cpu is False
    assert not getattr(q_proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    checkpoint = stored(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert checkpoint and all(".lora_" in k for k in checkpoint)
    again = cut_after(raw, tmp_path / "resumed", "step-00000004")
    engine_for(again).run(resume=True)
    resumed = stored(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(checkpoint[k], resumed[k]) for k in checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # merged into the 4-bit base
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    engine.student.eval()
    with torch.no_grad():
        expected = engine.student(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
        with adapters.wrapper(engine.student).disable_adapter():
            base = engine.student(input_ids=ids).logits
    # the merged model is the adapted one up to re-quantizing the merged weights: far closer than the base
    effect, error = (expected - base).abs().mean(), (got - expected).abs().mean()
    assert error < 0.25 * effect, (error, effect)


def _strategy_recipe(name, recipe_factory, tiny_assets, tmp_path):
    from conftest import chat_assets, tiny_recipe

    if name == "on-policy":
        teacher, data = chat_assets(tiny_assets, tmp_path / "chat")
        raw = tiny_recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / "run", steps=2, batch_size=3)
        raw["data"] = data
        raw["strategy"] = {"name": "on-policy", "options": {"max_new_tokens": 6, "temperature": 1.0}}
        raw["losses"] = [{"name": "jsd", "weight": 1.0, "options": {"beta": 0.5}}]
    else:
        raw = recipe_factory(steps=2)
        raw["strategy"] = {"name": name, "options": {"multi-view": {"view": "mask", "rate": 0.2}, "mtp-self": {"n_future": 2}}[name]}
    raw["evaluators"] = []
    raw["student"]["lora"] = dict(LORA)
    return raw


@pytest.mark.parametrize("strategy", ["multi-view", "mtp-self", "on-policy"])
def test_lora_students_train_under_the_other_strategies_that_fit(recipe_factory, tiny_assets, tmp_path, strategy):
    """Only the adapters (and a strategy's own extra heads) move; the base weights stay the teacher's."""
    engine = engine_for(_strategy_recipe(strategy, recipe_factory, tiny_assets, tmp_path))
    engine.build()
    before = {n: p.detach().clone() for n, p in engine.student.named_parameters()}
    engine.run()
    moved = {n for n, p in engine.student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved), sorted(moved)[:5]
