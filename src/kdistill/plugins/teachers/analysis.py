"""What a teacher says, before any training: `kdistill analyze` (its next-token distribution and
entropy) and `kdistill teacher-check` (a quantized `hf` teacher beside its full-precision self)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import List, Optional

import torch

import kdistill
from kdistill import ConfigError
from kdistill.evaluators.agreement import agreement_sums
from kdistill.plugins.teachers.hf import HFTeacher
from kdistill.toolkit import SET_HELP, fail, histogram, keep_layers, layer_scores, model_dtype, plan_recipe, track_side_run


def load_teacher(plan):
    """The recipe's teacher, loaded on the CPU."""
    resolved = plan.one("teacher")
    if resolved is None:
        raise kdistill.KdistillError("teacher: the recipe has no teacher to analyse")
    teacher = resolved.build()
    teacher.load(torch.device("cpu"))
    return teacher


def next_tokens(teacher, text: str, top_k: int = 10) -> tuple[list[tuple[int, str, float]], float]:
    """The teacher's top-k next tokens after `text` as (rank, decoded token, probability), and its
    entropy there (nats)."""
    model, tok = teacher.model, teacher.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise kdistill.KdistillError("--text: gives no tokens")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    top = probs.topk(min(top_k, probs.numel()))
    rows = [(i + 1, tok.decode([int(t)]), float(p)) for i, (p, t) in enumerate(zip(top.values, top.indices))]
    return rows, float(-(probs * probs.clamp(min=1e-300).log()).sum())


