"""Curves of a run drawn into the run folder (loss, learning rate, evaluation; DPO's preference curves).
"""

from __future__ import annotations

from pathlib import Path

from .fileio import write_atomic


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
    return _save(fig, path)


def plot_dpo_curves(log_history: list[dict], path: str | Path, before: float | None = None,
                    after: float | None = None) -> list[str]:
    """PNG of a DPO run's curves: loss, reward margins, chosen/rejected log-probs, preference accuracy (train and
    eval, plus the held-out accuracy before and after). Returns the names of the series drawn ([] = no PNG)."""
    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    marker = "o" if len(steps) < 30 else None
    drawn: list[str] = []

    def series(ax, key: str, label: str, style: str = "-") -> None:
        points = [(h["step"], h[key]) for h in log_history if key in h]
        if points:
            ax.plot(*zip(*points), style, marker=marker if style == "-" else "o", label=label)
            drawn.append(key)

    panels = [("DPO loss", [("loss", "train"), ("eval_loss", "eval")]),
              ("reward margin (chosen - rejected)", [("rewards/margins", "train"),
                                                      ("eval_rewards/margins", "eval")]),
              ("answer log-prob (summed)", [("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
                                            ("eval_logps/chosen", "eval chosen"),
                                            ("eval_logps/rejected", "eval rejected")]),
              ("preference accuracy", [("rewards/accuracies", "train (reward > reference's)"),
                                       ("eval_rewards/accuracies", "eval (reward > reference's)")])]
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, label in keys:
            series(ax, key, label, "-" if not key.startswith("eval_") else "--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    acc = axes.flat[3]
    held = [(0, before), (max(steps), after)]
    held = [(s, v) for s, v in held if v is not None]
    if held:
        acc.plot(*zip(*held), "s:", color="black", label="held-out: chosen more likely")
        drawn.append("held-out preference accuracy")
    acc.set_ylim(-0.05, 1.05)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)
    return drawn


def _save(fig, path: str | Path) -> Path:
    """The figure as a PNG, written atomically with the kit's file mode (finetune/fileio.py)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
