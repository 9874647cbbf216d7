"""Device, seeds and (later) distributed set-up: the only place that decides where tensors live."""

from __future__ import annotations

import random

import torch

from kdistill.core.errors import KdistillError


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise KdistillError("train.device: cuda was asked for but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
