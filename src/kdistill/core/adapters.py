"""LoRA students through `peft`: low-rank adapters injected into the student's linear layers, the
base frozen, only the adapters trained, checkpointed and optimised.

The student stays the Hugging Face model object (peft injects its layers in place), so every
strategy, loss and evaluator sees the model it always sees; the peft wrapper is kept beside it
(`wrapper`) for what only it does: writing the adapter in peft's format and merging it into the
base for a plain `from_pretrained` model.
"""

from __future__ import annotations

import copy
import re
import warnings
import weakref
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.core.errors import ConfigError

_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()
ADAPTER_FOLDER = "adapter"  # final/adapter: the adapter alone, loadable with peft


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what target_modules may name), head excluded."""
    get_output: Any = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and module is not output and name})


def add_lora(model: nn.Module, spec) -> nn.Module:
    """Inject LoRA adapters as `spec` (the recipe's student.lora) says; the base's parameters stop training."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("student.lora: needs the peft package: pip install 'kdistill[lora]'") from None
    names = linear_names(model)
    targets = spec.target_modules
    if targets != "all-linear":
        unknown = [t for t in targets if not any(re.fullmatch(t, n) or t == n for n in names)]
        if unknown:
            raise ConfigError(f"student.lora.target_modules: {', '.join(map(repr, unknown))} match no module of the student; "
                              f"its linear layers: {', '.join(names)}")
        targets = list(targets)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.filterwarnings("ignore", category=FutureWarning)
        wrapper = get_peft_model(model, config)
    _WRAPPERS[model] = wrapper
    return model


def wrapper(model: nn.Module) -> Any | None:
    """The peft model around `model` when it carries LoRA adapters, else None."""
    return _WRAPPERS.get(model)


def trained_state(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint keeps of a module: everything, or only the adapters (the base is rebuilt from the recipe)."""
    if wrapper(model) is None:
        return model.state_dict()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trained_state(model: nn.Module, state: dict[str, Any]) -> None:
    """The inverse of `trained_state`: an adapter-only state must name exactly the trained parameters."""
    if wrapper(model) is None:
        model.load_state_dict(state)
        return
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise KeyError(f"the checkpoint's adapter does not match the recipe's student.lora (missing {missing}, unexpected {extra})")
    model.load_state_dict(state, strict=False)


def merged(model: nn.Module) -> Any:
    """A copy of `model` with its adapters merged into the base weights: a plain transformers model."""
    return copy.deepcopy(_WRAPPERS[model]).merge_and_unload()


def save_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter alone, in peft's format (`PeftModel.from_pretrained(base, folder)` loads it)."""
    _WRAPPERS[model].save_pretrained(str(folder), safe_serialization=True)
