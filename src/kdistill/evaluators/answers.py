"""Answers to held-out prompts, scored against references and the teacher.

The student answers questions (greedy, batched, KV cache) that it never trained on, and so does the
teacher, once. Answers are scored as SQuAD scores them (exact match and token F1 after normalising:
lowercase, no punctuation, no articles, single spaces; the best over the references), plus whether a
reference appears inside the answer (chat models answer in sentences). The student is also scored
against the teacher's answer, and the perplexity of the student on the teacher's answer tokens is set
against the teacher's own on the same tokens: how far the student has come to say what the teacher says.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

import kdistill
from kdistill import ConfigError
from kdistill.toolkit import answer_batch, model_dtype, prompt_ids, read_table, sample_completions, stop_ids

FIELD = "evaluators: answers.options"  # an evaluator does not know its place in the recipe's list
COLUMNS = ("question", "reference", "teacher", "student_before", "student_after")
_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------- scores


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, punctuation and the articles a/an/the removed,
    whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the normalised words (both empty: 1)."""
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def contains(answer: str, reference: str) -> float:
    """1 when the normalised reference appears in the normalised answer as whole words."""
    r = normalize(reference)
    return float(bool(r) and f" {r} " in f" {normalize(answer)} ")


def score(answer: str, references: list[str]) -> dict[str, float]:
    """EM, F1 and contains of one answer: the best over its references."""
    return {"em": max(exact_match(answer, r) for r in references), "f1": max(token_f1(answer, r) for r in references),
            "contains": max(contains(answer, r) for r in references)}


def references_of(value: Any) -> list[str]:
    """Reference answers from a cell: a string, a list of strings, or a mapping with `value` and
    `aliases` (TriviaQA); empty strings dropped, each once."""
    if value is None:
        found: list[str] = []
    elif isinstance(value, str):
        found = [value]
    elif isinstance(value, dict):
        aliases = value.get("aliases") or []
        found = ([value["value"]] if value.get("value") is not None else []) + (
            [aliases] if isinstance(aliases, str) else list(aliases))
    else:
        found = list(value)
    return list(dict.fromkeys(str(r) for r in found if r is not None and str(r).strip()))


def mean_scores(answers: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean EM, F1 and contains over the rows that have references (NaN when none has)."""
    rows = [score(a, refs) for a, refs in zip(answers, references) if refs]
    return {key: (sum(r[key] for r in rows) / len(rows) if rows else float("nan")) for key in ("em", "f1", "contains")}


# --------------------------------------------------------------------------- perplexity


def answer_batches(prompts: list[list[int]], answers: list[list[int]], batch_size: int, pad: int, device):
    """Batches of `prompt + answer` rows (right padding) in which only the answers' tokens count."""
    for start in range(0, len(prompts), batch_size):
        rows = [(p, a) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size]) if a]
        if rows:
            yield answer_batch([p for p, _ in rows], [a for _, a in rows], pad).to(device)


def answer_nll(model, prompts: list[list[int]], answers: list[list[int]], batch_size: int, pad: int) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of the answer tokens given their prompts, and their count:
    each row is `prompt + answer`, only the answer's tokens count."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in answer_batches(prompts, answers, batch_size, pad, next(model.parameters()).device):
            logits = model(**batch.model_inputs(model_dtype(model)), use_cache=False).logits
            counted = batch.mask
            logprobs = torch.log_softmax(logits[counted].double(), dim=-1)
            total -= logprobs.gather(-1, batch.labels[counted][:, None]).sum().item()
            count += int(counted.sum())
    model.train(was_training)
    return total, count


