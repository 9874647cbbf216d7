"""Quantized teachers (bitsandbytes 4-bit and 8-bit), on tiny models, on every kind of CPU.

On CPUs with AVX-512 BF16, bitsandbytes repacks a 4-bit layer's weights for a fused kernel the first
time the layer runs in eval mode without gradients, exactly how a teacher runs. The repacking tests
below force that path wherever the suite runs; on a CPU without the instruction set the fused kernel
itself is replaced by an independent decoder of the packed layout (the kernel would read it wrongly).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import engine_for, tiny_recipe, write_recipe
from kdistill.cli import app
from kdistill.core.models import dense_weights, unpack_cpu_4bit

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes: pip install 'kdistill[quant]' (.ci/run does)")


def llama_teacher(assets, folder: Path, hidden: int, intermediate: int) -> str:
    """A 4-layer Llama teacher of the given widths, with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def wide_teacher(tiny_assets, tmp_path_factory):
    """Every linear layer a multiple of the 4-bit block (64) wide: all of them quantize."""
    return llama_teacher(tiny_assets, tmp_path_factory.mktemp("wide"), hidden=64, intermediate=128)


@pytest.fixture(scope="module")
def mixed_teacher(tiny_assets, tmp_path_factory):
    """MLP width 96: down_proj reads 96 features, which the packed CPU kernel cannot take."""
    return llama_teacher(tiny_assets, tmp_path_factory.mktemp("mixed"), hidden=64, intermediate=96)


def load_teacher(model: str, quantization: str = "nf4", double_quant: bool = True):
    from kdistill.plugins.teachers.hf import HFTeacher

    teacher = HFTeacher(HFTeacher.Options(model=model, quantization=quantization, double_quant=double_quant))
    teacher.load(torch.device("cpu"))
    return teacher


def layer_kinds(model) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()
            if type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")}


def packed_kernel(A: torch.Tensor, B: torch.Tensor, out=None, state=None) -> torch.Tensor:
    """Stands in for the fused kernel where the CPU lacks it: A @ W.T in bfloat16, as the kernel computes,
    with W decoded from the packed layout (the decoder is checked against bitsandbytes' own below)."""
    weight = unpack_cpu_4bit(B, state).to(torch.bfloat16)
    result = (A.to(torch.bfloat16) @ weight.T).to(A.dtype)
    return result if out is None else out.copy_(result)


@pytest.fixture
def packed_cpu_path(monkeypatch):
    """Make every Linear4bit take the AVX-512 BF16 repacking path; returns the function that forces it."""
    import bitsandbytes.functional as bnb_functional

    if not bnb_functional.has_avx512bf16():
        monkeypatch.setattr(bnb_functional, "gemv_4bit", packed_kernel)

    def force(model):
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.support_avx512bf16_for_cpu = True
    return force


