"""Conformance checks a plugin author runs on a component class.

    from kdistill.testing import check_component
    def test_my_loss():
        check_component(MyLoss, plugin=my_plugin_module)

Each check raises AssertionError with a sentence saying what to fix.
"""

from __future__ import annotations

import re
from types import ModuleType

import pydantic
import torch

from kdistill.core.components import KINDS, Batch, Component, LogitLoss, Loss, ModelOutputs
from kdistill.core.components import Options as BaseOptions

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*$")


def kind_of(cls: type) -> str:
    for kind, declared in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, declared.base):
            return kind
    raise AssertionError(f"{cls!r} subclasses none of the component base classes ({', '.join(k.base.__name__ for k in KINDS.values())})")


def check_declares_name(cls: type[Component]) -> None:
    name = cls.__dict__.get("name")
    assert isinstance(name, str) and name, f"{cls.__qualname__} must declare `name` (a non-empty str) in its own body"
    assert NAME_PATTERN.match(name), f"{cls.__qualname__}.name {name!r} should be lower-case words joined by '-'"


def check_options(cls: type[Component]) -> None:
    options = cls.Options
    assert isinstance(options, type) and issubclass(options, BaseOptions), \
        f"{cls.__qualname__}.Options must subclass kdistill.Options"
    fields = options.model_fields
    required = {k: f for k, f in fields.items() if f.is_required()}
    try:
        options.model_validate({"__no_such_option__": 1, **{k: None for k in required}})
    except pydantic.ValidationError as exc:
        assert any(e["type"] == "extra_forbidden" for e in exc.errors()), \
            f"{cls.__qualname__}.Options must reject unknown fields (extra='forbid')"
    else:
        raise AssertionError(f"{cls.__qualname__}.Options accepted an unknown field")
    assert options.model_config.get("frozen") is True, f"{cls.__qualname__}.Options must be frozen"
    if not required:
        component = cls(options())
        assert component.options == options(), f"{cls.__qualname__}.__init__ must keep its options as `self.options`"


def check_registers(cls: type[Component], plugin: ModuleType | object, plugin_name: str = "plugin-under-test") -> None:
    """The plugin's registration hook returns `cls` and a registry built with it finds it by name."""
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    pm = make_plugin_manager(extra_plugins=[(plugin_name, plugin)], load_entry_points=False)
    registry = Registry.from_plugins(pm)
    entry = registry.find(kind_of(cls), cls.name)
    assert entry is not None, f"plugin {plugin_name!r} does not register {cls.__qualname__} through {KINDS[kind_of(cls)].hook}"
    assert entry.cls is cls and entry.plugin == plugin_name


def check_loss(cls: type[Loss], options: BaseOptions | None = None, vocab: int = 11, seed: int = 0) -> None:
    """A loss returns a finite scalar sum that ignores padded positions and is 0 for all-padding."""
    gen = torch.Generator().manual_seed(seed)
    loss = cls(options)
    b, s = 2, 5
    student = torch.randn(b, s, vocab, generator=gen, requires_grad=True)
    teacher = torch.randn(b, s, vocab, generator=gen)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    labels[1, 3:] = -100
    batch = Batch(input_ids=labels.clamp(min=0), labels=labels)
    value = loss(ModelOutputs(logits=student), ModelOutputs(logits=teacher), batch)
    assert value.dim() == 0 and torch.isfinite(value), f"{cls.name} must return a finite scalar, got {value}"
    value.backward()
    assert torch.isfinite(student.grad).all(), f"{cls.name}: gradient is not finite"
    assert student.grad[1, 3:].abs().max() == 0, f"{cls.name}: padded positions must get no gradient"
    # changing padded positions changes nothing
    student2 = student.detach().clone()
    student2[1, 3:] += 100.0
    value2 = loss(ModelOutputs(logits=student2), ModelOutputs(logits=teacher), batch)
    assert torch.allclose(value.detach(), value2, rtol=1e-5, atol=1e-5), f"{cls.name}: padded positions changed the loss"
    empty = Batch(input_ids=labels.clamp(min=0), labels=torch.full_like(labels, -100))
    zero = loss(ModelOutputs(logits=student.detach()), ModelOutputs(logits=teacher), empty)
    assert float(zero) == 0.0, f"{cls.name}: an all-padding batch must give 0, got {float(zero)}"


def check_carried_cross_entropy(cls: type[LogitLoss], options: BaseOptions | None = None, vocab: int = 11,
                                seed: int = 0) -> None:
    """A loss that `carries_cross_entropy` gives, from rows_and_grad_with_ce, its own rows_and_grad's rows, the
    cross-entropy's rows and its own gradient plus ce_scale x the cross-entropy's (float64, dense teacher)."""
    gen = torch.Generator().manual_seed(seed)
    loss = cls(options)
    student = torch.randn(6, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(6, vocab, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (6,), generator=gen)
    ce_scale = 0.7
    own, ce, grad = loss.rows_and_grad_with_ce(student.clone(), teacher.clone(), labels, ce_scale)
    own_alone, grad_alone = loss.rows_and_grad(student.clone(), teacher.clone(), labels)
    leaf = student.clone().requires_grad_(True)
    ce_alone = torch.nn.functional.cross_entropy(leaf, labels, reduction="none")
    (ce_grad,) = torch.autograd.grad(ce_alone.sum(), leaf)
    assert torch.allclose(own, own_alone, rtol=1e-9, atol=1e-12), \
        f"{cls.name}: rows_and_grad_with_ce must return the loss's own rows first, as rows_and_grad does"
    assert torch.allclose(ce, ce_alone.detach(), rtol=1e-9, atol=1e-12), \
        f"{cls.name}: rows_and_grad_with_ce's second result must be the cross-entropy's rows"
    assert torch.allclose(grad, grad_alone + ce_scale * ce_grad, rtol=1e-9, atol=1e-12), \
        f"{cls.name}: rows_and_grad_with_ce's gradient must be the loss's own plus ce_scale x the cross-entropy's"


def check_component(cls: type[Component], plugin: ModuleType | object | None = None) -> None:
    """Run every check that applies to `cls` (registration only when `plugin` is given)."""
    kind_of(cls)
    check_declares_name(cls)
    check_options(cls)
    if plugin is not None:
        check_registers(cls, plugin)
    if issubclass(cls, Loss) and not [f for f in cls.Options.model_fields.values() if f.is_required()]:
        check_loss(cls)
        if issubclass(cls, LogitLoss) and cls.carries_cross_entropy:
            check_carried_cross_entropy(cls)
