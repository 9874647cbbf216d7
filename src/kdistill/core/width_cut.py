"""Width cuts of a student taken from the teacher: fewer attention heads and MLP channels per layer, the ones
that matter least by activation importance on the recipe's own data (Minitron, Muralidharan et al. 2024).

A head's or a channel's importance is the mean, over the calibration batches' real tokens, of the norm of what
it adds to the residual stream: for a head h, || W_o[:, h] a_h || (a_h its attention output); for an MLP
channel c, |a_c| * || W_down[:, c] || (a_c its activation, the input of the down projection). A head or channel
whose output weights are zero scores 0 and is cut first.

Heads are kept evenly per key-value group (grouped-query attention shares a key and value head among the
query heads of a group), so `heads` must be a multiple of the teacher's key-value heads; keys and values stay
whole. Every layer keeps the same counts (one config), each layer its own heads and channels. Llama-style
blocks only (q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj): llama, mistral, qwen2, ...
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from kdistill.core.errors import ConfigError
from kdistill.core.layer_choice import keep
from kdistill.core.models import decoder_layers

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIELD = "student.from_teacher"


def _shape(config: Any) -> tuple[int, int, int, int]:
    """(attention heads, key-value heads, head dimension, MLP channels) of a llama-style config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim, config.intermediate_size


def kv_heads(config: Any) -> int:
    """The key-value heads of a llama-style config (its attention heads without grouped-query attention)."""
    return _shape(config)[1]


def _blocks(model: nn.Module, field: str) -> list[tuple[Any, Any]]:
    """Each decoder layer's (attention, MLP) modules, refused in one line when they are not llama-style."""
    _, layers = decoder_layers(model)
    out = []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [name for name in PROJECTIONS[:4] if not isinstance(getattr(attn, name, None), nn.Linear)]
        missing += [name for name in PROJECTIONS[4:] if not isinstance(getattr(mlp, name, None), nn.Linear)]
        if missing:
            kind = getattr(model.config, "model_type", type(model).__name__)
            raise ConfigError(f"{field}: width cuts know llama-style blocks ({', '.join(PROJECTIONS)}); the {kind} "
                              f"teacher's layers have no {', '.join(missing)}")
        out.append((attn, mlp))
    return out


def check_width(heads: int | None, mlp: int | None, teacher: Any) -> None:
    """The counts fit the teacher: heads a multiple of its key-value heads, at most its heads; mlp at most its channels."""
    if heads is None and mlp is None:
        return
    _blocks(teacher, f"{FIELD}.{'heads' if heads is not None else 'mlp'}")
    n_heads, kv, _, channels = _shape(teacher.config)
    if heads is not None and (heads > n_heads or heads % kv):
        raise ConfigError(f"{FIELD}.heads: {heads} is not a multiple of the teacher's {kv} key-value heads up to its "
                          f"{n_heads} heads ({', '.join(str(kv * i) for i in range(1, n_heads // kv + 1))})")
    if mlp is not None and mlp > channels:
        raise ConfigError(f"{FIELD}.mlp: {mlp} is more than the teacher's {channels} MLP channels")


