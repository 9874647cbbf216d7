"""Tables of examples and chat prompts: what conversation data, teacher-written answers and answer
evaluators share.

`read_table` opens local data with Hugging Face `datasets` (JSON Lines, JSON, Parquet, CSV, Arrow
files, or a `save_to_disk` folder); `prompt_ids` renders a prompt with the tokenizer's own chat
template; `sample_completions` answers prompts with a model's `generate` (KV cache, batched, left
padding), seeded so that the same prompts give the same answers again (`sample_completions_with_logits`:
with the stop token and the raw logits of every generated token).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from kdistill.core.components import IGNORE_INDEX, Batch
from kdistill.core.errors import ConfigError
from kdistill.core.paths import resolve_path

ROLES = ("system", "user", "assistant", "tool")
# a folder of teacher-written answers (`kdistill generate`) holds this manifest beside its Parquet shards:
# {"complete": bool, "shards": [{"name": "shard-00000.parquet", ...}], ...}; read_table reads such a
# folder only when complete
GENERATION_MANIFEST = "generation.json"
_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _files(paths: Sequence[str], field: str) -> list[str]:
    found: list[str] = []
    for i, pattern in enumerate(paths):
        local = str(resolve_path(pattern, f"{field}[{i}]"))
        matches = sorted(glob.glob(local)) if glob.has_magic(local) else [local]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise ConfigError(f"{field}[{i}]: no such file or folder: {pattern}")
        found += matches
    return found


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def generated_shards(folder: str, field: str) -> list[str]:
    """The Parquet shards of a complete folder of teacher-written answers, else a one-line error."""
    try:
        with open(os.path.join(folder, GENERATION_MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        shards = [os.path.join(folder, shard["name"]) for shard in manifest["shards"]]
        complete = manifest["complete"] is True
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{field}: {folder}/{GENERATION_MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from None
    if not complete:
        raise ConfigError(f"{field}: {folder} holds teacher answers that are not finished; run `kdistill generate RECIPE` "
                          "(it resumes)")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ConfigError(f"{field}: {missing[0]} is missing (listed in {GENERATION_MANIFEST})")
    return shards


def read_table(paths: Sequence[str], field: str, split: str | None = None, streaming: bool = False):
    """The rows of local files or one `save_to_disk` folder, as a `datasets.Dataset` (an
    `IterableDataset` when streaming). Every file must be of one type, told by its extension; a
    folder of teacher-written answers counts as its Parquet shards."""
    import datasets

    datasets.disable_progress_bars()
    files: list[str] = []
    for f in _files(paths, field):
        files += generated_shards(f, field) if os.path.isfile(os.path.join(f, GENERATION_MANIFEST)) else [f]
    saved = [f for f in files if _is_saved_dataset(f)]
    if saved:
        if len(files) > 1:
            raise ConfigError(f"{field}: a save_to_disk folder ({saved[0]}) must be the only path")
        try:
            loaded = datasets.load_from_disk(saved[0])
        except Exception as exc:  # noqa: BLE001 - any fault of the folder is the user's file
            raise ConfigError(f"{field}: {saved[0]}: not a readable dataset folder ({str(exc).splitlines()[0]})") from None
        if isinstance(loaded, datasets.DatasetDict):
            name = split or ("train" if "train" in loaded else None)
            if name not in loaded:
                raise ConfigError(f"{field}: {saved[0]} has no split {split!r} (it has: {', '.join(loaded)})")
            loaded = loaded[name]
        elif split not in (None, "train"):
            raise ConfigError(f"{field}: {saved[0]} holds one split; leave the split out")
        return loaded.to_iterable_dataset() if streaming else loaded
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        raise ConfigError(f"{field}: {folders[0]} is a folder but not one written by save_to_disk (no dataset_info.json)")
    kinds = {Path(f).suffix.lower() for f in files}
    unknown = sorted(k for k in kinds if k not in _LOADERS)
    if unknown:
        raise ConfigError(f"{field}: {files[0]}: unknown file type {unknown[0] or '(no extension)'} "
                          f"(expected one of {', '.join(sorted(_LOADERS))})")
    loaders = {_LOADERS[k] for k in kinds}
    if len(loaders) > 1:
        raise ConfigError(f"{field}: files of different types ({', '.join(sorted(kinds))}); use one type")
    loader = loaders.pop()
    try:
        if loader == "arrow" and not streaming:  # a single Arrow file opens in place, no copy
            tables = [datasets.Dataset.from_file(f) for f in files]
            return tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
        return datasets.load_dataset(loader, data_files={"train": files}, split="train", streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - a malformed file: name it, one line
        raise ConfigError(f"{field}: {files[0] if len(files) == 1 else ', '.join(files)}: "
                          f"cannot be read as {loader} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_chat_template(tokenizer: Any, field: str) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"{field}: the tokenizer ({name}) has no chat template; use a chat model's tokenizer "
                          "or set chat_template: false")


def _ids(rendered: Any) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding, depending on the transformers version."""
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, str]], field: str) -> list[int]:
    """Token ids of a prompt (a user message, or a list of messages) rendered with the tokenizer's chat
    template, ending where the assistant's answer starts."""
    check_chat_template(tokenizer, field)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


