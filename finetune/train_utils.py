"""Pieces the training recipe configures transformers' Trainer with: loss guard, callbacks, plots.

Kept out of `recipe.py` so the recipe reads top to bottom; none of this subclasses the Trainer.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of labelled positions)."""
    logits = logits[:, :-1].float()  # (B, L-1, V)
    target = labels[:, 1:].to(logits.device)  # (B, L-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (target != -100).sum()


class _LossFunc:
    """Trainer `compute_loss_func`: token-weighted loss, and a guard against non-finite losses.

    A micro-batch whose loss is NaN/inf contributes a zero loss that is disconnected from its
    activations (so no NaN reaches the gradients) and is counted in `skipped`.
    """

    def __init__(self, model: torch.nn.Module, skip_nonfinite: bool) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.skip_nonfinite = skip_nonfinite
        self.skipped = 0

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        total, count = shifted_token_loss(outputs.logits, labels)
        denom = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        loss = total / denom
        if self.skip_nonfinite and not torch.isfinite(loss):
            self.skipped += 1
            return sum(p.sum() * 0.0 for p in self.params if p.requires_grad)
        return loss


def make_loss_func(model: torch.nn.Module, skip_nonfinite: bool = True) -> _LossFunc:
    return _LossFunc(model, skip_nonfinite)


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s, peak memory and the non-finite skip count to every log line (and TensorBoard)."""

    def __init__(self, loss_func: _LossFunc) -> None:
        self.loss_func = loss_func
        self._t = None
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._tokens = time.time(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._t is None or "loss" not in logs:
            return
        now = time.time()
        logs["tokens_per_s"] = round((state.num_input_tokens_seen - self._tokens) / max(now - self._t, 1e-9), 1)
        self._t, self._tokens = now, state.num_input_tokens_seen
        if torch.cuda.is_available():
            logs["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            import resource

            logs["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        logs["skipped_nonfinite"] = self.loss_func.skipped


def plot_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """PNG of train loss, eval loss and learning rate against step; None when nothing was logged."""
    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [h["loss"] for h in log_history if "loss" in h], label="train loss")
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if ev:
        ax1.plot(*zip(*ev), "o-", label="eval loss (token-weighted)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    lr = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    if lr:
        ax2.plot(*zip(*lr), color="tab:orange")
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
