"""A frozen Hugging Face causal LM from a local folder or GGUF file."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import kdistill
from kdistill.toolkit import capture, choose_attention, frozen_outputs, load_causal_lm, load_tokenizer


class HFTeacher(kdistill.TeacherProvider):
    """A local Hugging Face model (safetensors folder or GGUF file), frozen, in the recipe's dtype."""

    name = "hf"

    class Options(kdistill.Options):
        model: kdistill.LocalPath = Field(description="local folder, .gguf file, or pkg://PACKAGE/PATH")
        gguf_file: str | None = Field(None, description="GGUF file name inside `model` (a folder)")
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
            "none", description="load the weights quantized by bitsandbytes (4-bit NF4/FP4 or 8-bit; CPU too); "
            "computation stays in `dtype`")
        double_quant: bool = Field(True, description="4-bit only: quantize the quantization constants too (QLoRA)")
        trust_remote_code: bool = False

    def load(self, device: torch.device) -> None:
        o = self.options
        self.model = load_causal_lm(o.model, "teacher.options.model", gguf_file=o.gguf_file, dtype=o.dtype,
                                    trust_remote_code=o.trust_remote_code, quantization=o.quantization,
                                    double_quant=o.double_quant)
        if o.quantization == "none":  # bitsandbytes places quantized weights itself
            self.model = self.model.to(device)
        choose_attention(self.model, device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = load_tokenizer(o.model, "teacher.options.model", gguf_file=o.gguf_file,
                                        trust_remote_code=o.trust_remote_code)

    def outputs(self, batch: kdistill.Batch, needs: kdistill.Needs) -> kdistill.ModelOutputs:
        with capture(self.model, needs.hidden_layers, needs.attention_layers) as captured:
            result = frozen_outputs(self.model, batch, needs)
        result.hidden_states, result.attentions = captured["hidden"], captured["attention"]
        return result


@kdistill.hookimpl
def kd_register_teachers():
    return [HFTeacher]
