"""The training loop: steps, accumulation, clipping, evaluation, checkpoints, metrics, progress.

The engine knows no technique by name: it builds the components a recipe names and calls them. Losses
return sums over counted positions; the engine divides by the count over the whole optimizer step, so
accumulation over micro-batches equals one larger batch exactly. How a step executes (one process or
DeepSpeed) is `backends.py`'s; the output folder's rules `run_folder.py`'s; what a run shows `summary.py`'s.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from kdistill.__about__ import __version__
from kdistill.core import checkpoint as ckpt
from kdistill.core import components as kinds
from kdistill.core import layer_choice, model_card, run_folder, summary, width_cut
from kdistill.core.backends import make_backend
from kdistill.core.config import Plan, _typed, apply_overrides, load_recipe, required, resolve
from kdistill.core.errors import ConfigError, KdistillError, RunFailed, guarded, os_error_line
from kdistill.core.generation import run_generator
from kdistill.core.models import build_student, check_positions, check_shared_vocabulary, choose_attention
from kdistill.core.plugins import KdPluginManager, make_plugin_manager
from kdistill.core.registry import Registry
from kdistill.core.runtime import seed_everything
from kdistill.core.schedule import apply_schedules, value_at
from kdistill.core.stages import StageRunner

# recipe fields whose change alters a resumed run's result
RESULT_FIELDS = ("student", "teacher", "strategy", "data", "losses", "layer_mapper", "scheduler", "train.steps", "train.lr",
                 "train.batch_size", "train.grad_accum", "train.grad_clip", "train.weight_decay", "train.betas", "train.seed", "train.autocast")


class Engine:
    def __init__(self, plan: Plan, pm: KdPluginManager, registry: Registry):
        self.plan, self.pm, self.registry = plan, pm, registry
        self.recipe = plan.recipe
        self.out = Path(self.recipe.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.console = summary.console()
        self._progress = None  # the training progress bar while it shows
        summary.quiet_libraries()

    def build(self) -> None:
        """Every component and model of the recipe, on this process's device; bad input fails here."""
        recipe, plan, t = self.recipe, self.plan, self.recipe.train
        self.backend = make_backend(recipe.distributed, t)
        self.is_main, self.device = self.backend.is_main, self.backend.device
        self.console.quiet = not self.is_main
        seed_everything(t.seed)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.teacher = plan.build("teacher", kinds.TeacherProvider)
        if self.teacher is not None:
            with self.console.status("loading the teacher"):
                self.teacher.load(self.device)
        cut = recipe.student.from_teacher
        if cut is not None and self.teacher is not None and self.teacher.model is not None:  # before a generator writes
            if cut.keep_layers is not None:
                layer_choice.check_keep_layers(cut.keep_layers, self.teacher.model)
            width_cut.check_width(cut.heads, cut.mlp, self.teacher.model)
        if self.is_main:  # a generator's output (the data, usually) is written first when not complete
            run_generator(plan, self.teacher, self.device, lambda text: self.console.print(text, soft_wrap=True), first=True)
        self.backend.barrier()
        teacher_tokenizer = self.teacher.tokenizer if self.teacher else None
        self.data = required(plan.build("data", kinds.DataSource))
        student_spec = recipe.student
        self.layer_choice: dict[str, Any] | None = None
        width: dict[str, Any] | None = None
        if cut is not None and (cut.keep_layers is not None or cut.heads is not None or cut.mlp is not None):
            teacher_model = self.teacher.model if self.teacher is not None else None
            if teacher_model is None:
                field = "keep_layers" if cut.keep_layers is not None else "heads" if cut.heads is not None else "mlp"
                raise ConfigError(f"student.from_teacher.{field}: measuring the teacher needs its model "
                                  "(a cached teacher: set teacher.options.load_source: true)")
            student_spec, width = self._choose_cut(cut, teacher_model, teacher_tokenizer)
        self.student, self.tokenizer = build_student(student_spec, self.teacher.model if self.teacher else None, teacher_tokenizer,
                                                     width=width)
        check_shared_vocabulary(teacher_tokenizer, self.tokenizer, [item.entry.cls for item in plan.components["losses"]])
        self.student.to(self.device).train()
        choose_attention(self.student, self.device)
        if self.layer_choice is None or self.tokenizer is not teacher_tokenizer:
            with self.console.status("reading and tokenizing the data"):
                self.data.setup(self.tokenizer, t.seed)
        check_positions(self.data.train_batch(0, 1).input_ids.shape[1], {"student": self.student, "teacher": getattr(
            self.teacher, "model", None)}, "data.options.seq_len" if hasattr(self.data.options, "seq_len") else "data")
        self.weights = [item.weight for item in plan.components["losses"]]  # numbers or schedules
        self.losses = [(item.entry.name, value_at(item.weight, 0, t.steps), _typed(item.build(), kinds.Loss))
                       for item in plan.components["losses"]]
        if self.teacher is not None:
            self.teacher.prepare(self.data, self.tokenizer, self.losses)
        self.scheduler = required(plan.build("scheduler", kinds.Scheduler))
        self.evaluators = plan.build_all("evaluators", kinds.Evaluator)
        self.tracker: kinds.Tracker | summary.NoTracker = required(plan.build("tracker", kinds.Tracker)) if self.is_main else summary.NoTracker()
        self.strategy = required(plan.build("strategy", kinds.Strategy))
        self.context = kinds.TrainContext(student=self.student, teacher=self.teacher, losses=self.losses, needs=kinds.Needs(),
                                    layer_mapper=plan.build("layer_mapper", kinds.LayerMapper), tokenizer=self.tokenizer,
                                    rank=getattr(self.backend, "rank", 0), data=self.data)
        self.strategy.setup(self.context)
        self.modules = dict(self.strategy.trainable())
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        groups = self.strategy.param_groups() or [{"name": "all", "params": params, "lr_scale": 1.0}]
        optimizer = torch.optim.AdamW([{"params": [p for p in g["params"] if p.requires_grad], "name": g["name"],
                                        "lr_scale": float(g.get("lr_scale", 1.0)), "lr": t.lr * float(g.get("lr_scale", 1.0))}
                                       for g in groups], lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.optimizer = self.backend.prepare(self.teacher, self.modules, optimizer, t.batch_size)
        # FLOPs per input token (teacher forward 2P, trained parameters forward and backward 6P)
        model = self.teacher.model if self.teacher is not None and getattr(self.teacher, "runs_forward", True) else None
        teacher_params = sum(p.numel() for p in model.parameters()) if model is not None else 0
        self.flops_per_token = 2 * teacher_params + 6 * sum(p.numel() for p in params)
        self.skipped_steps = 0
        self.best_metric = t.best_metric or next((e.best_metric for e in self.evaluators if e.best_metric), None)

    def _choose_cut(self, cut: Any, teacher_model: Any, tokenizer: Any) -> tuple[Any, dict[str, Any] | None]:
        """The student spec with the `keep_layers` teacher layers that `cut.by` ranks highest, and the heads and
        MLP channels of a width cut, measured on the first training batches of the recipe's data (read with the
        teacher's tokenizer); recorded in `layer_choice` (layer_choice.json)."""
        spec, t = self.recipe.student, self.recipe.train
        with self.console.status("reading and tokenizing the data"):
            self.data.setup(tokenizer, t.seed)
        batches = [self.data.train_batch(i, t.batch_size).to(self.device) for i in range(cut.calibration_batches)]
        kept = cut.layers
        choice: dict[str, Any] = {"calibration_batches": len(batches)}
        if cut.keep_layers is not None:
            with self.console.status(f"measuring the teacher's layers ({cut.by}, {len(batches)} batches)"):
                scores = layer_choice.layer_scores(teacher_model, batches, cut.by)
            kept = layer_choice.keep(scores, cut.keep_layers)
            choice.update(by=cut.by, keep_layers=cut.keep_layers, scores=scores)
            self.console.print(f"student.from_teacher: kept teacher layers {kept} of {len(scores)}, by {cut.by} "
                               f"(scores {', '.join(f'{v:.3g}' for v in scores)})", soft_wrap=True)
        choice["layers"] = kept
        width = None
        if cut.heads is not None or cut.mlp is not None:
            with self.console.status(f"measuring the teacher's heads and MLP channels ({len(batches)} batches)"):
                scores_w = width_cut.width_scores(teacher_model, batches)
            kv = width_cut.kv_heads(teacher_model.config)
            width = width_cut.kept_width(scores_w, kept, cut.heads, cut.mlp, kv)
            choice["width"] = {"by": "activation", "heads": cut.heads, "mlp": cut.mlp, "kept": width, "scores": scores_w}
            self.console.print(f"student.from_teacher: {cut.heads or 'all'} attention heads and {cut.mlp or 'all'} MLP "
                               "channels per layer, the most important by activation", soft_wrap=True)
        self.layer_choice = choice
        return spec.model_copy(update={"from_teacher": cut.model_copy(update={"layers": kept})}), width

    def val_batches(self):
        size = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
        return (b.to(self.device) for b in self.data.val_batches(size))

    def evaluate(self, phase: str = "during") -> dict[str, float]:
        """Every evaluator in turn, each with its own line of progress (batches, or what it reports)."""
        metrics: dict[str, float] = {}
        with summary.eval_progress(self.console, self._progress) as progress:
            for evaluator in self.evaluators:
                label = getattr(evaluator.options, "label", "")
                task = progress.add_task(f"evaluating ({phase}): {evaluator.name}{f' {label}' if label else ''}", total=None, info="")
                line = summary.EvalLine(progress, task, self.val_batches)
                context = kinds.EvalContext(student=self.student, teacher=self.teacher, val_batches=line.batches,
                                            tokenizer=self.tokenizer, device=self.device, phase=phase, output_dir=self.out,
                                            log_artifact=self.tracker.log_artifact, progress=line.report)
                metrics.update(evaluator.evaluate(context))
                progress.remove_task(task)
        return metrics

    def _result_fields(self) -> dict[str, Any]:
        flat = summary.flatten(self.recipe.model_dump(mode="json"))
        fields = {k: v for k, v in flat.items() if any(k == f or k.startswith(f + ".") for f in RESULT_FIELDS)}
        return {**fields, **self.backend.result_fields()}

    def _state(self, step: int, best: float | None, before: dict[str, float]) -> dict[str, Any]:
        return {"step": step, "data_index": step * self.recipe.train.grad_accum, "best": best, "before": before,
                "data_fingerprint": self.data.fingerprint(), "result_fields": self._result_fields(), "kdistill_version": __version__}

    def run(self, resume: bool = False, overwrite: bool = False, resume_from: Path | None = None,
            force: bool = False) -> dict[str, Any]:
        """Train. `resume`: from the newest checkpoint that loads (falling back with a warning);
        `resume_from`: from exactly that checkpoint or fail; `force`: accept a changed recipe or data."""
        resume_from = Path(resume_from) if resume_from is not None else None
        if (resume or resume_from is not None) and overwrite:
            raise KdistillError("--resume and --overwrite exclude each other")
        if required(self.plan.one("strategy")).entry.cls.chain:
            if resume_from is not None:
                raise KdistillError("--resume-from: a chain of stages resumes with --resume")
            with run_folder.lock(self.out):  # the chain's folder; each stage locks its own
                return required(self.plan.build("strategy", kinds.Strategy)).run_chain(self.plan, StageRunner(self), resume, overwrite, force)
        done = run_folder.finished(self.out, self.recipe.model_dump(mode="json")) if resume else None
        if done is not None:
            self.console.print(f"{self.out}: this run finished earlier; nothing to resume", soft_wrap=True)
            return done
        start_from = run_folder.start_point(self.out, resume, overwrite, resume_from)
        try:
            self.build()  # bad input fails here, before anything in the output folder changes
            lock = run_folder.lock_on_main(self.out, self.backend)  # no other run writes here meanwhile
        except OSError as exc:  # an unreadable input, an output folder that cannot be made: nothing written yet
            raise KdistillError(f"{os_error_line(exc)} (nothing was written)") from None
        try:
            return self._run_locked(start_from, overwrite, resume_from, force)
        except OSError as exc:  # disk full, a folder made read-only mid-run: what was kept is what matters
            raise RunFailed(f"the run stopped: {os_error_line(exc)}; {run_folder.what_is_kept(self.ckpt_root)}") from None
        finally:
            if lock is not None:
                lock.close()

    def _run_locked(self, start_from: Path | None, overwrite: bool, resume_from: Path | None, force: bool) -> dict[str, Any]:
        if overwrite and self.is_main:
            run_folder.clear(self.out)
        self.backend.barrier()
        step, best, before = 0, None, {}
        if start_from is not None:
            start_from, state = run_folder.restore(self.backend, self.out, start_from, resume_from is not None,
                                                   self.modules, self.optimizer)
            run_folder.check_resume_state(state, self._result_fields(), self.data.fingerprint(), start_from, force)
            step, best, before = state["step"], state["best"], state.get("before", {})
            self.console.print(f"resuming from {start_from} (step {step})", soft_wrap=True)
        self.out.mkdir(parents=True, exist_ok=True)
        recipe = self.recipe.model_dump(mode="json")
        files = run_folder.write_run_files(self.out, recipe, self.registry) if self.is_main else []
        if self.layer_choice is not None and self.is_main:  # which teacher layers were measured and kept, and why
            (self.out / "layer_choice.json").write_text(json.dumps(self.layer_choice, indent=1))
            files.append(self.out / "layer_choice.json")
        self.tracker.start(self.recipe.run_name or self.out.name, summary.flatten(recipe), str(self.out))
        for path in files if start_from is None else ():
            self.tracker.log_artifact(str(path))
        self.pm.hook.kd_run_started(recipe=recipe, output_dir=str(self.out))
        status, last = "FAILED", {}
        try:
            if step == 0 and self.evaluators:
                before = self._guarded(self.evaluate, "before", "evaluating before training")
                self.tracker.log_metrics(before, step=0)
            last = self._loop(step, best, before)
            status = "FINISHED"
            return self._finish(before, last)
        finally:
            self.tracker.finish(status)
            self.pm.hook.kd_run_finished(output_dir=str(self.out), metrics=dict(last), status=status)

    def _loop(self, step: int, best: float | None, before: dict[str, float]) -> dict[str, float]:
        self.history: list[tuple[int, dict[str, float]]] = []
        t = self.recipe.train
        last: dict[str, float] = {}
        self.saved_checkpoints = 0
        with summary.progress_bar(self.console) as progress:
            self._progress = progress  # evaluations during training add their lines to it
            task = progress.add_task("distilling", total=t.steps, completed=step, info="")
            while step < t.steps:
                began = time.perf_counter()
                metrics = self._guarded(self.train_step, step, f"step {step + 1}")
                step += 1
                elapsed = time.perf_counter() - began
                metrics["train/tokens_per_s"] = metrics.pop("_tokens") / elapsed
                metrics["train/flops_per_s"] = metrics.pop("_inputs") * self.flops_per_token / elapsed
                metrics["train/step_s"] = elapsed
                if step % t.log_every == 0 or step == t.steps:
                    self.tracker.log_metrics(metrics, step=step)
                self.history.append((step, dict(metrics)))
                last.update(metrics)
                if t.eval_every and (step % t.eval_every == 0 or step == t.steps) and self.evaluators:
                    val = self._guarded(self.evaluate, "final" if step == t.steps else "during", f"evaluating after step {step}")
                    self.tracker.log_metrics(val, step=step)
                    last.update(val)
                    if self.best_metric and self.best_metric in val and (best is None or val[self.best_metric] < best):
                        best = val[self.best_metric]
                        self.backend.save_student(self.student, self.tokenizer, self.out / "best")
                if t.save_every and (step % t.save_every == 0 or step == t.steps):
                    self.backend.save_checkpoint(self.ckpt_root, step, self.modules, self.optimizer,
                                                 self._state(step, best, before), t.keep_checkpoints)
                    self.saved_checkpoints += 1
                self.pm.hook.kd_step_finished(step=step, metrics=dict(metrics))
                progress.update(task, completed=step, info=f"loss {metrics['train/loss']:.3f}  {metrics['train/tokens_per_s']:.0f} tok/s")
        self._progress = None
        if not (t.eval_every and self.evaluators) and self.evaluators:
            val = self._guarded(self.evaluate, "final", "evaluating after training")
            self.tracker.log_metrics(val, step=step)
            last.update(val)
        self._best = best
        return last

    def _guarded(self, call, argument, where: str):
        """`call(argument)`; a component's exception becomes one error naming its plugin and `where`."""
        return guarded(call, argument, where, self.registry, lambda: ckpt.latest_complete(self.ckpt_root)[0])

    def micro_batch(self, index: int):
        """This process's rows of global micro-batch `index` (all of it in a single process)."""
        return self.backend.micro_batch(self.data, index, self.recipe.train.batch_size)

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step `step` (from 0): its micro-batches forward and backward, the update, the metrics."""
        t, backend = self.recipe.train, self.backend
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * group.get("lr_scale", 1.0) * self.scheduler(step, t.steps)
        scheduled = apply_schedules(self.context.losses, self.weights, step, t.steps)
        self.context.step, self.context.total_steps = step, t.steps
        indices = [step * t.grad_accum + j for j in range(t.grad_accum)]
        batches = [self.strategy.prepare_batch(self.micro_batch(i), i) for i in indices]
        if self.teacher is not None and type(self.teacher).prefetch is not kinds.TeacherProvider.prefetch:
            # a teacher that fetches its targets starts on them while the student trains
            ahead = [self.micro_batch(i + t.grad_accum) for i in indices] if self._data_batches_ahead(step) else []
            self.teacher.prefetch(batches + ahead)
        counted, inputs = (int(x) for x in backend.all_sum([sum(int(b.mask.sum()) for b in batches),
                                                            sum(b.input_ids.numel() for b in batches)]))
        self.context.total_tokens = max(counted, 1)
        total = 0.0
        terms: dict[str, float] = {}
        for batch in batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.autocast == "bfloat16"):
                loss, parts = self.strategy.loss(batch)
            loss = loss / self.context.total_tokens
            if not backend.agree(bool(torch.isfinite(loss))):
                return self._not_finite(step, f"the loss is {loss.item()}")
            backend.backward(loss)
            total += loss.item()
            for name, value in parts.items():
                terms[f"train/{name}"] = terms.get(f"train/{name}", 0.0) + value.item() / self.context.total_tokens
        names = sorted(terms)
        counts = self.strategy.step_metrics()  # summed over processes, like the terms
        summed = backend.all_sum([total] + [terms[n] for n in names] + list(counts.values()))
        total, terms = summed[0], dict(zip(names + list(counts), summed[1:]))
        metrics = {"train/loss": total, "train/lr": self.optimizer.param_groups[0]["lr"], **terms, **scheduled,
                   "_tokens": counted, "_inputs": inputs}
        grad_norm = backend.clip_gradients(self.optimizer, t.grad_clip)
        if grad_norm is not None and t.grad_clip is not None:
            metrics["train/grad_norm"] = grad_norm
        if grad_norm is not None and backend.update_pending and not math.isfinite(grad_norm):
            return self._not_finite(step, f"the gradient norm is {grad_norm}")
        backend.update(self.optimizer)
        if (bad := backend.non_finite(self.modules)) is not None:  # finite gradients, overflowing update
            raise RunFailed(f"step {step + 1}: the update made {bad} non-finite (train.lr {t.lr} too large?); "
                            "stopping before it is saved (last checkpoint kept)")
        self.strategy.after_step()
        return metrics

    def _data_batches_ahead(self, step: int) -> bool:
        """Whether the next step trains on the data's own micro-batches (so they can be fetched ahead): a strategy
        that makes its own (on-policy) does not say so until that step."""
        return step + 1 < self.recipe.train.steps and type(self.strategy).prepare_batch is kinds.Strategy.prepare_batch

    def _not_finite(self, step: int, what: str) -> dict[str, float]:
        """A NaN/inf loss or gradient: stop (default) or, with `train.on_nonfinite: skip`, drop the
        step's gradients and go on. Either way nothing non-finite reaches the weights or a checkpoint."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.recipe.train.on_nonfinite == "stop":
            raise RunFailed(f"step {step + 1}: {what}; stopping before it reaches the weights (last checkpoint kept)")
        self.skipped_steps += 1
        warnings.warn(f"step {step + 1}: {what}; skipping the step (train.on_nonfinite: skip)", stacklevel=3)
        if self.skipped_steps > self.recipe.train.max_skipped_share * self.recipe.train.steps:
            raise RunFailed(f"step {step + 1}: {self.skipped_steps} of {self.recipe.train.steps} steps skipped, more than "
                            f"train.max_skipped_share ({self.recipe.train.max_skipped_share}); the run is not trained")
        return {"train/loss": float("nan"), "train/lr": self.optimizer.param_groups[0]["lr"],
                "train/skipped_steps": float(self.skipped_steps), "_tokens": 0, "_inputs": 0}

    def _finish(self, before: dict[str, float], last: dict[str, float]) -> dict[str, Any]:
        final = self.out / "final"
        self.backend.save_student(self.student, self.tokenizer, final)
        result = {"output_dir": str(self.out), "final_model": str(final), "before": before, "after": last}
        if not self.is_main:
            return result
        parameters = sum(p.numel() for n, p in self.student.named_parameters() if ".lora_" not in n)  # as merged
        model_card.write_model_card(final, self.recipe.model_dump(mode="json"), result, parameters, self.layer_choice)
        self.tracker.log_model(str(final))
        plot = summary.plot_losses(self.history, self.out)
        if plot is not None:
            self.tracker.log_artifact(str(plot), "plots")
        disk = summary.disk_usage(self.out, self.ckpt_root, self.saved_checkpoints, self.recipe.train.keep_checkpoints)
        result = summary.write_summary(self.out, {**result, "best": self._best, "best_metric": self.best_metric, "disk": disk},
                                       self.tracker)
        self.tracker.log_summary(result)
        summary.print_summary(summary.results_console(), result)
        return result


def run_recipe(recipe: str | Path | Mapping[str, Any], overrides=(), resume: bool = False, overwrite: bool = False,
               pm: KdPluginManager | None = None, resume_from: Path | None = None, force: bool = False) -> dict[str, Any]:
    pm = pm if pm is not None else make_plugin_manager()
    registry = Registry.from_plugins(pm)
    raw = load_recipe(recipe, overrides) if isinstance(recipe, (str, Path)) else apply_overrides(dict(recipe), list(overrides))
    plan = resolve(raw, registry)
    return Engine(plan, pm, registry).run(resume=resume, overwrite=overwrite, resume_from=resume_from, force=force)