def width_scores(teacher: Any, batches: Sequence[Any]) -> dict[str, list[list[float]]]:
    """Every layer's head and MLP-channel importance (see the module's docstring), float64 sums over real tokens."""
    blocks = _blocks(teacher, FIELD)
    n_heads, _, head_dim, channels = _shape(teacher.config)
    head_sums = torch.zeros(len(blocks), n_heads, dtype=torch.float64)
    channel_sums = torch.zeros(len(blocks), channels, dtype=torch.float64)
    real: list[torch.Tensor] = []

    def on_heads(i: int, o_proj: nn.Linear):
        def hook(module, args):
            a = args[0][real[0]].double().view(-1, n_heads, head_dim)  # [tokens, heads, head_dim]
            w = o_proj.weight.double().view(-1, n_heads, head_dim)  # [hidden, heads, head_dim]
            head_sums[i] += torch.einsum("nhd,ohd->nho", a, w).norm(dim=-1).sum(0)
        return hook

    def on_channels(i: int, down: nn.Linear):
        def hook(module, args):
            a = args[0][real[0]].double()  # [tokens, channels]
            channel_sums[i] += a.abs().sum(0) * down.weight.double().norm(dim=0)
        return hook

    handles = []
    for i, (attn, mlp) in enumerate(blocks):
        handles.append(attn.o_proj.register_forward_pre_hook(on_heads(i, attn.o_proj)))
        handles.append(mlp.down_proj.register_forward_pre_hook(on_channels(i, mlp.down_proj)))
    count = 0
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.attention_mask.bool() if batch.attention_mask is not None else \
                    torch.ones_like(batch.input_ids, dtype=torch.bool)
                real[:] = [mask]
                dtype = next((p.dtype for p in teacher.parameters() if p.is_floating_point()), torch.float32)
                teacher(**batch.model_inputs(dtype), use_cache=False)
                count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    return {"heads": (head_sums / max(count, 1)).tolist(), "mlp": (channel_sums / max(count, 1)).tolist()}


def kept_width(scores: dict[str, list[list[float]]], layers: Sequence[int], heads: int | None, mlp: int | None,
               kv_heads: int) -> dict[str, list[list[int]]]:
    """For each kept teacher layer (in student order): the heads kept (the best heads / kv_heads of each
    key-value group) and the MLP channels kept (the best mlp)."""
    out: dict[str, list[list[int]]] = {}
    if heads is not None:
        per_group, out["heads"] = heads // kv_heads, []
        for layer in layers:
            row = scores["heads"][layer]
            size = len(row) // kv_heads
            out["heads"].append([g * size + i for g in range(kv_heads)
                                 for i in keep(row[g * size:(g + 1) * size], per_group)])
    if mlp is not None:
        out["mlp"] = [keep(scores["mlp"][layer], mlp) for layer in layers]
    return out


def cut_width(student: Any, kept: dict[str, list[list[int]]]) -> Any:
    """A copy of `student` (llama-style, layer i built from the teacher layer whose choice is kept[...][i]) with
    only the kept heads and MLP channels: rows of q_proj and gate/up_proj, columns of o_proj and down_proj."""
    from transformers import AutoModelForCausalLM

    _, _, head_dim, _ = _shape(student.config)
    config = copy.deepcopy(student.config)
    config.head_dim = head_dim  # no longer hidden_size / heads
    if "heads" in kept:
        config.num_attention_heads = len(kept["heads"][0])
    if "mlp" in kept:
        config.intermediate_size = len(kept["mlp"][0])
    dtype = next(p.dtype for p in student.parameters() if p.is_floating_point())
    cut = AutoModelForCausalLM.from_config(config).to(dtype)
    state = {key: value.detach().clone() for key, value in student.state_dict().items()}
    prefix, _ = decoder_layers(student)
    for i in range(config.num_hidden_layers):
        base = f"{prefix}.{i}"
        if "heads" in kept:
            rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept["heads"][i]])
            state[f"{base}.self_attn.q_proj.weight"] = state[f"{base}.self_attn.q_proj.weight"][rows]
            if f"{base}.self_attn.q_proj.bias" in state:
                state[f"{base}.self_attn.q_proj.bias"] = state[f"{base}.self_attn.q_proj.bias"][rows]
            state[f"{base}.self_attn.o_proj.weight"] = state[f"{base}.self_attn.o_proj.weight"][:, rows]
        if "mlp" in kept:
            channels = torch.tensor(kept["mlp"][i])
            for name in ("gate_proj", "up_proj"):
                state[f"{base}.mlp.{name}.weight"] = state[f"{base}.mlp.{name}.weight"][channels]
            state[f"{base}.mlp.down_proj.weight"] = state[f"{base}.mlp.down_proj.weight"][:, channels]
    cut.load_state_dict({key: value.contiguous() for key, value in state.items()})
    return cut