def answer_reverse_kl(student, teacher, prompts: list[list[int]], answers: list[list[int]], batch_size: int,
                      pad: int) -> tuple[float, int]:
    """Summed KL(student || teacher) (float64, full vocabulary) at every token of the student's own answers,
    and their count: how far the student's distribution is from the teacher's where its own answers go."""
    total, count = 0.0, 0
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    with torch.no_grad():
        for batch in answer_batches(prompts, answers, batch_size, pad, next(student.parameters()).device):
            counted = batch.mask
            log_ps = torch.log_softmax(student(**batch.model_inputs(model_dtype(student)), use_cache=False).logits[counted].double(), -1)
            t_batch = batch.to(next(teacher.parameters()).device)
            t_logits = teacher(**t_batch.model_inputs(model_dtype(teacher)), use_cache=False).logits[t_batch.mask]
            log_pt = torch.log_softmax(t_logits.double().to(log_ps.device)[:, :log_ps.shape[-1]], -1)
            total += (log_ps.exp() * (log_ps - log_pt)).sum().item()
            count += int(counted.sum())
    student.train(modes[0])
    teacher.train(modes[1])
    return total, count


def perplexity(total: float, count: int) -> float:
    if not count:
        return float("nan")
    loss = total / count
    return math.exp(loss) if loss < 709.0 else math.inf


# --------------------------------------------------------------------------- the evaluator


