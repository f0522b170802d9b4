"""Curves of a run drawn into the run folder (loss, learning rate, evaluation).
"""

from __future__ import annotations

import os
from pathlib import Path


def plot_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """PNG of train loss, eval loss and learning rate against step; None when nothing was logged."""
    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "o" if len(steps) < 30 else None  # a few points must still show
    ax1.plot(steps, [h["loss"] for h in log_history if "loss" in h], marker=marker, label="train loss")
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if ev:
        ax1.plot(*zip(*ev), "o-", label="eval loss (token-weighted)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    lr = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    if lr:
        ax2.plot(*zip(*lr), color="tab:orange", marker=marker)
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
