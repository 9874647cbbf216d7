"""Loading Hugging Face causal LMs from local paths only, and building the student.

Never reaches a network (`local_files_only`), reads safetensors weights only, and leaves
`trust_remote_code` off unless the recipe turns it on.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.core.checkpoint import file_digest
from kdistill.core.errors import ConfigError
from kdistill.core.paths import resolve_path

log = logging.getLogger("kdistill")

# a transformers causal LM: kdistill reads its `config` and calls its own methods (get_output_embeddings,
# save_pretrained, ...), which nn.Module's typing does not know, so it is typed loosely
LM = Any

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _split_gguf(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    if gguf_file is None and path.suffix == ".gguf":
        return path.parent, path.name
    return path, gguf_file


def cache_root() -> Path | None:
    """Where kdistill keeps what it can rebuild: $KDISTILL_CACHE, else $XDG_CACHE_HOME/kdistill or
    ~/.cache/kdistill; None when KDISTILL_CACHE is `off`."""
    value = os.environ.get("KDISTILL_CACHE", "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdistill"


def _file_digest(file: Path, root: Path) -> str:
    """sha256 of `file`'s content, read once per file version: remembered under `root`/digests by its path,
    size and modification time (reading a multi-GB file on every load would cost seconds each time)."""
    stat = file.stat()
    memo = root / "digests" / hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    with contextlib.suppress(OSError):
        known = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", known):
            return known
    digest = file_digest(file)
    with contextlib.suppress(OSError):  # not remembered: read again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".tmp-{memo.name}-{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    return digest


def dequantized_folder(file: Path) -> Path | None:
    """Where the dequantized copy of the GGUF `file` lives (safetensors, config, tokenizer), written or not:
    named after the file's content (sha256) and transformers' version, so a changed file or another
    conversion is never read from an old copy, and the same file in two environments shares one copy.
    None when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    import transformers

    key = hashlib.sha256(f"{_file_digest(file, root)}|{transformers.__version__}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{file.stem}-{key}"


def _complete(folder: Path) -> bool:
    """A copy holds readable weights, config and tokenizer (else it is written again)."""
    needed = [folder / "config.json", folder / "tokenizer_config.json", *folder.glob("*.safetensors")]
    return len(needed) > 2 and all(f.is_file() and os.access(f, os.R_OK) for f in needed)


def _cached_gguf(path: Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, None) for a GGUF file whose dequantized copy is in the cache (read as a safetensors
    folder: seconds instead of dequantizing again); the arguments unchanged otherwise."""
    if not gguf_file:
        return path, gguf_file
    folder = dequantized_folder(path / gguf_file) if (path / gguf_file).is_file() else None
    if folder is not None and _complete(folder):
        return folder, None
    return path, gguf_file


def _write_dequantized(model: LM, file: Path, trust_remote_code: bool) -> None:
    """Save the model just dequantized from `file` (float32, exact) and its tokenizer to the cache, written
    to a temporary folder and renamed, so a killed or concurrent write never leaves a partial copy. Only
    the first process of a machine writes (DeepSpeed's other ranks load the same file at the same time)."""
    folder = dequantized_folder(file)
    if folder is None or os.environ.get("LOCAL_RANK", "0") != "0" or _complete(folder):
        return
    import tempfile

    from transformers import AutoTokenizer

    tmp = None
    try:
        if folder.exists():  # incomplete (its weights deleted by hand, say): moved aside, then removed
            aside = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True,
                                      trust_remote_code=trust_remote_code).save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the copy from others sharing the cache
        tmp.rename(folder)
        log.info("dequantized %s cached in %s (KDISTILL_CACHE=off turns this off)", file.name, folder)
    except Exception as exc:  # a copy that cannot be written costs the next run its time, nothing else
        if not _complete(folder):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or [type(exc).__name__])[0]
            log.warning("could not cache the dequantized %s in %s (%s); it is dequantized again next time",
                        file.name, folder.parent, why)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _refuse_custom_code(path: Path, field: str, trust_remote_code: bool) -> None:
    """transformers quietly falls back to its own class when a folder's custom code is not trusted;
    a model that ships code expects that code, so refuse rather than run something else."""
    if trust_remote_code or not path.is_dir():
        return
    found = sorted(p.name for p in path.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((path / name).read_text()):
                found.append(f"auto_map in {name}")
        except (OSError, ValueError):
            continue
    if found:
        raise ConfigError(f"{field}: {path} contains custom code ({', '.join(found)}); it runs only with "
                          "trust_remote_code: true in the recipe")


def _safetensors_problem(file: Path) -> str | None:
    """Why `file` (followed through links) is not a safetensors file, or None: its 8-byte header length
    and JSON header are read, nothing else (transformers would unpickle a file that is not one)."""
    try:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 1 or size > min(100 << 20, file.stat().st_size - 8):
                return "is not a safetensors file"
            header = json.loads(handle.read(size))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except ValueError:
        return "is not a safetensors file (its header is not JSON)"
    return None if isinstance(header, dict) else "is not a safetensors file"


def check_weight_files(folder: Path, field: str) -> None:
    """Every weight file transformers would open from `folder` is safetensors, checked before it sees the
    folder: each *.safetensors file (a link is followed) and each file a *.safetensors.index.json names,
    which must stay inside the folder."""
    files = sorted(folder.glob("*.safetensors"))
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{field}: {index} is not a weight index (JSON with a weight_map)") from None
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{field}: {index} is not a weight index (JSON with a weight_map)")
        for name in sorted(set(map(str, weight_map.values()))):
            target = folder / name
            if not name.endswith(".safetensors"):
                raise ConfigError(f"{field}: {index.name} maps weights to {name}, which is not a .safetensors "
                                  "file (kdistill never unpickles weights)")
            if Path(name).is_absolute() or ".." in Path(name).parts or not target.is_file():  # links are followed (the hub's cache links to blobs)
                raise ConfigError(f"{field}: {index.name} maps weights to {name}, which is not a file in {folder}")
            files.append(target)
    for file in dict.fromkeys(files):
        why = _safetensors_problem(file)
        if why:
            shown = f"{file} (a link to {file.resolve()})" if file.is_symlink() else str(file)
            raise ConfigError(f"{field}: {shown} {why}; kdistill reads weights only from safetensors files")


def load_causal_lm(model: str, field: str, *, gguf_file: str | None = None, dtype: str = "float32",
                   trust_remote_code: bool = False, quantization: str = "none", double_quant: bool = True) -> LM:
    """A local folder (safetensors) or a GGUF file, dequantized and cast to `dtype`; with
    `quantization` nf4/fp4/int8, re-quantized by bitsandbytes (computing in `dtype`)."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = _split_gguf(resolve_path(model, field), gguf_file)
    target = path / gguf_file if gguf_file else path
    if not target.exists():
        raise ConfigError(f"{field}: no such file or folder: {target}")
    from_copy = gguf_file is not None
    path, gguf_file = _cached_gguf(path, gguf_file)
    from_copy = from_copy and gguf_file is None
    if not gguf_file:  # a GGUF file carries no code (its folder may be a Python package)
        _refuse_custom_code(path, field, trust_remote_code)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        if path.is_dir() and not any(path.glob("*.safetensors")):
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
            raise ConfigError(f"{field}: {path} has no safetensors weights"
                              + (f" ({', '.join(others)} would need unpickling, which kdistill never does; "
                                 "convert them to safetensors first)" if others else ""))
        if path.is_dir():
            check_weight_files(path, field)
        kwargs["use_safetensors"] = True
        kwargs["dtype"] = DTYPES[dtype]
    if quantization != "none" and not gguf_file:
        shapes = _skeleton(path, trust_remote_code, field) if quantization in ("nf4", "fp4") else None
        kwargs.update(_bitsandbytes(field, quantization, double_quant, dtype, shapes))
    try:
        loaded: LM = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        copy_hint = f" (read from its dequantized copy {path}: delete that folder to rebuild it)" if from_copy else ""
        raise ConfigError(f"{field}: cannot load a model from {target}{copy_hint}: {str(exc).splitlines()[0]}") from None
    if gguf_file:
        # the weights are already dequantized; the quantizer would only block dtype casts and saving
        loaded.hf_quantizer = None
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        _write_dequantized(loaded, target, trust_remote_code)
        if quantization != "none" and _cached_gguf(path, gguf_file)[1] is None:  # quantized from the copy, as later loads are
            del loaded
            return load_causal_lm(str(path), field, gguf_file=gguf_file, dtype=dtype, trust_remote_code=trust_remote_code,
                                  quantization=quantization, double_quant=double_quant)
        loaded = loaded.to(DTYPES[dtype])
        if quantization != "none":
            loaded = _requantize(loaded, field, quantization, double_quant, dtype)
    return loaded


# bitsandbytes quantizes 4-bit weights in blocks of 64 values. On CPUs with AVX-512 BF16 it repacks a
# layer's weights for its fused kernel the first time the layer runs in eval mode without gradients (as a
# teacher does); the repacking needs in_features a multiple of the block and out_features a multiple of
# 32, and fails mid-run otherwise (bitsandbytes 0.50).
BNB_4BIT_BLOCK = 64
BNB_CPU_PACK_ROWS = 32


def _skeleton(path: Path, trust_remote_code: bool, field: str) -> LM:
    """The model's modules on the meta device (shapes only, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot read a model config from {path}: {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _unpackable_4bit_layers(model: LM, field: str) -> list[str]:
    """Linear layers that bitsandbytes' packed 4-bit CPU kernel cannot take, to keep unquantized; with
    one warning naming them. Empty for every model whose widths are multiples of 64 (real LLMs)."""
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module is not head
             and (module.in_features % BNB_4BIT_BLOCK or module.out_features % BNB_CPU_PACK_ROWS)]
    if names:
        shown: dict[str, int] = {}
        for name in names:  # model.layers.0.mlp.down_proj -> model.layers.*.mlp.down_proj
            pattern = re.sub(r"\.\d+\.", ".*.", name)
            shown[pattern] = shown.get(pattern, 0) + 1
        log.warning("%s: %d linear layers kept unquantized, their widths not multiples of the 4-bit block "
                    "(in_features of %d, out_features of %d): %s", field, len(names), BNB_4BIT_BLOCK,
                    BNB_CPU_PACK_ROWS, ", ".join(f"{p} (x{n})" if n > 1 else p for p, n in shown.items()))
    return names


