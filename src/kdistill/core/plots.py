"""Headless matplotlib figures for runs, sweeps and analyses (PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(history: Sequence[tuple[int, Mapping[str, float]]], path: Path) -> Path | None:
    """One line per training loss term (train/loss and each train/<loss name>) over steps."""
    keys = sorted({k for _, m in history for k in m if k.startswith("train/") and k not in
                   ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/flops_per_s", "train/step_s")})
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(s, m[key]) for s, m in history if key in m]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key.removeprefix("train/"), linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per counted token")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def sweep_plot(key: str, values: Sequence[float], scores: Sequence[float], metric: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(values, scores, marker="o")
    best = min(range(len(scores)), key=lambda i: scores[i])
    ax.scatter([values[best]], [scores[best]], color="red", zorder=3, label=f"best: {values[best]:g}")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def histogram(values: Sequence[float], xlabel: str, title: str, path: Path, bins: int = 40) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("positions")
    ax.set_title(title)
    return _save(plt, fig, path)


def bars(labels: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], vals, width=width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel(ylabel)
    ax.legend()
    return _save(plt, fig, path)
