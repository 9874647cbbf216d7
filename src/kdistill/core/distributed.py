"""DeepSpeed for the student (ZeRO 1-3) and, for a large teacher, ZeRO-3 inference partitioning.

Launched by DeepSpeed's or torch's own launchers around `kdistill run` (`deepspeed --num_gpus N`,
`torchrun --nproc_per_node N`, multi-node with a hostfile); a recipe with `distributed.backend:
deepspeed` also runs as a single process. Every rank builds the same models and data; rank r reads
rows r*B..(r+1)*B-1 of each global batch of B*W sequences, so ranks never overlap and W processes
at batch size B equal one process at batch size W*B. Only rank 0 writes metrics, models and the
run's files; checkpoints go through DeepSpeed's own `save_checkpoint` / `load_checkpoint`.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kdistill.core.errors import ConfigError, KdistillError

AUTO = "auto"


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_config(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The DeepSpeed configuration: inline, a JSON file, or ZeRO-2 by default."""
    if value is None:
        return {"zero_optimization": {"stage": 2}}
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"distributed.config: no such file: {value}")
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"distributed.config: {value} is not JSON: {exc}") from None
    return json.loads(json.dumps(dict(value)))


def fill_auto(config: dict[str, Any], train, world_size: int, bf16_ok: bool) -> dict[str, Any]:
    """Replace "auto" (or missing) values with the recipe's own settings, so there is one source of truth.

    A value the user wrote must agree with the recipe; a disagreement is an error naming both.
    """
    wanted = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip if train.grad_clip is not None else 0.0,
    }
    for key, value in wanted.items():
        given = config.get(key, AUTO)
        if given != AUTO and given != value:
            raise ConfigError(f"distributed.config.{key}: {given!r} disagrees with the recipe ({value!r}); "
                              "write \"auto\" or leave it out")
        config[key] = value
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        for key, value in (("lr", train.lr), ("betas", list(train.betas)), ("weight_decay", train.weight_decay)):
            if params.get(key, AUTO) == AUTO:
                params[key] = value
    if "scheduler" in config:
        raise ConfigError("distributed.config.scheduler: the recipe's scheduler sets the learning rate; remove this section")
    for precision in ("bf16", "fp16"):
        section = config.get(precision)
        if isinstance(section, dict) and section.get("enabled") == AUTO:
            section["enabled"] = bf16_ok if precision == "bf16" else False
    config.setdefault("steps_per_print", 1 << 30)  # our progress bar reports; DeepSpeed's log lines would not
    config.setdefault("wall_clock_breakdown", False)
    return config


def teacher_config(student_config: Mapping[str, Any], micro_batch: int) -> dict[str, Any]:
    """ZeRO-3 for inference: parameters partitioned across ranks, no optimizer state at all."""
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro_batch, "zero_optimization": {"stage": 3},
                              "steps_per_print": 1 << 30}
    for precision in ("bf16", "fp16"):
        if isinstance(student_config.get(precision), dict):
            config[precision] = {"enabled": bool(student_config[precision].get("enabled"))}
    return config


class DeepSpeedRun:
    """The process group, the student's DeepSpeed engine and the collective operations the engine needs."""

    def __init__(self, spec, train):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
        try:
            import logging

            import deepspeed

            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        except ImportError:
            raise ConfigError("distributed.backend: deepspeed is not installed (pip install 'kdistill[deepspeed]')") from None
        self.deepspeed = deepspeed
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        cuda = torch.cuda.is_available() and train.device != "cpu"
        backend = spec.dist_backend if spec.dist_backend != AUTO else ("nccl" if cuda else "gloo")
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
        self.config = fill_auto(read_config(spec.config), train, self.world_size, bf16_ok)
        self.zero_stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.spec = spec

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ models

    def wrap_teacher(self, teacher_model: nn.Module, micro_batch: int) -> nn.Module:
        """Partition a frozen teacher with ZeRO-3 for inference (spec.teacher == "zero3"), else keep a replica."""
        if self.spec.teacher != "zero3":
            return teacher_model
        engine, *_ = self.deepspeed.initialize(model=teacher_model, config=teacher_config(self.config, micro_batch))
        engine.module.eval()
        return engine.module

    def wrap_student(self, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None):
        """One DeepSpeed engine over every trained module (the student, and a strategy's extras)."""
        self.trained = nn.ModuleDict(dict(modules))
        params = [p for p in self.trained.parameters() if p.requires_grad]
        given = None if "optimizer" in self.config else optimizer
        self.engine, self.optimizer, _, _ = self.deepspeed.initialize(model=self.trained, optimizer=given,
                                                                      model_parameters=params, config=self.config)
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # the loss is already scaled for accumulation and ranks (see backends.DeepSpeed.backward)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float | None:
        """Called after every micro-batch; DeepSpeed steps at the accumulation boundary."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ------------------------------------------------------------------ collectives

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def agree(self, ok: bool) -> bool:
        """True on every rank only if `ok` on every rank (a rank that fails makes all stop)."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        torch.distributed.all_reduce(flag)
        return flag.item() == 0.0

    # ------------------------------------------------------------------ checkpoints

    def save(self, root: Path, tag: str, state: Mapping[str, Any]) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"kdistill": dict(state)})

    def load(self, root: Path, tag: str) -> dict[str, Any]:
        try:
            path, client = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        except Exception as exc:  # noqa: BLE001 - DeepSpeed asserts or raises on missing or broken files
            why = str(exc).splitlines()[0] if str(exc) else "its files are missing or unreadable"
            raise KdistillError(f"--resume: DeepSpeed could not load the checkpoint {root / tag} "
                                f"({type(exc).__name__}: {why})") from None
        if path is None:  # DeepSpeed alone would carry on from scratch
            raise KdistillError(f"--resume: DeepSpeed found no checkpoint {root / tag}")
        return dict(client["kdistill"])

    def gathered(self, module: nn.Module):
        """A context in which `module`'s parameters are whole on every rank (ZeRO-3 partitions them)."""
        import contextlib

        if self.zero_stage < 3:
            return contextlib.nullcontext()
        return self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
