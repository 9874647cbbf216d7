"""The recipe: a static schema plus a resolve step that validates every component's options.

`resolve` reports every problem at once (static fields, unknown component names, options that a
component's own `Options` model rejects), each as one line starting with its dotted path.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import yaml
from pydantic import Field, PositiveFloat
from pydantic_core import PydanticCustomError

from kdistill.core.components import KINDS, Component, Generator
from kdistill.core.errors import ConfigError
from kdistill.core.paths import LocalFile, LocalPath, missing_inputs, output_dir_problem
from kdistill.core.registry import Entry, Registry
from kdistill.core.schedule import NUMBER, SCHEDULE, Schedule, Scheduled


class StaticModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# counts are integers, not booleans or strings that look like one (`steps: true` is not 1 step)
PositiveCount = Annotated[int, Field(strict=True, gt=0)]
Count = Annotated[int, Field(strict=True, ge=0)]


class ComponentSpec(StaticModel):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @pydantic.field_validator("options", mode="before")
    @classmethod
    def _empty_options(cls, value: Any) -> Any:
        return {} if value is None else value  # `options:` with nothing under it in YAML


class LossSpec(ComponentSpec):
    weight: Scheduled = Field(1.0, description="the loss's weight in the sum, or a schedule of it over the steps "
                              "({schedule: linear, start: 0, end: 1})")

    @pydantic.field_validator("weight")
    @classmethod
    def _not_negative(cls, value: Scheduled) -> Scheduled:
        low = value.bounds()[0] if isinstance(value, Schedule) else value
        if low < 0:  # worded as pydantic words its own bound
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 0", {"ge": 0})
        return value


class FromTeacher(StaticModel):
    """Initialise the student from teacher layers (DistilBERT-style): the ones listed, or the `keep_layers`
    most important by a measure taken on the recipe's data; optionally narrower (`heads`, `mlp`: the heads
    and MLP channels that matter most by activation on the same data). See docs/students.md."""

    layers: list[Count] | None = Field(None, min_length=1, description="the teacher layers to keep, in order")
    keep_layers: PositiveCount | None = Field(None, description="keep this many layers, the most important by `by`")
    by: Literal["block-influence", "removal-kl"] = Field(
        "block-influence", description="block-influence: 1 - cosine between a layer's input and output (ShortGPT); "
        "removal-kl: how far the teacher's output distribution moves (KL) when the layer alone is skipped")
    calibration_batches: PositiveCount = Field(4, description="training batches of the recipe's data the measure reads")
    heads: PositiveCount | None = Field(None, description="width cut: attention heads kept per layer, the most "
                                        "important by activation (a multiple of the teacher's key-value heads)")
    mlp: PositiveCount | None = Field(None, description="width cut: MLP channels kept per layer, the most important "
                                      "by activation")

    @pydantic.model_validator(mode="after")
    def _layers_or_keep(self) -> "FromTeacher":
        if (self.layers is None) == (self.keep_layers is None):
            raise ValueError("give exactly one of layers (a list) and keep_layers (a count)")
        return self


class LoraSpec(StaticModel):
    """Train LoRA adapters (peft) on the student instead of all its weights; the base stays frozen."""

    r: PositiveCount = Field(16, description="the adapters' rank")
    alpha: PositiveFloat = Field(32.0, description="scaling: the update is alpha / r times the low-rank product")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="the linear layers that get adapters, by name (or a regular expression), or all-linear")
    quantization: Literal["none", "nf4", "fp4"] = Field("none", description="QLoRA: hold the frozen base in 4 bits "
                                                        "(bitsandbytes); final/ is then merged into the 4-bit base")
    double_quant: bool = Field(True, description="4-bit base only: quantize the quantization constants too")


class StudentSpec(StaticModel):
    """Exactly one of `model` (a local folder), `config` (build fresh) or `from_teacher`."""

    model: LocalPath | None = None
    config: dict[str, Any] | LocalPath | None = None
    from_teacher: FromTeacher | None = None
    tokenizer: LocalPath | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec | None = Field(None, description="train LoRA adapters instead of the whole student (needs peft)")

    @pydantic.model_validator(mode="after")
    def _exactly_one_source(self) -> "StudentSpec":
        given = [k for k in ("model", "config", "from_teacher") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, config, from_teacher (got {', '.join(given) or 'none'})")
        return self


class TrainSpec(StaticModel):
    steps: PositiveCount
    lr: PositiveFloat = 3e-4
    batch_size: PositiveCount = 8
    grad_accum: PositiveCount = 1
    grad_clip: PositiveFloat | None = 1.0
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eval_every: Count = 0
    save_every: Count = 0
    keep_checkpoints: PositiveCount = 2
    log_every: PositiveCount = 1
    eval_batch_size: PositiveCount | None = None
    seed: int = 0
    num_threads: PositiveCount | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: Literal["none", "bfloat16"] = Field("none", description="run the training step's forward passes (student "
                                                  "and teacher) under torch.autocast in bfloat16; the loss math stays float32")
    on_nonfinite: Literal["stop", "skip"] = Field("stop", description="a NaN/inf loss or gradient norm stops the run, "
                                                   "or skips that step's update")
    max_skipped_share: float = Field(0.5, ge=0, le=1, description="with on_nonfinite: skip, a run that skips more than "
                                     "this share of its steps stops with exit code 1")
    best_metric: str | None = Field(None, description="metric to keep the best checkpoint by (lower is better); "
                                    "default: the first evaluator's own choice (perplexity's: val/student_loss)")


class DistributedSpec(StaticModel):
    """Multi-device settings: `none` (one process) or `deepspeed` (launched by `deepspeed` or `torchrun`)."""

    backend: Literal["none", "deepspeed"] = "none"
    config: dict[str, Any] | LocalFile | None = Field(None, description="DeepSpeed configuration, inline or a JSON file; "
                                                "\"auto\" values come from the recipe (default: ZeRO-2)")
    teacher: Literal["replicated", "zero3"] = Field("replicated", description="a full teacher copy per rank, or "
                                                    "its parameters partitioned over the ranks with ZeRO-3 (inference only)")
    dist_backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="torch.distributed backend "
                                                          "(auto: nccl on CUDA, gloo on CPU)")


DEFAULTED = "default: the installed {kind} marked as its kind's default (kdistill's own, unless a plugin replaces it)"


class Recipe(StaticModel):
    student: StudentSpec
    teacher: ComponentSpec | None = None
    strategy: ComponentSpec | None = Field(None, description=DEFAULTED.format(kind="strategy"))
    data: ComponentSpec
    losses: list[LossSpec] = Field(default_factory=list)
    layer_mapper: ComponentSpec | None = None
    scheduler: ComponentSpec | None = Field(None, description=DEFAULTED.format(kind="scheduler"))
    evaluators: list[ComponentSpec] = Field(default_factory=list)
    tracker: ComponentSpec | None = Field(None, description=DEFAULTED.format(kind="tracker"))
    train: TrainSpec
    output_dir: str = Field(min_length=1, description="the run's folder (created); required")
    run_name: str | None = None
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    generator: ComponentSpec | None = Field(None, description="writes a dataset with the teacher before training "
                                            "(kdistill generate RECIPE, or first thing in kdistill run)")


# slot in the recipe -> (component kind, a list of components?), in the recipe's field order
SLOTS: dict[str, tuple[str, bool]] = {kind.slot: (kind.name, kind.many)
                                      for field in Recipe.model_fields for kind in KINDS.values() if kind.slot == field}
if len(SLOTS) != len(KINDS):  # a kind without a recipe field
    raise RuntimeError(f"recipe fields missing for kinds: {sorted(set(KINDS) - {k for k, _ in SLOTS.values()})}")


@dataclass(frozen=True)
class Resolved:
    """One component of a recipe: its registry entry, validated options and (for losses) weight."""

    path: str
    entry: Entry
    options: Any
    weight: Scheduled = 1.0

    def build(self) -> Component:
        return self.entry.cls(self.options)


@dataclass(frozen=True)
class Plan:
    """A validated recipe with every named component looked up."""

    recipe: Recipe
    raw: dict[str, Any]
    components: dict[str, list[Resolved]]

    def one(self, slot: str) -> Resolved | None:
        items = self.components.get(slot) or []
        return items[0] if items else None

    def build(self, slot: str, base: type[C]) -> C | None:
        """The component in `slot`, built (None if the recipe has none): typed as its kind's base class."""
        item = self.one(slot)
        return None if item is None else _typed(item.build(), base)

    def build_all(self, slot: str, base: type[C]) -> list[C]:
        return [_typed(item.build(), base) for item in self.components.get(slot) or []]