def validation_entropies(plan, teacher, max_batches: int | None = None) -> list[float]:
    """The teacher's entropy (nats) at every counted position of the recipe's validation split: this
    loads (tokenizes) the recipe's data and runs the teacher over the whole split, the slow part."""
    model = teacher.model
    data = plan.one("data").build()
    data.setup(teacher.tokenizer, plan.recipe.train.seed)
    entropies: list[float] = []
    with torch.no_grad():
        for n, batch in enumerate(data.val_batches(plan.recipe.train.eval_batch_size or plan.recipe.train.batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            out = model(**batch.model_inputs(model_dtype(model)), use_cache=False).logits[batch.mask].double()
            logp = torch.log_softmax(out, -1)
            entropies += (-(logp.exp() * logp).sum(-1)).tolist()
    return entropies


def teacher_report(plan, text: str, top_k: int = 10, max_batches: int | None = None):
    """The teacher's top-k next tokens after `text`, its entropy there, and the per-position
    entropies (nats) over the recipe's validation split. Returns (rows, entropy, entropies)."""
    teacher = load_teacher(plan)
    rows, here = next_tokens(teacher, text, top_k)
    return rows, here, validation_entropies(plan, teacher, max_batches)


def teacher_check(plan, max_batches: int | None = None) -> dict[str, float]:
    """A quantized `hf` teacher beside its full-precision self on the validation split: perplexity of
    each, KL(full || quantized) and top-1 agreement per position, and the weights' memory."""
    resolved = plan.one("teacher")
    if resolved is None or not issubclass(resolved.entry.cls, HFTeacher):
        raise ConfigError("teacher: teacher-check compares an `hf` teacher loaded quantized with its full-precision self")
    if resolved.options.quantization == "none":
        raise ConfigError("teacher.options.quantization: the recipe's teacher is not quantized (set nf4, fp4 or int8); "
                          "nothing to compare")
    if plan.recipe.train.num_threads:
        torch.set_num_threads(plan.recipe.train.num_threads)
    device = torch.device("cpu")
    full = HFTeacher(resolved.options.model_copy(update={"quantization": "none"}))
    full.load(device)
    quant = resolved.build()
    quant.load(device)
    data = plan.one("data").build()
    data.setup(full.tokenizer, plan.recipe.train.seed)
    sums = {"nll_full": 0.0, "nll_quant": 0.0, "kl": 0.0, "agree": 0.0}
    count = 0
    with torch.no_grad():
        for n, batch in enumerate(data.val_batches(plan.recipe.train.eval_batch_size or plan.recipe.train.batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            mask = batch.mask
            a = full.model(**batch.model_inputs(model_dtype(full.model)), use_cache=False).logits[mask].double()
            b = quant.model(**batch.model_inputs(model_dtype(quant.model)), use_cache=False).logits[mask].double()
            labels = batch.labels[mask]
            sums["nll_full"] += float(torch.nn.functional.cross_entropy(a, labels, reduction="sum"))
            sums["nll_quant"] += float(torch.nn.functional.cross_entropy(b, labels, reduction="sum"))
            agreement = agreement_sums(b, a, k=1, temperature=1.0)  # KL(full || quantized), top-1 match
            sums["kl"] += agreement["kl"]
            sums["agree"] += agreement["top1"]
            count += int(mask.sum())
    if count == 0:
        raise ConfigError("data: the validation split is empty; teacher-check needs validation data")
    return {"positions": count, "full_ppl": math.exp(sums["nll_full"] / count), "quant_ppl": math.exp(sums["nll_quant"] / count),
            "kl_full_quant": sums["kl"] / count, "top1_agreement": sums["agree"] / count,
            "full_mib": full.model.get_memory_footprint() / 2**20, "quant_mib": quant.model.get_memory_footprint() / 2**20,
            "quantization": resolved.options.quantization}


LAYER_MEASURES = ("block-influence", "removal-kl")


def layer_report(plan, teacher, by: str) -> dict:
    """Each teacher layer's score by `by` on the recipe's first training batches (as many as the recipe's
    student.from_teacher.calibration_batches, else 4), and which `keep_layers` would keep where the recipe says."""
    cut = plan.recipe.student.from_teacher
    n_batches = cut.calibration_batches if cut is not None else 4
    data = plan.one("data").build()
    data.setup(teacher.tokenizer, plan.recipe.train.seed)
    batches = [data.train_batch(i, plan.recipe.train.batch_size) for i in range(n_batches)]
    scores = layer_scores(teacher.model, batches, by)
    report: dict = {"by": by, "calibration_batches": n_batches, "scores": scores}
    if cut is not None and cut.keep_layers is not None:
        report.update({"keep_layers": cut.keep_layers, "layers": keep_layers(scores, min(cut.keep_layers, len(scores)))})
    return report


def print_layer_report(report: dict) -> None:
    scores = report["scores"]
    rank = {layer: i + 1 for i, layer in enumerate(sorted(range(len(scores)), key=lambda i: (-scores[i], i)))}
    kept = set(report.get("layers", []))
    print(f"teacher layers by {report['by']} ({report['calibration_batches']} calibration batches; higher matters more):")
    print("| layer | score | rank |" + (f" kept (keep_layers {report['keep_layers']}) |" if kept else ""))
    print("|---|---|---|" + ("---|" if kept else ""))
    for layer, score in enumerate(scores):
        print(f"| {layer} | {score:.4g} | {rank[layer]} |" + (f" {'yes' if layer in kept else ''} |" if kept else ""))


@kdistill.hookimpl
def kd_register_commands(app):
    import typer

    @app.command()
    def analyze(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
                text: Optional[str] = typer.Option(None, help="a prompt; the teacher's next-token distribution after it is shown"),
                top_k: int = typer.Option(10, min=1, help="how many of the most likely tokens to list"),
                validation: bool = typer.Option(False, "--validation", help="also the teacher's entropy over the recipe's "
                                                "validation split, with a histogram (loads the data and runs the "
                                                "teacher over the whole split: minutes on a real recipe)"),
                max_batches: Optional[int] = typer.Option(None, min=1, help="with --validation: validation batches to use "
                                                          "(default: all)"),
                layers: Optional[str] = typer.Option(None, "--layers", help="score every teacher layer by this measure "
                                                     "(block-influence or removal-kl) on the recipe's first training "
                                                     "batches, as student.from_teacher.keep_layers would, without training"),
                set_: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
        """What the teacher says: its top-k next tokens and entropy after --text; with --validation, its entropy
        over the validation split too; with --layers, how much each of its layers matters."""
        if text is None and not validation and layers is None:
            fail(kdistill.KdistillError("analyze: give --text PROMPT, --validation, --layers MEASURE, or several"))
        if layers is not None and layers not in LAYER_MEASURES:
            fail(kdistill.KdistillError(f"--layers: {layers!r} is not a measure; give one of {', '.join(LAYER_MEASURES)}"))
        try:
            plan = plan_recipe(recipe, set_)
            teacher = load_teacher(plan)
            if text is not None:
                rows, here = next_tokens(teacher, text, top_k)
            entropies = validation_entropies(plan, teacher, max_batches) if validation else []
            scored = layer_report(plan, teacher, layers) if layers is not None else None
        except kdistill.KdistillError as exc:
            fail(exc)
        if scored is not None:
            print_layer_report(scored)
            folder = Path(plan.recipe.output_dir) / "analysis"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "layer_scores.json").write_text(json.dumps(scored, indent=1))
            print(f"scores: {folder / 'layer_scores.json'}")
        report: dict = {}
        if text is not None:
            print(f"teacher's next token after {text!r}:")
            for rank, token, prob in rows:
                print(f"  {rank:2d}. {token!r:20s} {prob:.4f}")
            print(f"entropy here: {here:.4f} nats ({here / math.log(2):.4f} bits)")
            report = {"text": text, "top_k": [{"rank": r, "token": t, "prob": p} for r, t, p in rows], "entropy_here": here}
        if not validation:
            return
        if not entropies:
            fail(kdistill.KdistillError("data: the validation split is empty; --validation needs validation data"))
        q = statistics.quantiles(entropies, n=10) if len(entropies) > 1 else [entropies[0]] * 9
        print(f"over {len(entropies)} validation positions: mean {statistics.fmean(entropies):.3f} nats, "
              f"median {statistics.median(entropies):.3f}, 10th-90th percentile {q[0]:.3f}-{q[-1]:.3f}")
        folder = Path(plan.recipe.output_dir) / "analysis"
        folder.mkdir(parents=True, exist_ok=True)
        path = histogram(entropies, "teacher entropy (nats)", "teacher entropy per validation position",
                         folder / "teacher_entropy.png")
        summary = {"entropy_mean": statistics.fmean(entropies), "entropy_median": statistics.median(entropies),
                   "entropy_p10": q[0], "entropy_p90": q[-1], "positions": len(entropies)}
        json_path = folder / "teacher_report.json"
        json_path.write_text(json.dumps({**report, **summary}, indent=1))
        print(f"histogram: {path}")
        track_side_run(plan, "analyze", {"text": (text or "")[:200], "top_k": top_k}, [summary], [path, json_path], folder)

    @app.command("teacher-check")
    def teacher_check_command(recipe: Path = typer.Argument(..., help="recipe YAML whose hf teacher sets quantization"),
                              set_: List[str] = typer.Option([], "--set", help=SET_HELP),
                              max_batches: Optional[int] = typer.Option(None, min=1, help="validation batches to use (default: all)")) -> None:
        """What quantizing the teacher costs: perplexity beside full precision, KL between them, memory."""
        try:
            plan = plan_recipe(recipe, set_)
            report = teacher_check(plan, max_batches)
        except kdistill.KdistillError as exc:
            fail(exc)
        q = report["quantization"]
        print("| teacher | validation perplexity | weights (MiB) |")
        print("|---|---|---|")
        print(f"| full precision | {report['full_ppl']:.3f} | {report['full_mib']:.1f} |")
        print(f"| {q} | {report['quant_ppl']:.3f} | {report['quant_mib']:.1f} |")
        print(f"KL(full || {q}) per position: {report['kl_full_quant']:.5f} nats; top-1 agreement "
              f"{report['top1_agreement']:.4f}; over {report['positions']} validation positions")
        folder = Path(plan.recipe.output_dir) / "analysis"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "teacher_check.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"report: {path}")
        track_side_run(plan, "teacher-check", {"quantization": q}, [{k: v for k, v in report.items() if isinstance(v, (int, float))}],
                       [path], folder)