class Answers(kdistill.Evaluator):
    """Greedy answers of the student (and once of the teacher) to held-out questions: EM, F1 and contains
    against the references and against the teacher's answers, and the student's perplexity on the
    teacher's answers beside the teacher's own. Writes a table of the answers before and after training."""

    name = "answers"
    provides = ("answers_em", "answers_f1", "answers_contains", "answers_teacher_em", "answers_teacher_f1",
                "answers_ppl_on_teacher", "answers_reverse_kl", "teacher_answers_em", "teacher_answers_f1", "teacher_answers_contains",
                "teacher_answers_ppl")
    needs_validation = False  # it reads its own table of questions

    class Options(kdistill.Options):
        paths: list[kdistill.LocalPattern] = Field(min_length=1, description="a table of questions: JSON Lines, JSON, Parquet, "
                                                   "CSV or Arrow files, or a save_to_disk folder (pkg:// allowed)")
        split: str | None = Field(None, description="the split of a save_to_disk folder that holds several")
        question: str = Field("question", min_length=1, description="the column of the questions")
        answer: str | None = Field("answer", description="the column of the reference answers (a string, a list, or a "
                                   "mapping with value and aliases); None: no references")
        first: int = Field(0, ge=0, description="the first row used (keep the rows apart from the training prompts)")
        count: int = Field(32, ge=1, description="how many rows from `first`")
        max_new_tokens: int = Field(48, ge=1, description="longest answer, in tokens")
        repetition_penalty: float = Field(1.0, ge=1.0, description="greedy decoding of teacher and student alike, with "
                                          "the logits of tokens already in the answer divided by this (transformers' "
                                          "repetition_penalty; 1: plain greedy)")
        batch_size: int = Field(16, ge=1, description="prompts answered (and scored) at once")
        show: int = Field(4, ge=0, description="rows printed to the terminal after training")
        label: str = Field("", pattern=r"^[A-Za-z0-9_-]*$", description="a name for this set of questions, so that one "
                           "recipe can have several (metrics `LABEL_answers_em`, ..., folder `answers-LABEL`)")
        phases: list[Literal["before", "during", "final"]] = Field(
            ["before", "during", "final"], description="evaluations that run it; 'during' computes the student's "
            "metrics only (no table)")

    # ----------------------------------------------------------------- inputs

    def _rows(self) -> tuple[list[str], list[list[str]] | None]:
        """The questions and their references (None without an answer column), read once."""
        if hasattr(self, "_questions"):
            return self._questions, self._references
        o = self.options
        table = read_table(o.paths, f"{FIELD}.paths", split=o.split)
        where = o.paths[0] if len(o.paths) == 1 else ", ".join(o.paths)
        columns = list(table.column_names)
        for field, column in (("question", o.question), ("answer", o.answer)):
            if column is not None and column not in columns:
                raise ConfigError(f"{FIELD}.{field}: {where} has no column '{column}' (its columns: {', '.join(columns)})")
        if o.first >= len(table):
            raise ConfigError(f"{FIELD}.first: {where} has {len(table)} rows; first {o.first} is past the end")
        rows = table.select(range(o.first, min(o.first + o.count, len(table))))
        self._questions = [str(q) for q in rows[o.question]]
        self._references = [references_of(v) for v in rows[o.answer]] if o.answer is not None else None
        return self._questions, self._references

    def _prompts(self, tokenizer) -> list[list[int]]:
        questions, _ = self._rows()
        if not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(f"evaluators: answers: the tokenizer ({name}) has no chat template, which the questions are "
                              "asked in; use a chat model (or give its tokenizer a chat_template)")
        return [prompt_ids(tokenizer, q, f"{FIELD}.question") for q in questions]

    @staticmethod
    def _stop(tokenizer) -> list[int]:
        """The token that ends an answer (the chat template's end of turn where it has one): counted in the
        perplexity, since saying when to stop is part of the answer."""
        stops = stop_ids(tokenizer)
        return stops[-1:]

    def _answer(self, model, tokenizer, prompts: list[list[int]], context, who: str) -> list[list[int]]:
        out: list[list[int]] = []
        context.report(0, len(prompts), f"{who} answers")
        for start in range(0, len(prompts), self.options.batch_size):
            out += sample_completions(model, tokenizer, prompts[start:start + self.options.batch_size],
                                      max_new_tokens=self.options.max_new_tokens,
                                      repetition_penalty=self.options.repetition_penalty)
            context.report(len(out), len(prompts), f"{who} answers")
        return out

    def _scored_ids(self, answer: list[int], tokenizer) -> list[int]:
        """An answer's ids as generated, with the stop token when it stopped (not when cut at max_new_tokens)."""
        return list(answer) + (self._stop(tokenizer) if len(answer) < self.options.max_new_tokens else [])

    @staticmethod
    def _pad(tokenizer) -> int:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # ----------------------------------------------------------------- the teacher, once

    def _teacher(self, context) -> dict[str, Any] | None:
        if hasattr(self, "_teacher_result"):
            return self._teacher_result
        teacher = context.teacher
        if teacher is None or teacher.model is None:
            self._teacher_result = None
            return None
        tokenizer = teacher.tokenizer or context.tokenizer
        prompts = self._prompts(tokenizer)
        ids = self._answer(teacher.model, tokenizer, prompts, context, "teacher's")
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
        scored = [self._scored_ids(a, tokenizer) for a in ids]
        total, count = answer_nll(teacher.model, prompts, scored, self.options.batch_size, self._pad(tokenizer))
        same_vocabulary = teacher.tokenizer is None or teacher.tokenizer.get_vocab() == context.tokenizer.get_vocab()
        if same_vocabulary:  # the student is scored on exactly the tokens the teacher generated
            student_ids = scored
        else:  # another vocabulary: the teacher's answer text in the student's tokens
            student_ids = [context.tokenizer(t, add_special_tokens=False)["input_ids"] + self._stop(context.tokenizer)
                           for t in texts]
        _, references = self._rows()
        metrics = {"teacher_answers_ppl": perplexity(total, count)}
        if references is not None:
            metrics.update({f"teacher_answers_{k}": v for k, v in mean_scores(texts, references).items()})
        self._teacher_result = {"texts": texts, "student_ids": student_ids, "metrics": metrics, "same_vocabulary": same_vocabulary}
        return self._teacher_result

    # ----------------------------------------------------------------- evaluate

    @property
    def _folder(self) -> str:
        return f"answers-{self.options.label}" if self.options.label else "answers"

    def evaluate(self, context):
        if context.phase not in self.options.phases:
            return {}
        metrics = self._evaluate(context)
        return {f"{self.options.label}_{k}": v for k, v in metrics.items()} if self.options.label else metrics

    def _evaluate(self, context):
        questions, references = self._rows()
        tokenizer = context.tokenizer
        prompts = self._prompts(tokenizer)
        ids = self._answer(context.student, tokenizer, prompts, context, "student's")
        texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
        metrics: dict[str, float] = {}
        if references is not None:
            metrics.update({f"answers_{k}": v for k, v in mean_scores(texts, references).items()})
        teacher = self._teacher(context)
        if teacher is not None:
            pairs = [score(s, [t]) for s, t in zip(texts, teacher["texts"])]
            metrics["answers_teacher_em"] = sum(p["em"] for p in pairs) / len(pairs)
            metrics["answers_teacher_f1"] = sum(p["f1"] for p in pairs) / len(pairs)
            total, count = answer_nll(context.student, prompts, teacher["student_ids"], self.options.batch_size, self._pad(tokenizer))
            metrics["answers_ppl_on_teacher"] = perplexity(total, count)
            if teacher["same_vocabulary"]:  # per token of the student's own answers
                own = [self._scored_ids(a, tokenizer) for a in ids]
                total, count = answer_reverse_kl(context.student, context.teacher.model, prompts, own,
                                                 self.options.batch_size, self._pad(tokenizer))
                metrics["answers_reverse_kl"] = total / count if count else float("nan")
            metrics.update(teacher["metrics"])
        if context.phase == "during":
            return metrics  # the curve over training; the table is written before and after
        before = self._before(context, texts)
        rows = [{"question": q, "reference": " | ".join(refs[:3]) if refs else "",
                 "teacher": teacher["texts"][i] if teacher is not None else "", "student_before": before[i] if before else "",
                 "student_after": texts[i] if context.phase == "final" else ""}
                for i, (q, refs) in enumerate(zip(questions, references or [[]] * len(questions)))]
        self._write(rows, metrics, context)
        if context.phase == "final":
            self._print(rows, metrics)
        return metrics

    def _before(self, context, texts: list[str]) -> list[str] | None:
        """The student's answers before training: kept from phase "before", and in the run folder, so
        that a resumed run still has them (None when the run began without them)."""
        file = Path(context.output_dir) / self._folder / "answers_before.json" if context.output_dir is not None else None
        questions, _ = self._rows()
        if context.phase == "before":
            self._before_texts = texts
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_text(json.dumps({"questions": questions, "answers": texts}, indent=1))
        elif not hasattr(self, "_before_texts") and file is not None and file.is_file():
            try:
                kept = json.loads(file.read_text())
                if kept.get("questions") == questions:  # the same questions: else the recipe changed them
                    self._before_texts = list(kept["answers"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return getattr(self, "_before_texts", None)

    def _write(self, rows: list[dict[str, str]], metrics: dict[str, float], context) -> None:
        if context.output_dir is None:
            return
        folder = Path(context.output_dir) / self._folder
        folder.mkdir(parents=True, exist_ok=True)
        jsonl, markdown, table = folder / "answers.jsonl", folder / "answers.md", folder / "answers.table.json"
        jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        table.write_text(json.dumps({"columns": list(COLUMNS), "data": [[row[c] for c in COLUMNS] for row in rows]},
                                    ensure_ascii=False), encoding="utf-8")

        def cell(text: str) -> str:
            return " ".join(text.split()).replace("|", "\\|")
        lines = [f"# Answers ({context.phase})", "", *(f"- {k}: {v:.4f}" for k, v in sorted(metrics.items())), "",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
        markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if context.log_artifact is not None:
            for path in (jsonl, markdown, table):
                context.log_artifact(str(path), self._folder)

    def _print(self, rows: list[dict[str, str]], metrics: dict[str, float]) -> None:
        if not self.options.show and not metrics:
            return
        from rich.console import Console
        from rich.table import Table

        def short(text: str, width: int = 60) -> str:
            text = " ".join(text.split())
            return text if len(text) <= width else text[:width - 1] + "…"
        console = Console()
        if self.options.show:
            shown = Table(title=f"answers {self.options.label}".strip(), show_lines=True)
            for column in ("question", "reference", "teacher", "student before -> after"):
                shown.add_column(column, overflow="fold")
            for row in rows[:self.options.show]:
                shown.add_row(short(row["question"]), short(row["reference"], 30), short(row["teacher"]),
                              f"{short(row['student_before'])} -> {short(row['student_after'])}")
            console.print(shown)
        console.print("  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())), soft_wrap=True)


@kdistill.hookimpl
def kd_register_evaluators():
    return [Answers]
