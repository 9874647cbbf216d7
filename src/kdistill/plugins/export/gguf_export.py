"""`kdistill export-gguf FOLDER`: a student's `save_pretrained` folder (a run's `final/`) as one GGUF
file, for the tools that served the teacher: llama.cpp, Ollama, LM Studio, vLLM's GGUF loading.

The pip `gguf` package has the pieces (the file writer, the architectures' tensor names, the Q8_0
quantizer, the special-token reader) but no converter from a Hugging Face folder: llama.cpp keeps its
own in a script that is not on PyPI. This is a small converter for the Llama family, the models that
GGUF's `llama` architecture holds with their tensors unchanged: config.json's `model_type` `llama` or
`mistral`, with a byte-level BPE tokenizer (GPT-2 style, as SmolLM's and Llama 3's are).

What the file holds, as llama.cpp's own converter writes it:

- the hyperparameters under `llama.*` (context, widths, heads, rope base and dimension, RMS epsilon);
- the tensors under GGUF's names (`token_embd`, `blk.N.attn_q`, ... `output`); `output.weight` only
  when the embeddings are not tied; the rows of `q_proj` and `k_proj` reordered within each head,
  because Hugging Face keeps the two halves of each rotary pair apart where GGUF's rotary code wants
  them adjacent (readers such as transformers' GGUF loader undo it);
- norms and other 1-D tensors in f32; the matrices in the chosen dtype (Q8_0 needs rows that are a
  multiple of 32 long; a matrix whose rows are not stays f16);
- the tokenizer as `tokenizer.ggml.*` (model `gpt2`: tokens, token types, merges, the pre-tokenizer's
  name, bos/eos/pad ids, whether bos/eos are added, the chat template);
- authorship metadata from the folder's model card (README.md front matter), as llama.cpp reads it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import kdistill
from kdistill.toolkit import fail

# config.json's model_type -> the GGUF architecture that holds it with its tensors unchanged
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
DTYPES = ("f32", "f16", "q8_0")
DEFAULT_DTYPE = "f16"

# The split rule of Llama 3's tokenizer (its tokenizer.json's Split pre-tokenizer): llama.cpp calls it llama-bpe.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = "GPT-2's (gpt-2), SmolLM's (smollm), Llama 3's (llama-bpe)"


@dataclass(frozen=True)
class Exported:
    """What `export_gguf` wrote."""
    path: Path
    bytes: int
    dtype: str
    tensors: int
    architecture: str

    def line(self) -> str:
        return (f"{self.path}: {self.bytes / 2**20:.1f} MiB, {self.dtype}, {self.tensors} tensors "
                f"(GGUF architecture {self.architecture})")


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters GGUF's llama architecture needs, read from config.json."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    context: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_factors: Optional[list[float]]  # llama3 rope scaling: divisors of each rotary frequency
    tied: bool


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder that the converter knows; KdistillError otherwise."""
    if not folder.is_dir():
        raise kdistill.KdistillError(f"{folder}: no such folder")
    path = folder / "config.json"
    if not path.is_file():
        raise kdistill.KdistillError(f"{folder}: no config.json; give a folder written by save_pretrained (a run's final/)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise kdistill.KdistillError(f"{path}: not JSON ({exc})") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHITECTURES:
        raise kdistill.KdistillError(f"{folder}: GGUF export knows {', '.join(ARCHITECTURES)} (config.json's model_type); "
                                     f"this model is {model_type!r}")
    return config


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> list[float]:
    """Llama 3's rope scaling as llama.cpp takes it (the `rope_freqs` tensor): for each rotary frequency,
    the number it is divided by. Long wavelengths are slowed by `factor`, short ones kept, and the band
    between blended smoothly (Meta's formula, which transformers' `llama3` rope type computes too)."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def hyperparameters(folder: Path, config: dict[str, Any]) -> Hyper:
    """The config's numbers for GGUF's llama architecture; every feature the converter cannot carry
    faithfully is a problem, one line each."""
    problems = []
    missing = [key for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
               if not isinstance(config.get(key), int)]
    if missing:
        raise kdistill.KdistillError(f"{folder}/config.json: no {', '.join(missing)}")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"{folder}: hidden_act {config['hidden_act']!r}: GGUF's llama architecture computes silu")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{folder}: {flag} is set; GGUF export writes Llama models without biases")
    if config.get("quantization_config"):
        method = (config["quantization_config"] or {}).get("quant_method", "quantized")
        problems.append(f"{folder}: the weights are quantized ({method}); GGUF export needs full-precision weights")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or "rope_type" not in rope and any(isinstance(v, dict) for v in rope.values()):
        problems.append(f"{folder}: rope_parameters per layer type: GGUF export knows one rope for all layers")
        rope = {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    factors = None
    if rope_type == "llama3":
        factors = llama3_rope_factors(rope, theta, head_dim)
    elif rope_type != "default":
        problems.append(f"{folder}: rope type {rope_type!r}: GGUF export knows default and llama3")
    window = config.get("sliding_window")
    if config.get("use_sliding_window", True) and isinstance(window, int) and window < config.get("max_position_embeddings", 0):
        problems.append(f"{folder}: sliding_window {window}: GGUF's llama architecture attends to the whole context")
    if problems:
        raise kdistill.KdistillError(problems)
    return Hyper(layers=config["num_hidden_layers"], hidden=config["hidden_size"], ffn=config["intermediate_size"],
                 heads=heads, kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
                 context=config.get("max_position_embeddings") or 2048, vocab=config["vocab_size"],
                 rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_factors=factors,
                 tied=bool(config.get("tie_word_embeddings", False)))


def pre_tokenizer_name(pre: Any) -> Optional[str]:
    """llama.cpp's name (`tokenizer.ggml.pre`) for a tokenizer.json pre-tokenizer, or None when it is
    not one this converter recognises: how text is cut before the merges apply decides the tokens, so
    a guess would serve a model that reads its prompts differently from the way it was trained."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]

    def byte_level(step: dict[str, Any], regex: bool) -> bool:
        return step.get("use_regex", True) is regex and not step.get("add_prefix_space", False)

    if kinds == ["ByteLevel"] and byte_level(steps[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level(steps[1], True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        return "llama-bpe"
    return None


def describe(pre: Any) -> str:
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return " + ".join(str(step.get("type")) if isinstance(step, dict) else "none" for step in steps)


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool
    add_eos: bool


def vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """The tokens in id order, each with its GGUF token type, and llama.cpp's pre-tokenizer name; a
    tokenizer that is not byte-level BPE, or cut in a way this converter does not recognise, is refused."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise kdistill.KdistillError(f"{folder}: no tokenizer.json (the fast tokenizer save_pretrained writes)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise kdistill.KdistillError(f"{path}: GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is "
                                     f"{model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}"
                                     f"{' and byte fallback (sentencepiece style)' if model.get('byte_fallback') else ''}")
    if not model.get("merges"):
        raise kdistill.KdistillError(f"{path}: the BPE vocabulary has no merges; llama.cpp needs them")
    if spec.get("normalizer"):
        raise kdistill.KdistillError(f"{path}: a normalizer ({spec['normalizer'].get('type')}); GGUF's byte-level BPE has none")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise kdistill.KdistillError(f"{path}: GGUF export recognises the pre-tokenizers {PRE_TOKENIZERS}; this one is "
                                     f"{describe(spec.get('pre_tokenizer'))}")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise kdistill.KdistillError(f"{folder}: cannot load the tokenizer: {(str(exc).splitlines() or [''])[0]}") from exc
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise kdistill.KdistillError(f"{folder}: the tokenizer has id {max(by_id)}, the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # a padded embedding matrix: rows no token uses
            tokens.append(f"[PAD{index}]")
            types.append(5)  # UNUSED
        elif index in added:
            tokens.append(added[index].content)
            types.append(3 if added[index].special else 4)  # CONTROL, USER_DEFINED
        else:
            tokens.append(by_id[index])
            types.append(1)  # NORMAL
    # Whether the tokenizer puts bos/eos around a text by itself, as its users (and the student) know it.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    add_bos = len(marked) > len(plain) and tokenizer.bos_token_id is not None and marked[0] == tokenizer.bos_token_id
    add_eos = len(marked) > len(plain) and tokenizer.eos_token_id is not None and marked[-1] == tokenizer.eos_token_id
    return Vocabulary(tokens, types, pre, add_bos, add_eos)


@dataclass
class Planned:
    """One tensor of the file: its GGUF name, its shape (rows last, as numpy has it), its GGML type, and
    how to load it (float32 numpy) when its turn to be written comes."""
    name: str
    shape: tuple[int, ...]
    qtype: Any
    load: Callable[[], Any]


def rotary_pairs_adjacent(weight, heads: int):
    """q_proj / k_proj rows reordered for GGUF's rotary layout: within each head, Hugging Face keeps the
    first and second halves of the rotary pairs in two blocks (rows i and i + d/2 rotate together), GGUF
    interleaves them (rows 2i and 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def tensor_type(gguf, name: str, shape: tuple[int, ...], dtype: str):
    """Norms and other 1-D tensors stay f32 (llama.cpp computes them so); matrices take the chosen dtype,
    except Q8_0 on rows that are not whole 32-value blocks (f16 then, as llama.cpp's converter does)."""
    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or dtype == "f32":
        return types.F32
    if dtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] == 0:
        return types.Q8_0
    return types.F16


def plan_tensors(gguf, folder: Path, hyper: Hyper, dtype: str) -> list[Planned]:
    """Every tensor of the file, in the order written, read lazily from the folder's safetensors."""
    import numpy as np
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise kdistill.KdistillError(f"{folder}: no *.safetensors weights (save_pretrained writes them)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hyper.layers)
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    unknown = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith("rotary_emb.inv_freq"):  # recomputed from the rope settings by every reader
                    continue
                if key == "lm_head.weight" and hyper.tied:  # the embeddings, stored once
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    unknown.append(key)
                    continue
                found[target] = (file, key, tuple(handle.get_slice(key).get_shape()))
    if unknown:
        raise kdistill.KdistillError(f"{folder}: tensors with no place in GGUF's llama architecture: {', '.join(unknown[:5])}"
                                     f"{' ...' if len(unknown) > 5 else ''}")
    expected = {"token_embd.weight", "output_norm.weight", *([] if hyper.tied else ["output.weight"])}
    expected |= {f"blk.{i}.{part}.weight" for i in range(hyper.layers) for part in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if expected - set(found):
        lacking = sorted(expected - set(found))
        raise kdistill.KdistillError(f"{folder}: the weights lack {', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''} "
                                     f"(GGUF names)")

    def loader(file: Path, key: str, heads: Optional[int]):
        def load():
            with safe_open(str(file), framework="pt") as handle:
                tensor = handle.get_tensor(key).to(torch.float32)
            if heads is not None:
                tensor = rotary_pairs_adjacent(tensor, heads)
            return tensor.numpy()
        return load

    def order(name: str) -> tuple[int, int, str]:
        parts = name.split(".")
        if parts[0] == "blk":
            return (1, int(parts[1]), name)
        return (0 if parts[0] == "token_embd" else 2, 0, name)

    plan = []
    if hyper.rope_factors is not None:
        factors = np.asarray(hyper.rope_factors, dtype=np.float32)
        plan.append(Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape,
                            gguf.GGMLQuantizationType.F32, lambda: factors))
    for name in sorted(found, key=order):
        file, key, shape = found[name]
        heads = hyper.heads if ".attn_q." in name else hyper.kv_heads if ".attn_k." in name else None
        plan.append(Planned(name, shape, tensor_type(gguf, name, shape, dtype), loader(file, key, heads)))
    return plan


def model_name(folder: Path) -> str:
    """A run's final/ is named after its run folder; any other folder after itself."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "final" and folder.parent.name else folder.name


def default_output(folder: Path, dtype: str) -> Path:
    return folder / f"model-{dtype}.gguf"


def import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise kdistill.KdistillError("export-gguf needs the gguf package: pip install 'kdistill[gguf]'") from exc
    return gguf


def export_gguf(folder: Path, out: Optional[Path] = None, dtype: str = DEFAULT_DTYPE, overwrite: bool = False) -> Exported:
    """Write the model in `folder` (save_pretrained's layout) as one GGUF file at `out` (default
    FOLDER/model-DTYPE.gguf), through a temporary file renamed into place: a reader never sees half a
    file, and a failure leaves nothing behind. Bad input is a KdistillError naming it."""
    if dtype not in DTYPES:
        raise kdistill.KdistillError(f"--dtype: {dtype!r}; one of {', '.join(DTYPES)}")
    folder = Path(folder)
    config = read_config(folder)
    architecture = ARCHITECTURES[config["model_type"]]
    out = Path(out) if out is not None else default_output(folder, dtype)
    if out.is_dir():
        raise kdistill.KdistillError(f"{out}: a folder; give a file name")
    if out.exists() and not overwrite:
        raise kdistill.KdistillError(f"{out}: exists; pass --overwrite to replace it")
    hyper = hyperparameters(folder, config)
    gguf = import_gguf()
    vocab = vocabulary(folder, hyper.vocab)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=hyper.vocab)
    special.add_special_token["bos"] = vocab.add_bos  # what the tokenizer does, not what its files may claim
    special.add_special_token["eos"] = vocab.add_eos
    plan = plan_tensors(gguf, folder, hyper, dtype)

    writer = gguf.GGUFWriter(path=None, arch=architecture)
    for item in plan:
        size = math.prod(gguf.quant_shape_to_byte_shape(item.shape, item.qtype))
        writer.add_tensor_info(item.name, item.shape, None, size, raw_dtype=item.qtype)
    # authorship from the model card and folder, as llama.cpp's converter collects it
    try:
        metadata = gguf.Metadata.load(None, folder, None, writer.get_total_parameter_count()[0])
    except Exception as exc:  # a model card's front matter that is not YAML, a generation_config that is not JSON
        raise kdistill.KdistillError(f"{folder}: cannot read the model card's metadata (README.md front matter, "
                                     f"generation_config.json): {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}") from exc
    metadata.name = model_name(folder)
    if metadata.size_label is None:
        metadata.size_label = gguf.size_label(*writer.get_total_parameter_count())
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    writer.add_vocab_size(hyper.vocab)
    writer.add_context_length(hyper.context)
    writer.add_embedding_length(hyper.hidden)
    writer.add_block_count(hyper.layers)
    writer.add_feed_forward_length(hyper.ffn)
    writer.add_head_count(hyper.heads)
    writer.add_head_count_kv(hyper.kv_heads)
    writer.add_key_length(hyper.head_dim)
    writer.add_value_length(hyper.head_dim)
    writer.add_rope_dimension_count(hyper.head_dim)
    writer.add_rope_freq_base(hyper.rope_theta)
    writer.add_layer_norm_rms_eps(hyper.rms_eps)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special.add_to_gguf(writer, quiet=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:  # one tensor in memory at a time
            data = gguf.quants.quantize(item.load(), item.qtype)
            writer.write_tensor_data(data)
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise kdistill.KdistillError(f"{exc.filename or out}: {exc.strerror or exc}") from exc
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return Exported(out, out.stat().st_size, dtype, len(plan), architecture)


@kdistill.hookimpl
def kd_register_commands(app):
    import typer

    @app.command("export-gguf")
    def export_gguf_command(folder: Path = typer.Argument(..., help="a save_pretrained model folder, e.g. a run's final/"),
                            out: Optional[Path] = typer.Option(None, "--out", help="the GGUF file to write "
                                                               "(default: FOLDER/model-DTYPE.gguf)"),
                            dtype: str = typer.Option(DEFAULT_DTYPE, "--dtype", help="the matrices' type: f32, f16 or q8_0 "
                                                      "(norms stay f32)"),
                            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file")) -> None:
        """The model as one GGUF file, for llama.cpp, Ollama, LM Studio or vLLM (Llama-family models)."""
        try:
            exported = export_gguf(folder, out, dtype.lower(), overwrite)
        except kdistill.KdistillError as exc:
            fail(exc)
        print(exported.line())
