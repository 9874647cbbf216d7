"""A recipe's generator run: `kdistill generate` and, when its output is not complete, `kdistill run` first.

One code path for both, so a run trains on exactly what `kdistill generate` would have written.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kdistill.core.components import Generator, TeacherProvider
from kdistill.core.config import Plan
from kdistill.core.errors import ConfigError


def run_generator(plan: Plan, teacher: TeacherProvider | None, device: torch.device, say: Callable[[str], Any], *,
                  first: bool = False, progress: bool = True, overwrite: bool = False) -> dict[str, Any] | None:
    """Write the recipe generator's output with `teacher` (loaded here on `device` if it is not yet) unless it
    is complete; returns the manifest written, or None when there was nothing to do. `first`: ahead of training."""
    generator = plan.build("generator", Generator)
    if generator is None:
        if first:
            return None
        raise ConfigError("generator: the recipe has no generator section (e.g. {name: teacher-answers, options: "
                          "{prompts: [...], output: ...}})")
    if teacher is None:
        raise ConfigError("generator: needs a teacher section (the teacher writes the answers)")
    where = ", ".join(generator.outputs())
    left = generator.pending(teacher, overwrite)
    if left == 0:
        if not first:
            say(f"{where}: complete; nothing to do")
        return None
    if teacher.model is None:
        teacher.load(device)
    if teacher.model is None or teacher.tokenizer is None:
        raise ConfigError(f"generator: teacher '{teacher.name}' has no model to generate with; use the hf teacher")
    say(f"the teacher is writing answers to {left} prompts{' first' if first else ''} ({where})")
    manifest = generator.generate(teacher, progress=progress, overwrite=overwrite)
    say(generator.describe(manifest))
    return manifest
