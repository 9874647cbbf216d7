"""Execution backends: one process, or DeepSpeed across processes, behind one interface.

The engine's loop calls only these methods, so it has no branch on how it is executed: which rows
of a global batch this process reads, how a micro-batch's loss goes backward, how gradients are
clipped and applied, how models and checkpoints are saved and restored, and the collectives that
keep processes in step (no-ops in one process).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdistill.core import checkpoint as ckpt
from kdistill.core.components import Batch
from kdistill.core.errors import KdistillError, RunFailed
from kdistill.core.runtime import pick_device


class SingleProcess:
    """Everything in this process, on one device."""

    is_main = True
    rank = 0
    world_size = 1
    update_pending = True  # gradients wait for `update`, so a non-finite norm can still be refused
    falls_back = True  # a corrupt newest checkpoint: resume from the one before

    def __init__(self, train):
        self.device = pick_device(train.device)

    def prepare(self, teacher, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                micro_batch: int) -> torch.optim.Optimizer:
        return optimizer

    def micro_batch(self, data, index: int, batch_size: int) -> Batch:
        return data.train_batch(index, batch_size).to(self.device)

    def all_sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def agree(self, ok: bool) -> bool:
        return ok

    def barrier(self) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_gradients(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> float | None:
        """Each parameter group clipped on its own (one group: the usual global clipping); returns the global
        norm, measured whether or not clipping is on, so a non-finite gradient never reaches the weights."""
        limit = math.inf if grad_clip is None else grad_clip
        norms = [float(torch.nn.utils.clip_grad_norm_(g["params"], limit)) for g in optimizer.param_groups]
        return math.sqrt(sum(n * n for n in norms))

    def non_finite(self, modules: Mapping[str, nn.Module]) -> str | None:
        """The first parameter that is NaN or infinite (`module.name`), or None."""
        return first_non_finite(modules)

    def update(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            optimizer.step()
        except RuntimeError as exc:  # torch's optimizers cast the learning rate to the weights' dtype
            if "overflow" not in str(exc):
                raise
            raise RunFailed(f"the optimizer overflowed at learning rate {optimizer.param_groups[0]['lr']:g} "
                            f"(train.lr too large for the weights' dtype): {str(exc).splitlines()[0]}; "
                            "stopping before it reaches the weights (last checkpoint kept)") from None
        optimizer.zero_grad(set_to_none=True)

    def save_student(self, student: nn.Module, tokenizer, target: Path) -> None:
        refuse_non_finite({"student": student}, target)
        ckpt.atomic_save_pretrained(student, tokenizer, target)

    def save_checkpoint(self, root: Path, step: int, modules, optimizer, state: Mapping[str, Any], keep: int) -> None:
        refuse_non_finite(modules, root / f"{ckpt.PREFIX}{step:08d}")
        ckpt.save_checkpoint(root, step, modules, optimizer, state, keep)

    def load_checkpoint(self, path: Path, modules, optimizer) -> dict[str, Any]:
        return ckpt.load_checkpoint(path, modules, optimizer)

    def result_fields(self) -> dict[str, Any]:
        return {}


class DeepSpeed:
    """DeepSpeed's engine for the trained modules (ZeRO 1-3), optionally a ZeRO-3 inference teacher;
    this rank reads its own rows of each global batch; only rank 0 writes models and run files."""

    update_pending = False  # DeepSpeed steps inside `backward` at the accumulation boundary
    falls_back = False  # every rank's shards load as one checkpoint or not at all

    def __init__(self, spec, train):
        from kdistill.core.distributed import DeepSpeedRun

        self.run = DeepSpeedRun(spec, train)
        self.device, self.rank, self.world_size = self.run.device, self.run.rank, self.run.world_size
        self.is_main = self.run.is_main
        self._grad_norm: float | None = None

    def prepare(self, teacher, modules, optimizer, micro_batch: int) -> torch.optim.Optimizer:
        if teacher is not None and teacher.model is not None and getattr(teacher, "runs_forward", True):
            teacher.model = self.run.wrap_teacher(teacher.model, micro_batch)
        self.run.wrap_student(modules, optimizer)
        return self.run.optimizer

    def micro_batch(self, data, index: int, batch_size: int) -> Batch:
        whole = data.train_batch(index, batch_size * self.world_size)
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return whole.rows(rows).to(self.device)

    def all_sum(self, values: list[float]) -> list[float]:
        return self.run.all_sum(values)

    def agree(self, ok: bool) -> bool:
        return self.run.agree(ok)

    def barrier(self) -> None:
        self.run.barrier()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; each rank's loss is its share of the global mean
        self.run.backward(loss * self.world_size)
        self._grad_norm = self.run.step()

    def clip_gradients(self, optimizer, grad_clip: float | None) -> float | None:
        return self._grad_norm if grad_clip is not None else None  # DeepSpeed clips (gradient_clipping)

    def non_finite(self, modules) -> str | None:
        return None  # partitioned under ZeRO; DeepSpeed's own loss scaler guards fp16 overflow

    def update(self, optimizer) -> None:
        pass

    def save_student(self, student: nn.Module, tokenizer, target: Path) -> None:
        """save_pretrained on rank 0, with ZeRO-3's partitioned parameters gathered first."""
        with self.run.gathered(student):
            if self.is_main:
                ckpt.atomic_save_pretrained(student, tokenizer, target)
        self.barrier()

    def save_checkpoint(self, root: Path, step: int, modules, optimizer, state: Mapping[str, Any], keep: int) -> None:
        # DeepSpeed writes each rank's shards; once every rank is done, rank 0 marks the folder complete
        tag = f"{ckpt.PREFIX}{step:08d}"
        self.run.save(root, tag, state)
        self.barrier()
        if self.is_main:
            ckpt.mark_complete(root / tag, step)
            ckpt.prune(root, keep)
        self.barrier()

    def load_checkpoint(self, path: Path, modules, optimizer) -> dict[str, Any]:
        """Every rank hashes its share of the folder's files against the marker (the work is split, the
        verdict shared); a mismatch anywhere stops every rank before DeepSpeed reads anything."""
        reason = ckpt.verify_contents(path, self.rank, self.world_size)
        if not self.agree(reason is None):
            raise KdistillError(reason or f"{path}: a file's content does not match what was saved "
                                          "(found by another process)")
        return self.run.load(path.parent, path.name)

    def result_fields(self) -> dict[str, Any]:
        return {"world_size": self.world_size}  # ranks read different rows of each batch


def first_non_finite(modules: Mapping[str, nn.Module]) -> str | None:
    """One reduction over every parameter (one device sync); names the first bad one only when there is one."""
    params = [(f"{prefix}.{name}", param) for prefix, module in modules.items() for name, param in module.named_parameters()]
    if not params:
        return None
    finite = torch.stack([torch.isfinite(param).all().to(params[0][1].device) for _, param in params])
    if bool(finite.all()):
        return None
    return params[int((~finite).nonzero()[0, 0])][0]


def refuse_non_finite(modules: Mapping[str, nn.Module], target: Path) -> None:
    """Nothing non-finite is ever written: a checkpoint, best/ or final/ with NaN weights would poison every resume."""
    bad = first_non_finite(modules)
    if bad is not None:
        raise RunFailed(f"{target}: not written, parameter {bad} is not finite")


def make_backend(distributed, train) -> SingleProcess | DeepSpeed:
    return DeepSpeed(distributed, train) if distributed.backend == "deepspeed" else SingleProcess(train)