C = TypeVar("C", bound=Component)


T = TypeVar("T")


def required(value: T | None) -> T:
    """A required slot's component: resolve() filled it (from the recipe or its kind's default)."""
    if value is None:
        raise ConfigError("recipe: a required component is missing")
    return value


def _typed(component: Component, base: type[C]) -> C:
    if not isinstance(component, base):  # the registry admits only subclasses of the kind's base
        raise TypeError(f"{component!r} is not a {base.__name__}")
    return component


# --------------------------------------------------------------------------- YAML


class _RecipeLoader(yaml.SafeLoader):
    """Safe loader that reads `1e-4` as a float (YAML 1.1 says string) and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a string or number, not a "
                                                        f"{type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# values a recipe may expand to through YAML aliases: a few hundred in practice; a "billion laughs"
# document of 1 KB expands to 10^9 and would exhaust memory in whatever walks it
MAX_EXPANDED_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values `node` stands for once every alias is expanded (shared nodes counted each time they are used)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts once (the loader rejects it anyway)
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        else:
            total = 1
        sizes[id(node)] = total
    return sizes[id(node)]


def parse_yaml(text: str, source: str = "<recipe>") -> Any:
    try:
        loader = _RecipeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_EXPANDED_VALUES:
                raise ConfigError(f"{source}: YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values; "
                                  "refusing a recipe this large")
            return loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a recipe file and apply `dotted.key=value` overrides; returns the raw mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe: {exc.__class__.__name__}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, not {type(raw).__name__}")
    return apply_overrides(raw, overrides)


_KEY_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+|\+)\]")
APPEND = "[+]"  # a key's last part `[+]` appends the value to the list: --set 'evaluators[+]={name: perplexity}'


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    pos = 0
    for match in _KEY_TOKEN.finditer(key):
        gap = key[pos:match.start()]
        if gap not in ("", "."):
            raise ConfigError(f"--set {key}: cannot parse the key")
        index = match.group(2)
        parts.append(match.group(1) if match.group(1) is not None else APPEND if index == "+" else int(index))
        pos = match.end()
    if not parts or pos != len(key):
        raise ConfigError(f"--set {key}: cannot parse the key")
    if APPEND in parts[:-1]:
        raise ConfigError(f"--set {key}: [+] appends to a list and must end the key (give the whole item: "
                          f"--set '{key[:key.index(APPEND) + 3]}={{...}}')")
    return parts


def _check_slot(node: Any, part: str | int, key: str) -> None:
    if part == APPEND:
        if not isinstance(node, list):
            field = key[:key.rindex(APPEND)] or "the recipe"
            what = "a mapping" if isinstance(node, dict) else "a string" if isinstance(node, str) else type(node).__name__
            raise ConfigError(f"--set {key}: [+] appends to a list, and {field} is {what}, not a list")
    elif isinstance(part, int):
        if not isinstance(node, list) or part >= len(node):
            raise ConfigError(f"--set {key}: index [{part}] is out of range")
    elif not isinstance(node, dict):
        raise ConfigError(f"--set {key}: '{part}' is not inside a mapping")


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `losses[0].options.temperature=3` style overrides; values are parsed as YAML. A key ending
    in `[+]` appends the value to that list (made if the field is absent): `losses[+]={name: tvd}`."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        parts = _split_key(key)
        value = parse_yaml(text, f"--set {key}")
        node: Any = raw
        for part, nxt in zip(parts[:-1], parts[1:]):
            _check_slot(node, part, key)
            if isinstance(part, str) and node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) or nxt == APPEND else {}
            node = node[part]
        last = parts[-1]
        _check_slot(node, last, key)
        if last == APPEND:
            node.append(value)
        else:
            node[last] = value
    return raw


# --------------------------------------------------------------------------- resolve


def dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        if part in (NUMBER, SCHEDULE):  # which branch of a number-or-schedule field the value took
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_\-]+", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"  # a key with spaces or control characters stays readable and on one line
    return out or "recipe"


def _short(value: Any, limit: int = 120) -> str:
    """repr() of a value, cut to `limit` characters: an error line never renders a huge value."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)  # bounded: aliases cannot expand a recipe past MAX_EXPANDED_VALUES
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(error: Any, prefix: tuple[Any, ...], fields: list[str]) -> str:
    loc = prefix + tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1]) if error["loc"] else ""
        msg = "unknown field"
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        if fields:
            msg += f"{'' if close else '.'} Known: {', '.join(fields)}"
        return f"{dotted(loc)}: {msg}"
    if error["type"] == "missing":
        return f"{dotted(loc)}: required field is missing"
    if "input" in error and not isinstance(error.get("input"), dict):
        return f"{dotted(loc)}: {error['msg']} (got {_short(error.get('input'))})"
    return f"{dotted(loc)}: {error['msg']}"


