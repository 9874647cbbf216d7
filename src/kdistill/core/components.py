"""Base classes of every component kind.

A component declares a `name`, a nested pydantic `Options` model and takes an instance of it in
`__init__`. The engine calls components directly; hooks are only used to discover the classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

import pydantic
import torch
from pydantic import Field
from pydantic_core import PydanticCustomError
from torch import nn

from kdistill.core.schedule import Schedule, Scheduled, value_at

IGNORE_INDEX = -100


class Options(pydantic.BaseModel):
    """Options of a component: unknown fields are errors and instances are immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Component:
    """Common base: subclasses set `name` and may override the nested `Options`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "component"
    # the component a recipe gets when it leaves its kind's slot out (one per kind at most; kdistill's
    # own: the offline strategy, the constant scheduler, the MLflow tracker)
    is_default: ClassVar[bool] = False

    class Options(Options):
        pass

    def __init__(self, options: Options | None = None):
        self.options = options if options is not None else self.Options()


# --------------------------------------------------------------------------- data passed around


@dataclass
class Batch:
    """Token ids and aligned targets: `logits[:, t]` predicts `labels[:, t]` (no shifting anywhere).

    `labels` holds IGNORE_INDEX where a position does not count (padding, prompts). `keys` [B]
    (optional) names each sequence stably across runs, so that per-sequence teacher outputs can be
    cached and looked up. `position_ids` [B, T] is set for packed rows (several examples in one
    row): positions restart at 0 where an example starts, and no token attends across an example
    boundary (`model_inputs` turns them into a block-diagonal causal mask).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> "Batch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        positions = None if self.position_ids is None else self.position_ids.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), mask, self.keys, positions)

    def rows(self, rows: slice | torch.Tensor) -> "Batch":
        """The batch's rows `rows` (a slice or index tensor), every field alike."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        return Batch(self.input_ids[rows], self.labels[rows], pick(self.attention_mask), pick(self.keys), pick(self.position_ids))

    def model_inputs(self, dtype: torch.dtype = torch.float32, input_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of a Hugging Face model's forward for this batch (`input_ids` may be replaced,
        e.g. by an augmented view). Unpacked rows: the 2D padding mask. Packed rows: the position ids and
        an additive 4D mask in `dtype` (the model's), causal within each example and closed across them."""
        ids = self.input_ids if input_ids is None else input_ids
        if self.position_ids is None:
            return {"input_ids": ids, "attention_mask": self.attention_mask}
        return {"input_ids": ids, "attention_mask": packed_attention_mask(self.position_ids, self.attention_mask, dtype),
                "position_ids": self.position_ids}