def dequantized_copy(teacher):
    """The teacher as a plain float32 model with its quantized weights dequantized."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    state = {k: v.float() for k, v in dense_weights(teacher.model).items() if k in plain.state_dict()}
    plain.load_state_dict(state)
    return plain.eval()


def teacher_logits(teacher, ids):
    import kdistill

    batch = kdistill.Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    needs = kdistill.Needs(logits=True)
    return teacher.outputs(batch, needs).logits.float()


def test_a_4bit_teacher_loads_and_teacher_check_reports_its_perplexity(tiny_assets, wide_teacher, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "run")
    raw["teacher"]["options"].update(model=wide_teacher, quantization="nf4", double_quant=True)
    path = write_recipe(tmp_path / "q.yaml", raw)
    result = CliRunner().invoke(app, ["teacher-check", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "analysis" / "teacher_check.json").read_text())
    assert report["quantization"] == "nf4" and report["positions"] > 0
    assert report["quant_mib"] < report["full_mib"]
    assert report["kl_full_quant"] > 0 and 0 <= report["top1_agreement"] <= 1
    assert f"| nf4 | {report['quant_ppl']:.3f} |" in result.stdout
    assert f"| full precision | {report['full_ppl']:.3f} |" in result.stdout
    kinds = layer_kinds(load_teacher(wide_teacher).model)
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"Linear4bit"} and len(kinds) == 4 * 7
    summary = engine_for(raw).run()  # a student distilled from the 4-bit teacher
    assert summary["after"]["val/teacher_ppl"] == pytest.approx(report["quant_ppl"], rel=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_the_repacked_cpu_path_computes_what_the_dequantized_teacher_does(wide_teacher, packed_cpu_path, double_quant):
    teacher = load_teacher(wide_teacher, double_quant=double_quant)
    reference = dequantized_copy(teacher)
    packed_cpu_path(teacher.model)
    ids = torch.randint(2, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = teacher_logits(teacher, ids)  # eval mode, no gradients: the layers repack here
    states = [m.weight.quant_state for m in teacher.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(states) == 28 and all(s.packing_format_for_cpu for s in states)
    with torch.no_grad():
        expected = reference(ids).logits
    # the packed kernel computes in bfloat16 (3 significant digits) from bfloat16 scales
    assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()
    again = teacher_logits(teacher, ids)  # already packed: the same result from the packed weights
    assert torch.equal(again, logits)


def test_a_student_cut_from_a_teacher_that_ran_repacked_starts_from_its_weights(wide_teacher, packed_cpu_path):
    fresh = dense_weights(load_teacher(wide_teacher, double_quant=False).model)
    teacher = load_teacher(wide_teacher, double_quant=False)
    packed_cpu_path(teacher.model)
    teacher_logits(teacher, torch.randint(2, 100, (1, 8)))
    cut = dense_weights(teacher.model)
    name = "model.layers.2.mlp.up_proj.weight"
    assert fresh.keys() == cut.keys()
    # packing stores the scales in bfloat16: the weights come back to within its rounding
    for key, value in fresh.items():
        assert torch.allclose(cut[key].float(), value.float(), rtol=1e-2, atol=1e-6), key
    assert not torch.equal(cut[name], torch.zeros_like(cut[name]))


def test_layers_the_packed_kernel_cannot_take_stay_unquantized_with_one_warning(mixed_teacher, packed_cpu_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        teacher = load_teacher(mixed_teacher)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "kdistill"]
    assert warnings == ["teacher.options.model: 4 linear layers kept unquantized, their widths not multiples of the "
                        "4-bit block (in_features of 64, out_features of 32): model.layers.*.mlp.down_proj (x4)"]
    kinds = layer_kinds(teacher.model)
    assert {name for name, kind in kinds.items() if kind == "Linear"} == {
        "lm_head", *(f"model.layers.{i}.mlp.down_proj" for i in range(4))}
    assert sum(kind == "Linear4bit" for kind in kinds.values()) == 4 * 6
    reference = dequantized_copy(teacher)
    packed_cpu_path(teacher.model)
    ids = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = teacher_logits(teacher, ids)  # without the skip: a reshape error in the repacking
    with torch.no_grad():
        expected = reference(ids).logits
    assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()


def test_a_teacher_narrower_than_the_block_runs_a_whole_distillation(tiny_assets, tmp_path, packed_cpu_path, caplog):
    """Hidden size 32: every layer that reads it is narrower than the 4-bit block and stays unquantized;
    down_proj (64 -> 32) quantizes and repacks. A whole run on the repacking path."""
    import kdistill.plugins.teachers.hf as hf

    original = hf.HFTeacher.load

    def load_and_force(self, device):
        original(self, device)
        packed_cpu_path(self.model)
    raw = tiny_recipe(tiny_assets, tmp_path / "run", steps=2)
    raw["teacher"]["options"].update(quantization="fp4")
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        engine = engine_for(raw)
        hf.HFTeacher.load = load_and_force
        try:
            summary = engine.run()
        finally:
            hf.HFTeacher.load = original
    assert summary["after"]["val/teacher_ppl"] > 0
    assert any("24 linear layers kept unquantized" in r.getMessage() for r in caplog.records)
    quantized = {name for name, kind in layer_kinds(engine.teacher.model).items() if kind == "Linear4bit"}
    assert quantized == {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
    assert all(engine.teacher.model.get_submodule(name).weight.quant_state.packing_format_for_cpu for name in quantized)


def test_int8_teachers_are_not_affected_by_the_4bit_block(mixed_teacher, caplog):
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        teacher = load_teacher(mixed_teacher, quantization="int8")
    assert not [r for r in caplog.records if r.name == "kdistill" and r.levelno >= logging.WARNING]
    kinds = layer_kinds(teacher.model)
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"Linear8bitLt"}


def test_teacher_check_refuses_an_unquantized_teacher(tiny_assets, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_assets, tmp_path / "run"))
    result = CliRunner().invoke(app, ["teacher-check", str(path)])
    assert result.exit_code == 2
    assert result.stderr == ("error: teacher.options.quantization: the recipe's teacher is not quantized (set nf4, fp4 or "
                             "int8); nothing to compare\n")