def stop_ids(tokenizer: Any) -> list[int]:
    """Tokens that end an answer: end of sequence, and the chat template's end-of-turn token where it has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        found = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(found, int) and found not in ids:
            ids.append(found)
    return ids


def _generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float,
              top_p: float, seed: int, logits: bool, synced_gpus: bool = False,
              repetition_penalty: float = 1.0) -> tuple[list[list[int]], list[int], tuple[torch.Tensor, ...]]:
    """One batched `generate`: every row's new tokens (to max_new_tokens, padding after a stop included), the
    stop ids, and (`logits`) the model's raw logits of every step, [len(prompts), V] each. `synced_gpus`: every
    process keeps stepping until all are done (a ZeRO-3 model gathers its parameters from all of them).
    `repetition_penalty` above 1 divides the logits of tokens already in the row (CTRL's penalty, transformers'
    `repetition_penalty`): small models decoded greedily fall into loops without it."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every answer starts at the same column
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    stops = stop_ids(tokenizer)
    # a fresh generation config: nothing but what is asked (a checkpoint's own, or transformers' default top-k
    # of 50, would cut the distribution that on-policy losses assume the answers are drawn from)
    from transformers import GenerationConfig

    sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} \
        if temperature > 0 else {"do_sample": False}
    if repetition_penalty != 1.0:
        sampling["repetition_penalty"] = repetition_penalty
    # output_logits: the logits as the model gave them, before temperature, top-p or any other processor
    extra = {"return_dict_in_generate": True, "output_logits": True} if logits else {}
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stops or None,
                                  use_cache=True, **sampling, **extra)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             synced_gpus=synced_gpus)
    model.train(was_training)
    sequences = out.sequences if logits else out
    return sequences[:, width:].tolist(), stops, tuple(out.logits) if logits else ()


def _stop_at(row: list[int], stops: list[int]) -> int:
    """The index of the first stop token in `row` (its length when there is none)."""
    return next((i for i, token in enumerate(row) if token in stops), len(row))


def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, keep_stop: bool = False,
                       synced_gpus: bool = False, repetition_penalty: float = 1.0) -> list[list[int]]:
    """The model's answers (token ids, without the stop token unless `keep_stop`) to prompts given as token
    ids, all in one batched `generate` with a KV cache. Temperature 0 is greedy decoding; otherwise sampling
    seeded with `seed`, so the same prompts in the same batch give the same answers. `synced_gpus` for a
    model partitioned over processes (ZeRO-3), which all must call it."""
    if not prompts:
        return []
    rows, stops, _ = _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, logits=False, synced_gpus=synced_gpus,
                               repetition_penalty=repetition_penalty)
    return [row[:_stop_at(row, stops) + int(keep_stop)] for row in rows]


def sample_completions_with_logits(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                                   repetition_penalty: float = 1.0) -> tuple[list[list[int]], tuple[torch.Tensor, ...]]:
    """As `sample_completions` (the same answers), but each answer keeps the stop token that ended it (none when
    it reached max_new_tokens), and the model's raw logits come with them: one float32 tensor of shape
    `(len(prompts), V)` per generation step, before temperature, top-p or any other processor, so the token j of
    answer i was drawn from `logits[j][i]`. Every step of the batch is kept until it ends: len(prompts) x steps
    x V x 4 bytes."""
    if not prompts:
        return [], ()
    rows, stops, logits = _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed, logits=True, repetition_penalty=repetition_penalty)
    return [row[:_stop_at(row, stops) + 1] for row in rows], logits


def answer_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad: int) -> Batch:
    """One batch of `prompt + answer` rows, right-padded, in which only the answers' tokens count (the
    student's own answers in on-policy training, the teacher's or the student's when answers are scored)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):  # logits[:, t] predicts labels[:, t]
        sequence = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
        n = len(sequence) - 1
        ids[row, :n] = sequence[:-1]
        labels[row, len(prompt) - 1:n] = sequence[len(prompt):]
        mask[row, :n] = 1
    return Batch(input_ids=ids, labels=labels, attention_mask=mask)