def packed_attention_mask(position_ids: torch.Tensor, padding: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] additive mask: 0 where query t may see key s (same example, s <= t, not padding),
    the dtype's lowest value elsewhere. An example starts where the position id does not follow on."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    example = starts.long().cumsum(-1)  # [B, T]: which example each token belongs to
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (example[:, :, None] == example[:, None, :]) & causal
    if padding is not None:
        allowed = allowed & padding.bool()[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool, device=position_ids.device)  # a padded row still sees itself (no NaN)
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class SparseTargets:
    """A teacher's top-k log-probabilities at `temperature`, their token ids and the tail mass.

    `ids` [..., k] (any integer type), `logprobs` [..., k], `log_tail` [...]: the log of the
    probability of every token outside the top k (-inf when there is none). `label_logprobs` [...], where
    the teacher gives it (a served teacher does): the log-probability at temperature 1 of each position's
    actual next token, top k or not (what the sampled-token loss needs). `kind`: "top-k" (the k most likely
    tokens and a tail bin), or "sampled" (k draws from the teacher's distribution as frequencies over
    distinct ids, no tail: unbiased for forward KL only; LogitLoss.supports_sampled). `entropy` [...], where
    given (a sampled cache stores it): the teacher's entropy at `temperature` per position, so that forward KL's
    value estimates the full KL without bias instead of the KL to the draws.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    temperature: float
    label_logprobs: torch.Tensor | None = None
    kind: str = "top-k"
    entropy: torch.Tensor | None = None

    def _map(self, f) -> "SparseTargets":
        """The same targets with `f` applied to every per-position tensor."""
        optional = {name: None if value is None else f(value)
                    for name, value in (("label_logprobs", self.label_logprobs), ("entropy", self.entropy))}
        return SparseTargets(f(self.ids), f(self.logprobs), f(self.log_tail), self.temperature, kind=self.kind, **optional)

    def rows(self, mask: torch.Tensor) -> "SparseTargets":
        return self._map(lambda t: t[mask])

    def slice(self, start: int, stop: int) -> "SparseTargets":
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device) -> "SparseTargets":
        return self._map(lambda t: t.to(device))

    def slice_positions(self, length: int) -> "SparseTargets":
        """The first `length` positions of targets [batch, positions, ...]."""
        return self._map(lambda t: t[:, :length])


@dataclass
class ModelOutputs:
    """What a model said for a batch; only what some component asked for is filled.

    `final_hidden` and `output_weight` (the last hidden states after the final norm, and the
    output projection) let the engine compute logit losses in chunks without full logits.
    """

    logits: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None
    output_weight: torch.Tensor | None = None
    sparse: SparseTargets | None = None
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Needs:
    """What the losses of a run ask the models for."""

    logits: bool = True
    final_hidden: bool = False
    hidden_layers: tuple[int, ...] = ()
    attention_layers: tuple[int, ...] = ()


# --------------------------------------------------------------------------- the kinds


class TeacherProvider(Component):
    """Says what the teacher predicts for a batch. `model`/`tokenizer` are set by `load`."""

    kind = "teacher"
    model: nn.Module | None = None
    tokenizer: Any = None
    # whether it can score text it has not seen before (the student's own answers): a provider of stored
    # targets (a top-k cache) cannot
    scores_new_text: ClassVar[bool] = True

    def load(self, device: torch.device) -> None:
        raise NotImplementedError

    def prepare(self, data: "DataSource", tokenizer: Any, losses: list[tuple[str, float, "Loss"]]) -> None:
        """Called once the data are set up: a provider whose targets were computed ahead of time
        checks here that they fit this run (data, tokenizer, losses). Nothing to check by default."""

    def outputs(self, batch: Batch, needs: Needs) -> ModelOutputs:
        raise NotImplementedError

    def prefetch(self, batches: list[Batch]) -> None:
        """Batches whose `outputs` will be asked for soon, in order (the rest of this step's micro-batches, and
        the next step's where the strategy trains on the data's own batches): a provider that fetches targets
        from elsewhere starts on them now, so the wait overlaps training. Nothing by default."""


class TemperatureOptions(Options):
    """The one declaration of a softening temperature. Logit losses that soften take their options
    from it (a number, or a schedule over steps); the cached teacher, mtp-self's own distillation and
    the agreement evaluator use `ConstantTemperatureOptions`, the same option fixed for the run."""

    temperature: Scheduled = Field(1.0, description="softening temperature T, or a schedule of it over the steps "
                                   "({schedule: linear, start: 4, end: 1}); losses are scaled by T^2")

    @pydantic.field_validator("temperature")
    @classmethod
    def _positive(cls, value: Scheduled) -> Scheduled:
        low = value.bounds()[0] if isinstance(value, Schedule) else value
        if not low > 0:  # worded as pydantic words its own bound
            raise PydanticCustomError("greater_than", "Input should be greater than 0", {"gt": 0})
        return value


class ConstantTemperatureOptions(TemperatureOptions):
    """A temperature fixed for the whole run (what a cache was computed at, what an evaluator measures at)."""

    temperature: float = Field(1.0, gt=0, description="softening temperature T")


class Loss(Component):
    """A per-position loss. `__call__` returns the SUM over positions whose label counts.

    The engine divides by the number of counted positions in the whole optimizer step, so
    gradient accumulation over micro-batches equals one large batch exactly.
    """

    kind = "loss"
    needs_teacher: ClassVar[bool] = True
    needs_logits: ClassVar[bool] = True  # full student logits; False lets the engine skip them

    @property
    def temperature(self) -> float | None:
        """The softening temperature at the current step (None for a loss without one)."""
        if not isinstance(self.options, TemperatureOptions):
            return None
        return value_at(self.options.temperature, *getattr(self, "_step", (0, 1)))

    def at_step(self, step: int, total_steps: int) -> None:
        """Called by the engine before each optimizer step: scheduled options take that step's value."""
        self._step = (step, total_steps)

    def __call__(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class LogitLoss(Loss):
    """A loss on the output distributions, defined row by row on float32 logits.

    Subclasses implement `rows(student [N, V], teacher, labels [N]) -> [N]`, where `teacher` is
    teacher logits [N, V'], a `SparseTargets` of N rows, or None. The engine evaluates `rows` on
    chunks of positions straight from hidden states (the fused path), so no [tokens x vocabulary]
    tensor exists at once; `__call__` is the plain path over full logits. Both share `rows`.
    A subclass may also override `rows_and_grad` with an analytic gradient (faster).
    """

    supports_sparse: ClassVar[bool] = False
    # defined on sampled targets too (SparseTargets.kind "sampled"), with the full expected gradient there
    supports_sampled: ClassVar[bool] = False
    # the hard-label cross-entropy (value logsumexp(z) - z_label, no options): another loss may carry it along
    is_cross_entropy: ClassVar[bool] = False
    # implements rows_and_grad_with_ce: the cross-entropy's value and gradient computed in this loss's own
    # passes over a chunk, so that the fused path reads and writes the chunk no more often than for one loss
    carries_cross_entropy: ClassVar[bool] = False

    def rows(self, student: torch.Tensor, teacher: "torch.Tensor | SparseTargets | None", labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_and_grad(self, student: torch.Tensor, teacher, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row values and d(sum of rows)/d(student logits); by autograd unless overridden.

        On the fused path the engine hands over chunks it no longer needs, so an override may
        overwrite `student` and a dense `teacher` in place to save memory.
        """
        with torch.enable_grad():
            leaf = student.detach().requires_grad_(True)
            values = self.rows(leaf, teacher, labels)
            (grad,) = torch.autograd.grad(values.sum(), leaf)
        return values.detach(), grad

    def rows_and_grad_with_ce(self, student: torch.Tensor, teacher, labels: torch.Tensor,
                              ce_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(own rows, cross-entropy rows, own gradient + ce_scale x the cross-entropy's gradient), where
        `carries_cross_entropy` is set; the fused path uses it for a recipe of this loss and cross-entropy."""
        raise NotImplementedError(f"loss '{self.name}' does not carry the cross-entropy")

    def __call__(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch) -> torch.Tensor:
        mask = batch.mask
        if student.logits is None:
            raise ValueError(f"loss '{self.name}' needs the student's logits")
        s = student.logits[mask]
        s = s if s.dtype in (torch.float32, torch.float64) else s.float()
        target: torch.Tensor | SparseTargets | None = None
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"loss '{self.name}' needs a teacher")
            if teacher.logits is not None:
                target = teacher.logits[mask]
                target = target if target.dtype in (torch.float32, torch.float64) else target.float()
            elif teacher.sparse is not None:
                target = teacher.sparse.rows(mask)
            else:
                raise ValueError(f"loss '{self.name}' needs teacher logits or top-k targets")
        return self.rows(s, target, batch.labels[mask]).sum()


class FeatureLoss(Loss):
    """A loss on mapped layers' hidden states or attention maps.

    The strategy hands over `student.hidden_states` / `teacher.hidden_states` (or `.attentions`)
    as dicts keyed by the student layer, already paired by the layer mapper and, for hidden
    states, with the student's projected to the teacher's width. Returns the sum over counted
    positions of the mean over pairs.
    """

    needs_logits = False
    uses: ClassVar[str] = "hidden"  # or "attention"


@dataclass
class LayerMap:
    """Which student layers are distilled, from which teacher layers.

    `teacher_layers[i]` is the teacher layer paired with `student_layers[i]`; a learned mapper
    instead gives every teacher layer it mixes and a trainable `mixer` module whose
    `forward(list of teacher states) -> list of targets` yields one target per student layer.
    """

    student_layers: tuple[int, ...]
    teacher_layers: tuple[int, ...]
    mixer: nn.Module | None = None

    def targets(self, teacher_states: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        states = [teacher_states[t] for t in self.teacher_layers]
        return list(self.mixer(states)) if self.mixer is not None else states


class LayerMapper(Component):
    """Pairs student layers with teacher layers; `pairs` for fixed mappings, `build` in general."""

    kind = "layer_mapper"

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        raise NotImplementedError

    def build(self, n_student: int, n_teacher: int) -> LayerMap:
        pairs = self.pairs(n_student, n_teacher)
        check_pairs(pairs, n_student, n_teacher, self.name)
        return LayerMap(tuple(s for s, _ in pairs), tuple(t for _, t in pairs))


def check_pairs(pairs, n_student: int, n_teacher: int, mapper: str) -> None:
    """Every index in range and no student layer twice, else an error naming the layer."""
    from kdistill.core.errors import KdistillError

    if not pairs:
        raise KdistillError(f"layer_mapper: '{mapper}' paired no layers")
    seen: set[int] = set()
    for s, t in pairs:
        if not 0 <= s < n_student:
            raise KdistillError(f"layer_mapper: student layer {s} is out of range (the student has layers 0-{n_student - 1})")
        if not 0 <= t < n_teacher:
            raise KdistillError(f"layer_mapper: teacher layer {t} is out of range (the teacher has layers 0-{n_teacher - 1})")
        if s in seen:
            raise KdistillError(f"layer_mapper: student layer {s} is paired twice")
        seen.add(s)


class Scheduler(Component):
    """A multiplier over training steps (the engine scales the base learning rate by it)."""

    kind = "scheduler"

    def __call__(self, step: int, total_steps: int) -> float:
        raise NotImplementedError


class Evaluator(Component):
    """Metrics of the student (and teacher) on validation data."""

    kind = "evaluator"
    provides: ClassVar[tuple[str, ...]] = ()  # metric names it reports (for train.best_metric)
    best_metric: ClassVar[str | None] = None  # which of them keeps the best model when the recipe names none
    needs_validation: ClassVar[bool] = True  # reads the data source's validation split

    def evaluate(self, context: "EvalContext") -> dict[str, float]:
        raise NotImplementedError


class Strategy(Component):
    """What one training step computes with which models.

    `setup` receives the run's models and losses; `trainable` names the modules the optimizer
    trains (and the checkpoint stores); `loss` returns the summed loss of a micro-batch and its
    per-term sums (both sums over counted positions, see Loss).
    """

    kind = "strategy"
    needs_teacher: ClassVar[bool] = True
    chain: ClassVar[bool] = False  # runs whole stages itself (`run_chain`) instead of the engine's loop
    writes_answers: ClassVar[bool] = False  # trains on answers it writes itself (on-policy): prompts alone will do
    no_lora: ClassVar[str] = ""  # why a LoRA student (student.lora) does not fit this strategy; empty: it does

    def run_chain(self, plan: Any, runner: Any, resume: bool, overwrite: bool, force: bool) -> dict[str, Any]:
        """A chain strategy's run (progressive): `runner` (the engine's StageRunner) resolves stage
        recipes, runs each as a complete run, and says what happens. Returns the run's summary."""
        raise NotImplementedError

    def setup(self, context: "TrainContext") -> None:
        self.context = context

    def trainable(self) -> Mapping[str, nn.Module]:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer groups `{"name", "params", "lr_scale"}` when models train at different learning
        rates (each group is then clipped on its own, like a separate optimizer); None: one group."""
        return None

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def prepare_batch(self, batch: Batch, index: int) -> Batch:
        """Each micro-batch of a step goes through here before the step counts its tokens: a strategy that
        trains on other text than the data's (the student's own answers, on-policy) makes it here.
        `index`: the global micro-batch index (with the process's rank, a seed that a resume repeats)."""
        return batch

    def step_metrics(self) -> dict[str, float]:
        """Counts of the step just taken (summed over processes), logged with the engine's metrics (e.g. how
        many sampled answers were empty). Every process returns the same names."""
        return {}

    def after_step(self) -> None:
        """Called after every optimizer step (an EMA teacher updates here)."""

    @classmethod
    def recipe_problems(cls, recipe: Any, components: Mapping[str, list[Any]]) -> list[str]:
        """Checked with the recipe, before anything loads: what this strategy cannot work with, one
        `field: message` each (`components`: the resolved components by recipe slot)."""
        return []


class DataSource(Component):
    """Batches of token ids and labels, addressed by index so that resume is exact."""

    kind = "data_source"

    def setup(self, tokenizer: Any, seed: int) -> None:
        raise NotImplementedError

    def train_batch(self, index: int, batch_size: int) -> Batch:
        raise NotImplementedError

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short digest of the data, for checkpoints and caches to check against."""
        raise NotImplementedError

    @classmethod
    def no_validation_split(cls, options: Options) -> str | None:
        """Checked before anything loads: the option (`field: value`) that leaves these options without a
        validation split, or None. Evaluators need one."""
        return None

    def train_keys(self) -> torch.Tensor:
        """The keys of every training sequence, each once (for caching teacher outputs).
        Optional: a source without stable keys cannot be used with a cached teacher."""
        raise NotImplementedError(f"data source '{self.name}' gives its sequences no keys, so teacher outputs cannot be cached for it")

    def batch_for_keys(self, keys: torch.Tensor) -> Batch:
        """The training sequences with these keys, as one batch (keys set)."""
        raise NotImplementedError(f"data source '{self.name}' gives its sequences no keys")

    def longest_prompt(self) -> tuple[int, str] | None:
        """The longest prompt among the training examples (tokens before the first counted one) and where
        it is (`file row N`), so a strategy that answers prompts can check before training that its
        answers fit; None where the source has no prompts or does not know them all ahead (a stream)."""
        return None


class Tracker(Component):
    """Where params, metrics and artifacts go.

    The engine calls, on the main process: `start`; `log_artifact` (the run's files) and `log_metrics`
    as the run goes; when training ended, `log_model` with the final student's folder, then
    `log_summary` with the run's result (what `summary.json` holds); `finish` always, with the status.
    `log_model` and `log_summary` have defaults (the folder as the artifact folder `model`; nothing),
    so a tracker needs only the other four.
    """

    kind = "tracker"

    def start(self, run_name: str, params: Mapping[str, Any], output_dir: str) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        raise NotImplementedError

    def log_model(self, path: str) -> None:
        """The final student: `path` is a folder `save_pretrained` wrote (weights, config, tokenizer)."""
        self.log_artifact(path, "model")

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The finished run's result, before `finish`: "before" and "after" (metric -> value), "final_model",
        "output_dir", "best", "best_metric" (summary.json's fields)."""

    def finish(self, status: str = "FINISHED") -> None:
        raise NotImplementedError


class Generator(Component):
    """Writes a dataset with the recipe's teacher before training (sequence-level distillation's data).

    `outputs` names the folders it writes: validation takes data paths inside them as made earlier,
    so a recipe names its generator's output as its data before it exists. `pending` says how much
    is left without loading the teacher (a complete output costs nothing); `generate` writes it,
    resuming an interrupted write.
    """

    kind = "generator"

    def outputs(self) -> list[str]:
        raise NotImplementedError

    def pending(self, teacher: TeacherProvider, overwrite: bool = False) -> int:
        """Prompts still to answer (0: the output is complete and matches this teacher and these options).
        Output of something else is an error unless `overwrite`. `teacher` need not be loaded."""
        raise NotImplementedError

    def generate(self, teacher: TeacherProvider, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
        """Write the outputs with a loaded teacher (`teacher.model`, `teacher.tokenizer`); returns the manifest."""
        raise NotImplementedError

    def describe(self, manifest: dict[str, Any]) -> str:
        """One line on what `generate` wrote (counts, speed), printed when it ends."""
        return f"{self.name}: wrote {', '.join(self.outputs())}"


# --------------------------------------------------------------------------- contexts


@dataclass
class TrainContext:
    """Everything a strategy may use; built by the engine."""

    student: nn.Module
    teacher: TeacherProvider | None
    losses: list[tuple[str, float, Loss]]
    needs: Needs
    layer_mapper: LayerMapper | None = None
    total_tokens: int = 1  # counted positions in the current optimizer step (set per step)
    step: int = 0  # the current optimizer step (from 0) and the run's total, for scheduled values
    total_steps: int = 1
    tokenizer: Any = None  # the student's
    rank: int = 0  # this process's rank (distributed runs)
    data: DataSource | None = None  # the run's data, set up
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalContext:
    """What an evaluator gets. `phase` is "before" (ahead of training), "during" or "final";
    `log_artifact(path, folder)` sends a file (a table, a plot) to the run's tracker. Batches read
    from `val_batches` show as progress by themselves; an evaluator that works otherwise (generating
    answers) says how far it is with `report`."""

    student: nn.Module
    teacher: TeacherProvider | None
    val_batches: Any  # a callable returning an iterator of Batch
    tokenizer: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    phase: str = "during"
    output_dir: Any = None
    log_artifact: Any = None
    progress: Any = None  # the run's progress line for this evaluator: progress(done, total, what)

    def report(self, done: int, total: int | None = None, what: str = "batches") -> None:
        """Show `done` of `total` `what` on this evaluator's progress line (nothing where none shows)."""
        if self.progress is not None:
            self.progress(done, total, what)


@dataclass(frozen=True)
class Kind:
    """One kind of component. `KINDS` is the single place that lists them: the registration hook
    specs, the registry's kinds, the recipe's slots and the generated docs pages all come from it."""

    name: str                 # the registry's kind, e.g. "data_source"
    base: type[Component]     # what a component of this kind subclasses
    hook: str                 # the registration hook plugins implement
    slot: str                 # the recipe field that names such components
    many: bool                # whether that field is a list
    title: str                # what the docs call them
    page: str                 # their generated docs page
    required: bool = False    # a recipe must have one: when it leaves the slot out, the kind's default


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("teacher", TeacherProvider, "kd_register_teachers", "teacher", False, "Teacher providers", "teachers.md"),
    Kind("loss", Loss, "kd_register_losses", "losses", True, "Losses", "losses.md"),
    Kind("layer_mapper", LayerMapper, "kd_register_layer_mappers", "layer_mapper", False, "Layer mappers", "layer-mappers.md"),
    Kind("scheduler", Scheduler, "kd_register_schedulers", "scheduler", False, "Schedulers", "schedulers.md", required=True),
    Kind("evaluator", Evaluator, "kd_register_evaluators", "evaluators", True, "Evaluators", "evaluators.md"),
    Kind("strategy", Strategy, "kd_register_strategies", "strategy", False, "Strategies", "strategies.md", required=True),
    Kind("data_source", DataSource, "kd_register_data_sources", "data", False, "Data sources", "data-sources.md"),
    Kind("tracker", Tracker, "kd_register_trackers", "tracker", False, "Trackers", "trackers.md", required=True),
    Kind("generator", Generator, "kd_register_generators", "generator", False, "Generators", "generators.md"),
)}
