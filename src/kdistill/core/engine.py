"""The training loop: steps, accumulation, clipping, evaluation, checkpoints, metrics, progress.

The engine knows no technique by name: it builds the components a recipe names and calls them.
Losses return sums over counted positions; the engine divides by the number of counted positions
in the whole optimizer step, so accumulation over micro-batches equals one larger batch exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from kdistill.__about__ import __version__
from kdistill.core import checkpoint as ckpt
from kdistill.core.components import Batch, EvalContext, Needs, TrainContext
from kdistill.core.config import Plan, apply_overrides, load_recipe, resolve
from kdistill.core.errors import ComponentError, KdistillError
from kdistill.core.models import build_student
from kdistill.core.plugins import KdPluginManager, make_plugin_manager
from kdistill.core.registry import Registry
from kdistill.core.runtime import pick_device, seed_everything

log = logging.getLogger("kdistill")

# recipe fields whose change alters a resumed run's result
RESULT_FIELDS = ("student", "teacher", "strategy", "data", "losses", "layer_mapper", "scheduler", "train.steps",
                 "train.lr", "train.batch_size", "train.grad_accum", "train.grad_clip", "train.weight_decay",
                 "train.betas", "train.seed")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def _quiet_libraries() -> None:
    """transformers' and MLflow's own progress bars and INFO lines would drown ours."""
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _console():
    from rich.console import Console

    return Console(stderr=True)


class Engine:
    def __init__(self, plan: Plan, pm: KdPluginManager, registry: Registry):
        self.plan, self.pm, self.registry = plan, pm, registry
        self.recipe = plan.recipe
        self.out = Path(self.recipe.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.console = _console()
        _quiet_libraries()

    # ------------------------------------------------------------------ preparation

    def _check_output_dir(self, resume: bool, overwrite: bool, resume_from: Path | None = None) -> Path | None:
        if (resume or resume_from is not None) and overwrite:
            raise KdistillError("--resume and --overwrite exclude each other")
        if resume_from is not None:
            reason = ckpt.check_complete(resume_from) if resume_from.is_dir() else "no such folder"
            if reason is not None:
                raise KdistillError(f"--resume-from: {resume_from} is not a complete checkpoint ({reason})")
            return resume_from
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if resume:
            latest, skipped = ckpt.latest_complete(self.ckpt_root)
            for path, reason in skipped:
                warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
            if latest is None:
                raise KdistillError(f"--resume: no complete checkpoint under {self.ckpt_root}")
            return latest
        if existing and not overwrite:
            raise KdistillError(f"output_dir: {self.out} already holds checkpoints; pass --resume to continue or --overwrite to start over")
        return None

    def _clear_output_dir(self) -> None:
        """--overwrite: remove what an earlier run wrote (only once the new run has been built)."""
        for name in ("checkpoints", "best", "final"):
            shutil.rmtree(self.out / name, ignore_errors=True)
        for name in ("mlflow_run.json", "metrics.jsonl", "summary.json"):
            (self.out / name).unlink(missing_ok=True)

    def build(self) -> None:
        recipe, plan = self.recipe, self.plan
        self.dist = None
        if recipe.distributed.backend == "deepspeed":
            from kdistill.core.distributed import DeepSpeedRun

            self.dist = DeepSpeedRun(recipe.distributed, recipe.train)
        self.is_main = self.dist is None or self.dist.is_main
        if not self.is_main:
            self.console.quiet = True
        self.device = self.dist.device if self.dist else pick_device(recipe.train.device)
        seed_everything(recipe.train.seed)
        if recipe.train.num_threads:
            torch.set_num_threads(recipe.train.num_threads)
        self.teacher = plan.one("teacher").build() if plan.one("teacher") else None
        if self.teacher is not None:
            with self.console.status("loading the teacher"):
                self.teacher.load(self.device)
        self.student, self.tokenizer = build_student(recipe.student, self.teacher.model if self.teacher else None,
                                                     self.teacher.tokenizer if self.teacher else None)
        self._check_shared_vocabulary()
        self.student.to(self.device)
        self.student.train()
        self.data = plan.one("data").build()
        with self.console.status("reading and tokenizing the data"):
            self.data.setup(self.tokenizer, recipe.train.seed)
        self.losses = [(item.entry.name, item.weight, item.build()) for item in plan.components["losses"]]
        if self.teacher is not None:
            self.teacher.prepare(self.data, self.tokenizer, self.losses)
        self.scheduler = plan.one("scheduler").build()
        self.evaluators = [item.build() for item in plan.components.get("evaluators", [])]
        self.tracker = plan.one("tracker").build() if self.is_main else _NoTracker()
        self.strategy = plan.one("strategy").build()
        mapper = plan.one("layer_mapper")
        self.context = TrainContext(student=self.student, teacher=self.teacher, losses=self.losses, needs=Needs(),
                                    layer_mapper=mapper.build() if mapper else None)
        self.strategy.setup(self.context)
        self.modules = dict(self.strategy.trainable())
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        t = recipe.train
        groups = self.strategy.param_groups() or [{"name": "all", "params": params, "lr_scale": 1.0}]
        self.optimizer = torch.optim.AdamW([{"params": [p for p in g["params"] if p.requires_grad], "name": g["name"],
                                             "lr_scale": float(g.get("lr_scale", 1.0)), "lr": t.lr * float(g.get("lr_scale", 1.0))}
                                            for g in groups], lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        if self.dist is not None:
            if self.teacher is not None and self.teacher.model is not None and getattr(self.teacher, "runs_forward", True):
                self.teacher.model = self.dist.wrap_teacher(self.teacher.model, t.batch_size)
            self.dist.wrap_student(self.modules, self.optimizer)
            self.optimizer = self.dist.optimizer
        # FLOPs per input token (teacher forward 2P, trained parameters forward and backward 6P)
        runs_forward = self.teacher is not None and self.teacher.model is not None and getattr(self.teacher, "runs_forward", True)
        teacher_params = sum(p.numel() for p in self.teacher.model.parameters()) if runs_forward else 0
        self.flops_per_token = 2 * teacher_params + 6 * sum(p.numel() for p in params)
        self.skipped_steps = 0
        self.best_metric = t.best_metric
        if self.best_metric is None:  # the first evaluator that proposes one
            self.best_metric = next((e.best_metric for e in self.evaluators if e.best_metric), None)

    def _check_shared_vocabulary(self) -> None:
        """Comparing logits token by token needs one vocabulary: compare the tokenizers' vocabularies
        themselves (sizes alone would let two different tokenizers of one size through)."""
        from kdistill.core.components import LogitLoss

        teacher_tok = self.teacher.tokenizer if self.teacher is not None else None
        if teacher_tok is None or teacher_tok is self.tokenizer:
            return
        if not any(isinstance(item.entry.cls, type) and issubclass(item.entry.cls, LogitLoss) and item.entry.cls.needs_teacher
                   for item in self.plan.components["losses"]):
            return
        ours, theirs = self.tokenizer.get_vocab(), teacher_tok.get_vocab()
        if ours != theirs:
            differ = len(set(ours.items()) ^ set(theirs.items())) // 2 or abs(len(ours) - len(theirs))
            raise KdistillError(f"student.tokenizer: the student's tokenizer ({len(ours)} tokens) is not the teacher's "
                                f"({len(theirs)} tokens; about {differ} entries differ); logit losses compare the two "
                                "distributions token by token and need one vocabulary")

    def val_batches(self):
        size = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
        return (b.to(self.device) for b in self.data.val_batches(size))

    def evaluate(self, phase: str = "during") -> dict[str, float]:
        context = EvalContext(student=self.student, teacher=self.teacher, val_batches=self.val_batches,
                              tokenizer=self.tokenizer, device=self.device, phase=phase, output_dir=self.out,
                              log_artifact=self.tracker.log_artifact)
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator.evaluate(context))
        return metrics

    def _state(self, step: int, best: float | None, before: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "data_index": step * self.recipe.train.grad_accum, "best": best, "before": before,
                "data_fingerprint": self.data.fingerprint(), "result_fields": self._result_fields(),
                "kdistill_version": __version__}

    def _result_fields(self) -> dict[str, Any]:
        flat = flatten(self.recipe.model_dump(mode="json"))
        fields = {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in RESULT_FIELDS)}
        if self.dist is not None:  # ranks read different rows of each batch
            fields["world_size"] = self.dist.world_size
        return fields

    # ------------------------------------------------------------------ the loop

    def run(self, resume: bool = False, overwrite: bool = False, resume_from: Path | None = None,
            force: bool = False) -> dict[str, Any]:
        """Train. `resume`: from the newest checkpoint that loads (falling back with a warning);
        `resume_from`: from exactly that checkpoint or fail; `force`: accept a changed recipe or data."""
        resume_from = Path(resume_from) if resume_from is not None else None
        if getattr(self.plan.one("strategy").entry.cls, "chain", False):
            if resume_from is not None:
                raise KdistillError("--resume-from: a chain of stages resumes with --resume")
            return self._run_chain(resume, overwrite, force)
        start_from = self._check_output_dir(resume, overwrite, resume_from)
        self.build()  # bad input fails here, before anything in the output folder changes
        if overwrite and self.is_main:
            self._clear_output_dir()
        self._barrier()
        step, best, before = 0, None, {}
        if start_from is not None:
            if self.dist is not None:
                state = self.dist.load(start_from.parent, start_from.name)
            elif resume_from is not None:
                state = ckpt.load_checkpoint(start_from, self.modules, self.optimizer)
            else:
                start_from, state = self._load_newest_loadable(start_from)
            self._check_resume_state(state, start_from, force)
            step, best, before = state["step"], state["best"], state.get("before", {})
            self.console.print(f"resuming from {start_from} (step {step})", soft_wrap=True)
        self.out.mkdir(parents=True, exist_ok=True)
        resolved_yaml = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
        plugins_file = self.out / "plugins.json"
        if self.is_main:
            (self.out / "recipe.yaml").write_text(resolved_yaml)
            plugins_file.write_text(json.dumps([{"kind": e.kind, "name": e.name, "plugin": e.plugin, "distribution": e.distribution,
                                                 "version": e.version} for e in self.registry], indent=1))
        run_name = self.recipe.run_name or self.out.name
        self.tracker.start(run_name, flatten(self.recipe.model_dump(mode="json")), str(self.out))
        if start_from is None:
            self.tracker.log_artifact(str(self.out / "recipe.yaml"))
            self.tracker.log_artifact(str(plugins_file))
        self.pm.hook.kd_run_started(recipe=self.recipe.model_dump(mode="json"), output_dir=str(self.out))
        status, last = "FAILED", {}
        try:
            if step == 0 and self.evaluators:
                with self.console.status("evaluating before training"):
                    before = self.evaluate("before")
                self.tracker.log_metrics(before, step=0)
            last = self._loop(step, best, before)
            status = "FINISHED"
            return self._finish(before, last)
        finally:
            self.tracker.finish(status)
            self.pm.hook.kd_run_finished(output_dir=str(self.out), metrics=dict(last), status=status)

    def _run_chain(self, resume: bool, overwrite: bool, force: bool) -> dict[str, Any]:
        """Stages one after another (progressive distillation), each a complete run of its own, tracked
        as nested runs of this one; finished stages are skipped on --resume."""
        if resume and overwrite:
            raise KdistillError("--resume and --overwrite exclude each other")
        run_name = self.recipe.run_name or self.out.name
        stages = self.plan.one("strategy").build().stage_recipes(self.plan.raw, self.out, run_name)
        plans, problems = [], []
        for i, (name, raw) in enumerate(stages):  # every stage validated before anything runs
            try:
                plans.append(resolve(raw, self.registry))
            except KdistillError as exc:
                problems += [f"strategy.options.stages[{i}] ({name}): {p}" for p in exc.problems]
        if problems:
            raise KdistillError(problems)
        folder = self.out / "stages"
        if resume and not folder.is_dir():
            raise KdistillError(f"--resume: nothing to resume under {folder}")
        if folder.exists() and not (resume or overwrite):
            raise KdistillError(f"output_dir: {self.out} already holds stages; pass --resume to continue or --overwrite to start over")
        if overwrite:
            shutil.rmtree(folder, ignore_errors=True)
            for name in ("final", "summary.json", "metrics.jsonl", "mlflow_run.json"):
                target = self.out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
        self.tracker = self.plan.one("tracker").build()
        self.tracker.start(run_name, flatten(self.recipe.model_dump(mode="json")), str(self.out))
        status, results = "FAILED", {}
        try:
            for i, ((name, raw), plan) in enumerate(zip(stages, plans)):
                stage_out = Path(raw["output_dir"])
                if (stage_out / "summary.json").is_file() and (stage_out / "final").is_dir():
                    self.console.print(f"stage {name}: finished earlier, skipped", soft_wrap=True)
                    results[name] = json.loads((stage_out / "summary.json").read_text())
                    continue
                again = resume and ckpt.latest_complete(stage_out / "checkpoints")[0] is not None
                self.console.print(f"stage {i + 1}/{len(stages)}: {name}" + (" (resuming)" if again else ""), soft_wrap=True)
                results[name] = Engine(plan, self.pm, self.registry).run(resume=again, overwrite=not again and stage_out.exists(),
                                                                         force=force)
                self.tracker.log_metrics({f"{name}/{k}": v for k, v in results[name]["after"].items()
                                          if isinstance(v, (int, float))}, step=i + 1)
            last = results[stages[-1][0]]
            final = self.out / "final"
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last["final_model"], tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            summary = {"output_dir": str(self.out), "final_model": str(final),
                       "before": results[stages[0][0]]["before"], "after": last["after"],
                       "stages": {name: {"before": r["before"], "after": r["after"], "final_model": r["final_model"]}
                                  for name, r in results.items()}}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            self.tracker.log_artifact(str(final), "model")
            status = "FINISHED"
            return summary
        finally:
            self.tracker.finish(status)

    def _load_newest_loadable(self, newest: Path) -> tuple[Path, dict[str, Any]]:
        """Load `newest`; if it is corrupt, warn naming it and fall back to older complete ones."""
        candidates = [p for p in reversed(ckpt.list_checkpoints(self.ckpt_root))
                      if p.name <= newest.name and ckpt.check_complete(p) is None]
        failures = []
        for path in candidates:
            try:
                return path, ckpt.load_checkpoint(path, self.modules, self.optimizer)
            except KdistillError as exc:
                warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
                failures.append(str(exc))
        raise KdistillError([f"--resume: no checkpoint under {self.ckpt_root} could be restored"] + failures)

    def _check_resume_state(self, state: Mapping[str, Any], path: Path, force: bool = False) -> None:
        saved = state.get("result_fields", {})
        now = self._result_fields()
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        problems = []
        if differ:
            problems.append(f"--resume: the recipe differs from {path} in {', '.join(differ)}")
        if state.get("data_fingerprint") != self.data.fingerprint():
            problems.append(f"--resume: the data differs from the data of {path} "
                            f"(fingerprint {state.get('data_fingerprint')} != {self.data.fingerprint()})")
        if problems and not force:
            raise KdistillError([p + " (pass --force to resume anyway)" for p in problems])
        for problem in problems:
            warnings.warn(f"{problem}; resuming anyway (--force)", stacklevel=3)

    def _loop(self, step: int, best: float | None, before: dict[str, float]) -> dict[str, float]:
        self.history: list[tuple[int, dict[str, float]]] = []
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        t = self.recipe.train
        last: dict[str, float] = {}
        progress = Progress(TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn(), console=self.console, transient=False)
        with progress:
            task = progress.add_task("train", total=t.steps, completed=step, info="")
            while step < t.steps:
                began = time.perf_counter()
                try:
                    metrics = self._step(step)
                except KdistillError:
                    raise
                except Exception as exc:
                    raise self._blame(exc, step + 1) from exc
                step += 1
                elapsed = time.perf_counter() - began
                metrics["train/tokens_per_s"] = metrics.pop("_tokens") / elapsed
                metrics["train/flops_per_s"] = metrics.pop("_inputs") * self.flops_per_token / elapsed
                metrics["train/step_s"] = elapsed
                if step % t.log_every == 0 or step == t.steps:
                    self.tracker.log_metrics(metrics, step=step)
                self.history.append((step, dict(metrics)))
                last.update(metrics)
                evaluated = t.eval_every and (step % t.eval_every == 0 or step == t.steps) and self.evaluators
                if evaluated:
                    try:
                        val = self.evaluate("final" if step == t.steps else "during")
                    except KdistillError:
                        raise
                    except Exception as exc:
                        raise self._blame(exc, step, "evaluating after ") from exc
                    self.tracker.log_metrics(val, step=step)
                    last.update(val)
                    if self.best_metric and self.best_metric in val and (best is None or val[self.best_metric] < best):
                        best = val[self.best_metric]
                        self._save_student(self.out / "best")
                if t.save_every and (step % t.save_every == 0 or step == t.steps):
                    self._save_checkpoint(step, self._state(step, best, before))
                self.pm.hook.kd_step_finished(step=step, metrics=dict(metrics))
                progress.update(task, completed=step, info=f"loss {metrics['train/loss']:.3f}  {metrics['train/tokens_per_s']:.0f} tok/s")
        if not (t.eval_every and self.evaluators) and self.evaluators:
            val = self.evaluate("final")
            self.tracker.log_metrics(val, step=step)
            last.update(val)
        self._best = best
        return last

    def _micro_batch(self, index: int):
        """This rank's rows of global micro-batch `index` (all of it in a single process)."""
        t = self.recipe.train
        if self.dist is None:
            return self.data.train_batch(index, t.batch_size).to(self.device)
        whole = self.data.train_batch(index, t.batch_size * self.dist.world_size)
        rows = slice(self.dist.rank * t.batch_size, (self.dist.rank + 1) * t.batch_size)
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return Batch(pick(whole.input_ids), pick(whole.labels), pick(whole.attention_mask), pick(whole.keys)).to(self.device)

    def _step(self, step: int) -> dict[str, float]:
        t = self.recipe.train
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * group.get("lr_scale", 1.0) * self.scheduler(step, t.steps)
        batches = [self._micro_batch(step * t.grad_accum + j) for j in range(t.grad_accum)]
        counted = sum(int(b.mask.sum()) for b in batches)
        inputs = sum(b.input_ids.numel() for b in batches)
        if self.dist is not None:
            counted, inputs = (int(x) for x in self.dist.all_sum([counted, inputs]))
        self.context.total_tokens = max(counted, 1)
        total = 0.0
        terms: dict[str, float] = {}
        grad_norm = None
        for batch in batches:
            loss, parts = self.strategy.loss(batch)
            loss = loss / self.context.total_tokens
            finite = bool(torch.isfinite(loss))
            if self.dist is not None:
                finite = self.dist.agree(finite)
            if not finite:
                return self._not_finite(step, f"the loss is {loss.item()}")
            if self.dist is not None:
                # DeepSpeed averages gradients over ranks; each rank's loss is its share of the global mean
                self.dist.backward(loss * self.dist.world_size)
                grad_norm = self.dist.step()
            else:
                loss.backward()
            total += loss.item()
            for name, value in parts.items():
                terms[f"train/{name}"] = terms.get(f"train/{name}", 0.0) + value.item() / self.context.total_tokens
        if self.dist is not None:
            names = sorted(terms)
            summed = self.dist.all_sum([total] + [terms[n] for n in names])
            total, terms = summed[0], dict(zip(names, summed[1:]))
        metrics = {"train/loss": total, "train/lr": self.optimizer.param_groups[0]["lr"], **terms, "_tokens": counted,
                   "_inputs": inputs}
        if self.dist is not None:
            if grad_norm is not None and t.grad_clip is not None:
                metrics["train/grad_norm"] = grad_norm
            self.strategy.after_step()
            return metrics
        if t.grad_clip is not None:
            # each group clipped on its own (one group: the usual global clipping); the reported norm is global
            norms = [float(torch.nn.utils.clip_grad_norm_(g["params"], t.grad_clip)) for g in self.optimizer.param_groups]
            metrics["train/grad_norm"] = math.sqrt(sum(n * n for n in norms))
            if not math.isfinite(metrics["train/grad_norm"]):
                return self._not_finite(step, f"the gradient norm is {metrics['train/grad_norm']}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.after_step()
        return metrics

    def _barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def _save_student(self, target: Path) -> None:
        """save_pretrained on rank 0, with ZeRO-3's partitioned parameters gathered first."""
        if self.dist is None:
            ckpt.atomic_save_pretrained(self.student, self.tokenizer, target)
            return
        with self.dist.gathered(self.student):
            if self.is_main:
                ckpt.atomic_save_pretrained(self.student, self.tokenizer, target)
        self._barrier()

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        t = self.recipe.train
        if self.dist is None:
            ckpt.save_checkpoint(self.ckpt_root, step, self.modules, self.optimizer, state, t.keep_checkpoints)
            return
        # DeepSpeed writes each rank's shards; once every rank is done, rank 0 marks the folder complete
        tag = f"{ckpt.PREFIX}{step:08d}"
        self.dist.save(self.ckpt_root, tag, state)
        self._barrier()
        if self.is_main:
            ckpt.mark_complete(self.ckpt_root / tag, step)
            ckpt.prune(self.ckpt_root, t.keep_checkpoints)
        self._barrier()

    def _not_finite(self, step: int, what: str) -> dict[str, float]:
        """A NaN/inf loss or gradient: stop (default) or, with `train.on_nonfinite: skip`, drop the
        step's gradients and go on. Either way nothing non-finite reaches the weights or a checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.train.on_nonfinite == "stop":
            raise KdistillError(f"step {step + 1}: {what}; stopping before it reaches the weights (last checkpoint kept)")
        self.skipped_steps += 1
        warnings.warn(f"step {step + 1}: {what}; skipping the step (train.on_nonfinite: skip)", stacklevel=3)
        return {"train/loss": float("nan"), "train/lr": self.optimizer.param_groups[0]["lr"],
                "train/skipped_steps": float(self.skipped_steps), "_tokens": 0, "_inputs": 0}

    def _blame(self, exc: Exception, step: int, when: str = "") -> ComponentError:
        """Name the plugin whose code raised: the innermost traceback frame inside a registered component's
        module (or, for third-party plugins, its top-level package)."""
        modules: dict[str, Any] = {}
        for entry in self.registry:
            module = entry.cls.__module__
            modules.setdefault(module, entry)
            if not module.startswith("kdistill."):
                modules.setdefault(module.split(".")[0], entry)
        culprit = None
        tb = exc.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_globals.get("__name__", "")
            entry = modules.get(name) or (modules.get(name.split(".")[0]) if not name.startswith("kdistill.") else None)
            culprit = entry or culprit
            tb = tb.tb_next
        where = f"{culprit.kind.replace('_', ' ')} '{culprit.name}' of {culprit.source}" if culprit else "the run"
        latest, _ = ckpt.latest_complete(self.ckpt_root)
        kept = f"; the last checkpoint ({latest}) is intact" if latest else ""
        first = str(exc).splitlines()[0] if str(exc) else ""
        return ComponentError(f"{when}step {step}: {where} raised {type(exc).__name__}: {first}{kept}")

    def _finish(self, before: dict[str, float], last: dict[str, float]) -> dict[str, Any]:
        final = self.out / "final"
        self._save_student(final)
        if not self.is_main:
            return {"output_dir": str(self.out), "final_model": str(final), "before": before, "after": last}
        self.tracker.log_artifact(str(final), "model")
        plot = self._plot_losses()
        if plot is not None:
            self.tracker.log_artifact(str(plot), "plots")
        summary = {"output_dir": str(self.out), "final_model": str(final), "before": before, "after": last,
                   "best": getattr(self, "_best", None), "best_metric": self.best_metric}
        for name in ("run_id", "tracking_uri"):
            if getattr(self.tracker, name, None):
                summary[f"mlflow_{name}"] = getattr(self.tracker, name)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self._print_summary(summary)
        return summary

    def _plot_losses(self) -> Path | None:
        """loss_curves.png: each loss term over this process's steps (a figure is not worth failing a run)."""
        try:
            from kdistill.core.plots import loss_curves

            return loss_curves(self.history, self.out / "loss_curves.png")
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"could not draw the loss curves: {type(exc).__name__}: {exc}", stacklevel=2)
            return None

    def _print_summary(self, summary: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="kdistill run")
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        keys = [k for k in summary["after"] if k.startswith(("val/", "retention/"))] or [k for k in summary["after"] if k.startswith("train/")]
        for key in keys:
            b = summary["before"].get(key)
            table.add_row(key, "" if b is None else f"{b:.4g}", f"{summary['after'][key]:.4g}")
        self.console.print(table)
        self.console.print(f"final student: {summary['final_model']}  (AutoModelForCausalLM.from_pretrained loads it)", soft_wrap=True)
        if "mlflow_tracking_uri" in summary:
            self.console.print(f"MLflow run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}; "
                               f"see it with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}", soft_wrap=True)


class _NoTracker:
    """Ranks other than 0 track nothing."""

    def start(self, *args, **kwargs):
        pass

    def log_metrics(self, *args, **kwargs):
        pass

    def log_artifact(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass


def run_recipe(recipe: str | Path | Mapping[str, Any], overrides=(), resume: bool = False, overwrite: bool = False,
               pm: KdPluginManager | None = None, resume_from: Path | None = None, force: bool = False) -> dict[str, Any]:
    pm = pm if pm is not None else make_plugin_manager()
    registry = Registry.from_plugins(pm)
    raw = load_recipe(recipe, overrides) if isinstance(recipe, (str, Path)) else apply_overrides(dict(recipe), list(overrides))
    plan = resolve(raw, registry)
    return Engine(plan, pm, registry).run(resume=resume, overwrite=overwrite, resume_from=resume_from, force=force)