def _default_skips(model: LM) -> list[str]:
    """What transformers keeps unquantized by default (the output head and tied weights); naming skip
    modules replaces that default, so it is added back."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # transformers < 5
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert  # type: ignore[attr-defined,no-redef]
    return list(get_keys_to_not_convert(model))


def _bitsandbytes(field: str, quantization: str, double_quant: bool, dtype: str,
                  shapes: LM | None = None) -> dict[str, Any]:
    """transformers' loading options for bitsandbytes; `shapes` (the model, or its meta-device
    skeleton) lets 4-bit quantization keep the layers its CPU kernel cannot take unquantized."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"{field}: quantization '{quantization}' needs bitsandbytes: pip install 'kdistill[quant]'") from None
    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        narrow = _unpackable_4bit_layers(shapes, field) if shapes is not None else []
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=DTYPES[dtype],
                                    llm_int8_skip_modules=_default_skips(shapes) + narrow if narrow else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": device, "dtype": DTYPES[dtype]}


def _requantize(model: LM, field: str, quantization: str, double_quant: bool, dtype: str) -> nn.Module:
    """transformers cannot apply bitsandbytes to a GGUF file directly: write the dequantized weights
    to a temporary safetensors folder and load that quantized."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="kdistill-requantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        options = _bitsandbytes(field, quantization, double_quant, dtype, model if quantization in ("nf4", "fp4") else None)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, use_safetensors=True, **options)


def load_tokenizer(model: str, field: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, gguf_file = _cached_gguf(*_split_gguf(resolve_path(model, field), gguf_file))
    if not gguf_file:  # a GGUF file carries no code (its folder may be a Python package)
        _refuse_custom_code(path, field, trust_remote_code)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None


def decoder_layers(model: LM) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (`model.layers`, `transformer.h`, ...) and its name."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def dense_weights(model: LM) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, with bitsandbytes-quantized linear weights dequantized
    (a student cut from a 4-bit or 8-bit teacher starts from what the teacher computes with)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{prefix}.{name}" if prefix else name
            if name == "weight" and kind == "Linear4bit" and getattr(tensor, "quant_state", None) is not None:
                import bitsandbytes.functional as bnb_functional

                if getattr(tensor.quant_state, "packing_format_for_cpu", False):  # repacked for AVX-512 BF16 when it ran
                    tensor = unpack_cpu_4bit(tensor.data, tensor.quant_state)
                else:
                    tensor = bnb_functional.dequantize_4bit(tensor.data, tensor.quant_state)
            elif name == "weight" and kind == "Linear8bitLt" and getattr(tensor, "SCB", None) is not None:
                tensor = tensor.data.float() * tensor.SCB.float().unsqueeze(1) / 127
            out[key] = tensor
    return out


def unpack_cpu_4bit(data: torch.Tensor, state) -> torch.Tensor:
    """The float32 weight [N, K] of a 4-bit layer that bitsandbytes repacked for its AVX-512 BF16 CPU
    kernel: bytes [N, K/2] holding two codes each in tiles of 32 rows, scales [K/block, N] in bfloat16.
    (bitsandbytes 0.50's own inverse misplaces the scales of layers without double quantization.)"""
    n, k = state.shape
    packed = data.view(torch.uint8).reshape(-1, BNB_CPU_PACK_ROWS)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = codes.reshape(n // BNB_CPU_PACK_ROWS, k // 2, BNB_CPU_PACK_ROWS, 2).transpose(1, 2).reshape(n, k)
    scales = state.absmax.T.float().repeat_interleave(state.blocksize, dim=1)
    return state.code.float().to(data.device)[codes.long()] * scales


def student_from_teacher(teacher: LM, layers: list[int], dtype: str) -> nn.Module:
    """A shallower copy of the teacher keeping `layers` (in order), embeddings and head included."""
    from transformers import AutoModelForCausalLM

    n_teacher = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n_teacher]
    if bad:
        raise ConfigError(f"student.from_teacher.layers: {bad} out of range; the teacher has layers 0-{n_teacher - 1}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    for attr in ("layer_types", "quantization_config"):
        if hasattr(config, attr):
            if attr == "layer_types" and config.layer_types is not None:
                config.layer_types = [config.layer_types[i] for i in layers]
            elif attr == "quantization_config":
                del config.quantization_config
    student = AutoModelForCausalLM.from_config(config)
    prefix, _ = decoder_layers(teacher)
    source = dense_weights(teacher)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key in student.state_dict():
        match = pattern.match(key)
        src_key = f"{prefix}.{layers[int(match.group(1))]}.{match.group(2)}" if match else key
        tensor = source[src_key].detach()
        state[key] = (tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor).clone()
    student.load_state_dict(state)
    return student.to(DTYPES[dtype])


MAX_STUDENT_LAYERS = 1024  # a bound for validation: building even an empty model of 10^4 layers takes a minute


def model_from_config(spec_config: dict[str, Any] | str, device: str | None = None) -> LM:
    """A fresh causal LM from the recipe's `student.config` (a mapping with `model_type`, or a config
    file or folder); on device "meta" it costs no memory, which is how validation checks it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if isinstance(spec_config, dict):
            cfg = dict(spec_config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ConfigError("student.config.model_type: required to build a model from a config")
            try:
                config = AutoConfig.for_model(model_type, **cfg)
            except ValueError:
                if model_type in _model_types():
                    raise
                raise ConfigError(f"student.config.model_type: unknown model type {str(model_type)[:60]!r} for this "
                                  "transformers (llama, qwen2, gpt2, ...)") from None
        else:
            path = resolve_path(spec_config, "student.config")
            if not path.exists():
                raise ConfigError(f"student.config: no such file or folder: {path}")
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > MAX_STUDENT_LAYERS:  # even an empty (meta) build takes minutes
            raise ConfigError(f"student.config: {layers:,} layers; kdistill builds students of at most {MAX_STUDENT_LAYERS:,}")
        with torch.device(device) if device else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(config)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' model code raises anything on a bad config (ZeroDivisionError, AssertionError, ImportError)
        first = (str(exc).splitlines() or [""])[0][:200]
        raise ConfigError(f"student.config: cannot build a model from it: {type(exc).__name__}: {first}") from None


def _model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def build_student(spec, teacher_model: LM | None, teacher_tokenizer, width: dict[str, Any] | None = None):
    """The student model and its tokenizer, from the recipe's `student` section; `width`: the heads and MLP
    channels a width cut keeps of each layer (`width_cut.kept_width`)."""

    model, tokenizer = _build_student(spec, teacher_model, teacher_tokenizer)
    if width:  # a width cut, chosen by the engine (core/width_cut.py)
        from kdistill.core.width_cut import cut_width

        model = cut_width(model, width)
    if spec.lora is not None:
        from kdistill.core.adapters import add_lora

        if spec.lora.quantization != "none":  # QLoRA: a 4-bit frozen base under the adapters
            model = _requantize(model, "student.lora.quantization", spec.lora.quantization, spec.lora.double_quant, spec.dtype)
            _never_repacked(model)
        model = add_lora(model, spec.lora)
    return model, tokenizer


def _never_repacked(model: nn.Module) -> None:
    """Keep a QLoRA student's 4-bit layers off bitsandbytes' AVX-512 BF16 repacking. An evaluation (eval mode,
    no gradients) would repack them, and every later training step would run their forward through the packed
    bfloat16 kernel, which has no backward (bitsandbytes 0.50: gemv_4bit, "no autograd kernel"): training would
    then depend on whether an evaluation came first (a resumed run differs from an uninterrupted one) and differ
    from every other CPU. Off, they compute as on any CPU (dequantized, float32)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # type: ignore[assignment]  # a plain bool attribute of Linear4bit


def _build_student(spec, teacher_model: LM | None, teacher_tokenizer):
    if spec.model is not None:
        model = load_causal_lm(spec.model, "student.model", dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
        tokenizer = load_tokenizer(spec.tokenizer or spec.model, "student.tokenizer" if spec.tokenizer else "student.model",
                                   trust_remote_code=spec.trust_remote_code)
        return _check_vocab(model, tokenizer, "student.model")
    if spec.from_teacher is not None:
        model = student_from_teacher(teacher_model, spec.from_teacher.layers, spec.dtype)
    else:
        model = model_from_config(spec.config).to(DTYPES[spec.dtype])
    if spec.tokenizer is not None:
        tokenizer = load_tokenizer(spec.tokenizer, "student.tokenizer", trust_remote_code=spec.trust_remote_code)
    elif teacher_tokenizer is not None:
        tokenizer = teacher_tokenizer
    else:
        raise ConfigError("student.tokenizer: required when the student is built from a config and there is no teacher")
    return _check_vocab(model, tokenizer, "student.config.vocab_size" if spec.config is not None else "student")


_LEARNED_POSITIONS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def check_positions(length: int, models: dict[str, LM], field: str) -> None:
    """A model with learned position embeddings (GPT-2, OPT, ...) cannot read past its last position; rotary
    models can, so only the former are checked. `length`: the tokens in one training sequence."""
    for name, model in models.items():
        if model is None:
            continue
        learned = any(isinstance(module, nn.Embedding) and _LEARNED_POSITIONS.search(path)
                      for path, module in model.named_modules())
        config = model.config
        key = next((k for k in ("n_positions", "max_position_embeddings") if isinstance(getattr(config, k, None), int)), None)
        if learned and key is not None and length > getattr(config, key):
            raise ConfigError(f"{field}: sequences of {length} tokens are longer than the {name} can read ({key}: "
                              f"{getattr(config, key)}, learned positions)")


def choose_attention(model: LM, device: torch.device) -> str:
    """The attention kernel for `model` on `device`: flash attention 2 on CUDA for half-precision weights
    when the flash_attn package is installed, else PyTorch's SDPA. (An attention loss switches its two
    models to eager later: only eager returns attention maps.) Returns the choice."""
    import importlib.util

    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    flash = device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None
    choice = "flash_attention_2" if flash else "sdpa"
    if getattr(model.config, "_attn_implementation", None) != choice and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(choice)
        except (ValueError, ImportError) as exc:  # a model without that kernel keeps its own
            log.info("attention: %s not available for %s (%s)", choice, type(model).__name__, str(exc).splitlines()[0])
            return str(getattr(model.config, "_attn_implementation", ""))
    return choice


def check_shared_vocabulary(teacher_tokenizer, tokenizer, loss_classes) -> None:
    """Comparing logits token by token needs one vocabulary: compare the tokenizers' vocabularies
    themselves (sizes alone would let two different tokenizers of one size through)."""
    from kdistill.core.components import LogitLoss

    if teacher_tokenizer is None or teacher_tokenizer is tokenizer:
        return
    if not any(isinstance(cls, type) and issubclass(cls, LogitLoss) and cls.needs_teacher for cls in loss_classes):
        return
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items())) // 2 or abs(len(ours) - len(theirs))
        raise ConfigError(f"student.tokenizer: the student's tokenizer ({len(ours)} tokens) is not the teacher's "
                          f"({len(theirs)} tokens; about {differ} entries differ); logit losses compare the two "
                          "distributions token by token and need one vocabulary")


def _check_vocab(model: LM, tokenizer, field: str):
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ConfigError(f"{field}: the model has {rows} token embeddings but the tokenizer has {len(tokenizer)} tokens")
    return model, tokenizer
