"""Values that follow a schedule over the optimizer steps: loss weights and temperatures.

A recipe writes a number, or `{schedule: linear, start: 4.0, end: 1.0}` (also `cosine`, and
`constant` with `start` only); `value_at(v, step, total)` is its value at `step` of `total`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import Discriminator, Field, Tag


class Schedule(pydantic.BaseModel):
    """A value from `start` (step 0) to `end` (the last step): linearly, or along a half cosine."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["constant", "linear", "cosine"] = Field(description="how the value moves from start to end")
    start: float = Field(description="the value at the first step")
    end: float | None = Field(None, description="the value at the last step (required unless constant)")

    @pydantic.model_validator(mode="after")
    def _end_given(self) -> "Schedule":
        if self.schedule != "constant" and self.end is None:
            raise ValueError(f"a {self.schedule} schedule needs `end`")
        if self.schedule == "constant" and self.end is not None and self.end != self.start:
            raise ValueError("a constant schedule has no `end` different from `start`")
        return self

    def at(self, step: int, total: int) -> float:
        if self.schedule == "constant" or self.end is None:
            return self.start
        progress = min(max(step / max(total - 1, 1), 0.0), 1.0)
        if self.schedule == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    def bounds(self) -> tuple[float, float]:
        ends = (self.start, self.start if self.end is None else self.end)
        return min(ends), max(ends)


# the union's branches, as they appear in a validation error's location (dropped when it is reported)
NUMBER, SCHEDULE = "<number>", "<schedule>"


def _branch(value: Any) -> str:
    return SCHEDULE if isinstance(value, (dict, Schedule)) else NUMBER


# a number, or a mapping read as a Schedule: an error names only the branch the value took
Scheduled = Annotated[Union[Annotated[float, Tag(NUMBER)], Annotated[Schedule, Tag(SCHEDULE)]], Discriminator(_branch)]


def value_at(value: Scheduled, step: int, total: int) -> float:
    return value.at(step, total) if isinstance(value, Schedule) else float(value)


def is_scheduled(value: Any) -> bool:
    return isinstance(value, Schedule) and value.schedule != "constant"


def apply_schedules(losses: list, weights: list[Scheduled], step: int, total: int) -> dict[str, float]:
    """Before optimizer step `step`: each loss's weight (in the `losses` list the strategy reads,
    replaced in place) and its scheduled options take this step's value. Returns what is scheduled,
    as metrics (`schedule/NAME.weight`, `schedule/NAME.temperature`)."""
    metrics: dict[str, float] = {}
    for i, ((name, _, loss), weight) in enumerate(zip(losses, weights)):
        loss.at_step(step, total)
        losses[i] = (name, value_at(weight, step, total), loss)
        if is_scheduled(weight):
            metrics[f"schedule/{name}.weight"] = losses[i][1]
        if is_scheduled(getattr(loss.options, "temperature", None)):
            metrics[f"schedule/{name}.temperature"] = loss.temperature
    return metrics