def _model_fields(model: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) static model at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        for a in list(candidates):
            candidates += [x for x in getattr(a, "__args__", ()) if isinstance(x, type)]
        nested = [a for a in candidates if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(getattr(current, "model_fields", {}))


def resolve(raw: Any, registry: Registry, check_inputs: bool = True, made_earlier: tuple[str, ...] = ()) -> Plan:
    """Validate a raw recipe against the schema and the installed components; all problems at once.
    `check_inputs`: also check that the local files it names exist and that output_dir can be written,
    except in the sections `made_earlier` (a progressive stage's teacher is made by the stage before)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe: must be a mapping of sections, not {type(raw).__name__}")
    problems: list[str] = []
    deferred: list[str] = []  # option problems the components' own models normally report
    recipe: Recipe | None = None
    given, raw = raw, _with_defaults(raw, registry, problems)
    try:
        recipe = Recipe.model_validate(raw)
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if len(loc) >= 2 and loc[0] in SLOTS and "options" in loc:
                deferred.append(_describe(err, (), []))
                continue  # options are checked against the component's own model below
            fields = _model_fields(Recipe, loc[:-1]) if err["type"] == "extra_forbidden" else []
            problems.append(_describe(err, (), fields))

    components: dict[str, list[Resolved]] = {}
    for slot, (kind, many) in SLOTS.items():
        value = raw.get(slot, None)
        if value is None:
            continue
        items = value if many else [value]
        if many and not isinstance(value, list):
            continue  # the static check reported it
        resolved: list[Resolved] = []
        for i, item in enumerate(items):
            path = f"{slot}[{i}]" if many else slot
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue  # reported by the static check
            entry = registry.find(kind, item["name"])
            if entry is None:
                problems.append(f"{path}.name: {registry.unknown_message(kind, item['name'])}")
                continue
            opts = item.get("options") or {}
            if not isinstance(opts, dict):
                continue  # reported by the static check
            try:
                options = entry.cls.Options.model_validate(opts)
            except pydantic.ValidationError as exc:
                fields = list(entry.cls.Options.model_fields)
                for err in exc.errors():
                    where = (slot, i, "options") if many else (slot, "options")
                    problems.append(f"{_describe(err, where, fields)} [{kind.replace('_', ' ')} '{entry.name}' from {entry.source}]")
                continue
            resolved.append(Resolved(path, entry, options, _weight(item.get("weight", 1.0))))
        components[slot] = resolved

    if recipe is not None and not problems:
        problems += _cross_checks(recipe, components)
    if recipe is not None and not problems and check_inputs:
        problems += _input_checks(recipe, {slot: items for slot, items in components.items() if slot not in made_earlier})
    if recipe is None and not problems:
        problems = deferred
    if problems:
        raise ConfigError(problems)
    assert recipe is not None  # validated: no problems left
    return Plan(recipe=recipe, raw=copy.deepcopy(given), components=components)


def _input_checks(recipe: Recipe, components: dict[str, list[Resolved]]) -> list[str]:
    """The local inputs a recipe names exist, and its output folder can be made: found before anything loads."""
    problems = missing_inputs(recipe.student, "student") + missing_inputs(recipe.distributed, "distributed")
    made = [folder for item in components.get("generator", []) for folder in _typed(item.build(), Generator).outputs()]
    for items in components.values():
        for item in items:  # inputs inside a generator's output are made before the data are read
            problems += missing_inputs(item.options, f"{item.path}.options", made)
    if isinstance(recipe.student.config, dict):  # built on the meta device: no memory, no weights
        from kdistill.core.models import model_from_config

        try:
            model_from_config(recipe.student.config, device="meta")
        except ConfigError as exc:
            problems += exc.problems
    output = output_dir_problem(recipe.output_dir)
    return problems + ([output] if output else [])


def _weight(value: Any) -> Scheduled:
    """A loss weight as written (a number or a schedule); a malformed one was reported by the static check."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return Schedule.model_validate(value)
    except pydantic.ValidationError:
        return 1.0


def _with_defaults(raw: dict, registry: Registry, problems: list[str]) -> dict:
    """The recipe with each required slot it leaves out filled by its kind's default component
    (`is_default`, declared by the component, so core names none)."""
    filled = dict(raw)
    for kind in KINDS.values():
        if kind.required and filled.get(kind.slot) is None:
            default = registry.default(kind.name)
            if default is None:
                problems.append(f"{kind.slot}: required (no installed {kind.name.replace('_', ' ')} is marked as the default)")
            else:
                filled[kind.slot] = {"name": default.name}
    return filled


def _cross_checks(recipe: Recipe, components: dict[str, list[Resolved]]) -> list[str]:
    problems = []
    if recipe.distributed.backend == "deepspeed" and recipe.train.on_nonfinite == "skip":
        problems.append("train.on_nonfinite: 'skip' is not available with distributed.backend deepspeed "
                        "(DeepSpeed's own loss scaler skips overflowing fp16 steps)")
    weights = [item.weight for item in components.get("losses", [])]
    if weights and all((w.bounds()[1] if isinstance(w, Schedule) else w) == 0 for w in weights):
        problems.append("losses: every loss has weight 0; nothing would train")
    data, evaluators = components.get("data") or [], components.get("evaluators") or []
    needing = [e.entry.name for e in evaluators if e.entry.cls.needs_validation]
    no_split = data[0].entry.cls.no_validation_split(data[0].options) if data else None
    if needing and no_split:
        problems.append(f"{no_split} leaves no validation split, which evaluator{'s' if len(needing) > 1 else ''} "
                        f"{', '.join(repr(n) for n in needing)} need{'' if len(needing) > 1 else 's'}")
    strategy = components["strategy"][0]
    problems += strategy.entry.cls.recipe_problems(recipe, components)
    if recipe.student.lora is not None and strategy.entry.cls.no_lora:
        problems.append(f"student.lora: not with strategy '{strategy.entry.name}': {strategy.entry.cls.no_lora}")
    if recipe.student.lora is not None and recipe.distributed.backend == "deepspeed":
        problems.append("student.lora: not available with distributed.backend deepspeed (train the adapters in one process or with ddp)")
    if data and getattr(data[0].options, "format", None) == "prompt" and not strategy.entry.cls.writes_answers:
        problems.append(f"data.options.format: prompts alone leave strategy '{strategy.entry.name}' nothing to learn; "
                        "give answers too, or use a strategy that writes them (on-policy)")
    has_teacher = bool(components.get("teacher"))
    if strategy.entry.cls.needs_teacher and not has_teacher:
        problems.append(f"teacher: strategy '{strategy.entry.name}' needs a teacher; add a teacher section")
    for item in components.get("losses", []):
        if item.entry.cls.needs_teacher and not has_teacher and strategy.entry.cls.needs_teacher:
            problems.append(f"{item.path}.name: loss '{item.entry.name}' needs a teacher")
    if not components.get("losses"):
        problems.append("losses: give at least one loss")
    from kdistill.core.components import FeatureLoss

    feature = [item for item in components.get("losses", []) if issubclass(item.entry.cls, FeatureLoss)]
    if feature and not components.get("layer_mapper"):
        problems.append(f"layer_mapper: loss '{feature[0].entry.name}' needs a layer_mapper (installed: "
                        "see `kdistill plugins`, e.g. {name: uniform})")
    best = recipe.train.best_metric
    if best is not None and not any(best in e.entry.cls.provides for e in components.get("evaluators", [])):
        problems.append(f"train.best_metric: no evaluator of this recipe reports '{best}'")
    if components.get("generator") and not has_teacher:
        problems.append("generator: needs a teacher section (the teacher writes the answers)")
    if recipe.student.from_teacher is not None and not has_teacher:
        problems.append("student.from_teacher: needs a teacher section to copy layers from")
    return problems
