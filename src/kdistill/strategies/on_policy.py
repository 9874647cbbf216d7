"""On-policy distillation: the student answers the data's prompts and learns on its own answers.

GKD (Agarwal et al., 2024): with probability `lmbda` a micro-batch's answers are replaced by answers
the current student samples for the same prompts; the teacher then scores every token of them and the
recipe's losses (forward or reverse KL, the generalized JSD, or the sampled-token `sampled-reverse-kl`)
pull the student toward the teacher exactly where its own answers go. `lmbda: 0` is offline
distillation on the data's answers.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Literal, Mapping

import torch
from pydantic import Field

import kdistill
from kdistill import IGNORE_INDEX, ConfigError
from kdistill.toolkit import LossStep, StepOptions, answer_batch, sample_completions, stop_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seed(*parts: Any) -> int:
    """A seed that is a function of what it is for only, so a resumed run draws the same."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class OnPolicy(kdistill.Strategy):
    """The student samples answers to the batch's prompts (with probability lmbda), the teacher scores
    them, the losses train the student on the answer tokens only."""

    name = "on-policy"
    writes_answers = True

    class Options(StepOptions):
        lmbda: float = Field(1.0, ge=0, le=1, description="share of micro-batches trained on the student's own answers "
                             "(GKD's lambda): 1 is purely on-policy, 0 the data's answers only")
        temperature: float = Field(1.0, ge=0, description="the student's sampling temperature (0: greedy)")
        top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass")
        max_new_tokens: int = Field(128, ge=1, description="the longest answer sampled, in tokens")
        seed: int = Field(0, description="sampling seed; each micro-batch's draw is seeded from it, its index and the "
                          "process's rank, so a resumed run samples the same answers")
        refresh_every: int = Field(1, ge=1, description="steps between copies of the student's weights into the model "
                                   "that samples (1: the student itself samples)")
        generation_dtype: Literal["same", "float32", "bfloat16", "float16"] = Field(
            "same", description="the dtype of the sampling copy (anything but same makes a copy)")

    @classmethod
    def recipe_problems(cls, recipe: Any, components: Mapping[str, list[Any]]) -> list[str]:
        problems = []
        teachers = components.get("teacher") or []
        if teachers and not teachers[0].entry.cls.scores_new_text:
            problems.append(f"teacher.name: teacher '{teachers[0].entry.name}' holds targets for the data's own text "
                            "and cannot score the student's answers (strategy on-policy); use a teacher that runs (hf)")
        data = (components.get("data") or [None])[0]
        options = components["strategy"][0].options
        data_options = getattr(data, "options", None)
        if data is not None and not hasattr(data_options, "layout"):
            problems.append(f"data.name: strategy on-policy samples answers to prompts; data source '{data.entry.name}' "
                            "has none (use conversations: prompt + completion, or messages)")
        elif data is not None:
            if data_options.layout != "pad":
                problems.append("data.options.layout: strategy on-policy samples an answer to each row's prompt, so it "
                                "needs one example per row (layout: pad)")
            if getattr(data_options, "format", None) == "prompt" and options.lmbda < 1:
                problems.append(f"strategy.options.lmbda: {options.lmbda} trains some batches on the data's answers, but "
                                "data.options.format prompt has none; use lmbda: 1")
            if getattr(data_options, "loss_on", "completion") != "completion":
                problems.append("data.options.loss_on: strategy on-policy finds each prompt where its counted answer "
                                "begins (loss_on: completion)")
            seq_len = getattr(data_options, "seq_len", None)
            if isinstance(seq_len, int) and options.max_new_tokens >= seq_len:
                problems.append(f"strategy.options.max_new_tokens: {options.max_new_tokens} leaves no room for a prompt "
                                f"in data.options.seq_len {seq_len}")
        if options.refresh_every > 1 and recipe.train.save_every and recipe.train.save_every % options.refresh_every:
            problems.append(f"strategy.options.refresh_every: {options.refresh_every} must divide train.save_every "
                            f"({recipe.train.save_every}), so that a resumed run samples with the same weights")
        if recipe.distributed.backend == "deepspeed" and cls._copies(options):
            problems.append("strategy.options.refresh_every: a sampling copy of a DeepSpeed student is not supported; "
                            "use refresh_every: 1 and generation_dtype: same")
        return problems

    @staticmethod
    def _copies(options: "OnPolicy.Options") -> bool:
        return options.refresh_every > 1 or options.generation_dtype != "same"

    def setup(self, context):
        super().setup(context)
        self.step = LossStep(context, self.options)
        tokenizer = context.tokenizer
        if tokenizer is None or not stop_ids(tokenizer):
            raise ConfigError("strategy: on-policy needs a tokenizer with an end-of-turn or end-of-sequence token, "
                              "so that sampled answers end")
        self._check_room(context.data)
        self._stops = set(stop_ids(tokenizer))
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._stops)
        self._sampler: torch.nn.Module | None = None
        self._sampler_step: int | None = None
        self._counts = {"student_batches": 0.0, "sampled_answers": 0.0, "sampled_tokens": 0.0, "empty_answers": 0.0}
        self._counts_step = -1

    def _check_room(self, data: kdistill.DataSource | None) -> None:
        """Before training: the longest prompt and the longest answer must fit in seq_len (the width of the
        data's own rows), so that no step meets a row it cannot hold."""
        seq_len = getattr(getattr(data, "options", None), "seq_len", None)
        longest = data.longest_prompt() if data is not None else None
        if longest is None or not isinstance(seq_len, int):
            return
        n, where = longest
        room = seq_len + 1 - n  # a row holds seq_len + 1 tokens (the last is only a label)
        if self.options.max_new_tokens > room:
            raise ConfigError(f"strategy.options.max_new_tokens: {self.options.max_new_tokens} new tokens after the data's "
                              f"longest prompt ({n} tokens, {where}) exceed data.options.seq_len {seq_len}; at most "
                              f"{max(room, 0)} fit (or raise seq_len)")

    def trainable(self):
        return {"student": self.context.student, **self.step.modules()}

    def loss(self, batch):
        return self.step(batch)

    # ------------------------------------------------------------------ sampling

    def _sampling_model(self) -> torch.nn.Module:
        """The student itself, or a copy in generation_dtype refreshed every refresh_every steps."""
        o, student = self.options, self.context.student
        if not self._copies(o):
            return student
        due = self.context.step - self.context.step % o.refresh_every
        if self._sampler is None or self._sampler_step != due:
            dtype = DTYPES.get(o.generation_dtype, next(student.parameters()).dtype)
            if self._sampler is None:
                self._sampler = copy.deepcopy(student).to(dtype).eval().requires_grad_(False)
            else:
                with torch.no_grad():
                    for mine, theirs in zip(self._sampler.parameters(), student.parameters()):
                        mine.copy_(theirs)
            self._sampler_step = due
        return self._sampler

    def _prompts(self, batch: kdistill.Batch) -> list[list[int]]:
        """Each row's prompt: its tokens up to where the first counted answer token is predicted; a row with no
        answer (a prompt alone) is all prompt."""
        if batch.position_ids is not None:
            raise ConfigError("data.options.layout: strategy on-policy needs one example per row (layout: pad)")
        prompts = []
        for row in range(batch.input_ids.shape[0]):
            counted = (batch.labels[row] != IGNORE_INDEX).nonzero()
            if counted.numel() == 0:
                prompts.append(batch.input_ids[row, :int(batch.attention_mask[row].sum())].tolist())
                continue
            if int(counted[0]) == 0:
                raise ConfigError("data: a row without a prompt before its answer; strategy on-policy needs prompts "
                                  "(prompt + completion, or messages, with loss_on: completion)")
            prompts.append(batch.input_ids[row, :int(counted[0]) + 1].tolist())
        return prompts

    def prepare_batch(self, batch: kdistill.Batch, index: int) -> kdistill.Batch:
        o, context = self.options, self.context
        if self._counts_step != context.step:
            self._counts = dict.fromkeys(self._counts, 0.0)
            self._counts_step = context.step
        on_policy = o.lmbda == 1 or (o.lmbda > 0 and _seed(o.seed, index, "mix") / 2 ** 63 < o.lmbda)
        if not on_policy:
            if not bool((batch.labels != IGNORE_INDEX).any()):
                raise ConfigError(f"strategy.options.lmbda: {o.lmbda} trains some batches on the data's answers, but the "
                                  "data has none (prompts alone); use lmbda: 1")
            return batch
        prompts = self._prompts(batch)
        width = batch.input_ids.shape[1]  # the global batch's width: the same on every process, so all stop alike
        positions = getattr(getattr(context.student, "config", None), "max_position_embeddings", None)
        if positions is not None and width + o.max_new_tokens > positions:
            raise ConfigError(f"strategy.options.max_new_tokens: rows of {width} tokens and {o.max_new_tokens} new "
                              f"tokens exceed the student's {positions} positions")
        model = self._sampling_model()
        # a ZeRO-3 student's parameters are partitioned (DeepSpeed marks them with ds_id): every process gathers
        # them at every forward, so all keep generating until the last is done
        partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
        answers = sample_completions(model, context.tokenizer, prompts, max_new_tokens=o.max_new_tokens,
                                     temperature=o.temperature, top_p=o.top_p, seed=_seed(o.seed, index, context.rank),
                                     keep_stop=True, synced_gpus=partitioned)
        empty = sum(1 for a in answers if len(a) <= 1 and (not a or a[0] in self._stops))
        self._counts["student_batches"] += 1
        self._counts["sampled_answers"] += len(answers)
        self._counts["sampled_tokens"] += sum(len(a) for a in answers)
        self._counts["empty_answers"] += empty
        answers = [a if a else [min(self._stops)] for a in answers]  # max_new_tokens >= 1: never empty, but be sure
        return answer_batch(prompts, answers, self._pad).to(batch.input_ids.device)

    def step_metrics(self) -> dict[str, float]:
        return {f"on_policy/{name}": value for name, value in self._counts.items()}


@kdistill.hookimpl
def kd_register_strategies():
    return [OnPolicy]
