"""LM head + cross-entropy over the labelled positions, one vocabulary chunk at a time (docs/architecture.md §11).

`F.cross_entropy(lm_head(h))` keeps three (N, V) fp32 tensors alive around the loss (logits, log-softmax,
their gradient) and walks them five times in memory (log-softmax forward and backward, the zero fill and the
scatter of the NLL gradient). Here the logits of each vocabulary chunk are computed, shifted by the chunk's
maximum and exponentiated while the chunk is still in cache; only those exponentials stay for backward, and
the gradient is never materialised: d loss / d h = diag(1/S) E W - W[labels] (E the exponentials, S their
row sums), one matmul per chunk. One (N, V) buffer instead of three, and no full-size element-wise pass in
backward. The logits come from the same `F.linear` in the weight's dtype as `lm_head` would give, then fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Vocabulary rows per chunk. CPU: measured (bench/mfu.py shapes, 80 labelled rows, 1 thread) 1024-2048 rows keep
# the head's matmul at ~85% of the machine's peak against ~65% for 8192+ and the element-wise passes in cache.
# Accelerators: fewer, larger chunks (kernel launches, not cache, are the cost there; not measured here).
CPU_CHUNK = 2048
DEVICE_CHUNK = 16384


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (no ignore index: every row is labelled)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
                ) -> torch.Tensor:
        n = hidden.shape[0]  # hidden (N, H), weight (V, H), labels (N,)
        rows = torch.arange(n, device=hidden.device)
        # The labelled logit per row; NaN until a chunk holds the label, so a label outside the vocabulary gives a
        # NaN loss (the trainer's guard skips and names that step) rather than garbage or a device-side assert.
        target = torch.full((n,), float("nan"), dtype=torch.float32, device=hidden.device)
        exps, maxes, sums = [], [], []
        for start in range(0, weight.shape[0], chunk):
            e = F.linear(hidden, weight[start : start + chunk]).float()  # (N, c) logits of this chunk
            inside = (labels >= start) & (labels < start + e.shape[1])
            target = torch.where(inside, e[rows, (labels - start).clamp(0, e.shape[1] - 1)], target)
            m = e.amax(dim=1, keepdim=True)  # (N, 1)
            e.sub_(m).exp_()
            exps.append(e)
            maxes.append(m)
            sums.append(e.sum(dim=1, keepdim=True))
        top = torch.cat(maxes, dim=1).amax(dim=1, keepdim=True)  # (N, 1) max over the whole vocabulary
        rescale = [torch.exp(m - top) for m in maxes]  # chunk exponentials -> exp(logit - top)
        total = sum(s * r for s, r in zip(sums, rescale))  # (N, 1) softmax denominator
        loss = (top + total.log()).squeeze(1) - target  # (N,) log-sum-exp minus the labelled logit
        ctx.chunk = chunk
        ctx.weight_grad = weight.requires_grad
        ctx.save_for_backward(hidden, weight, labels, *exps, *[r / total for r in rescale])
        return loss.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, *saved = ctx.saved_tensors
        half = len(saved) // 2
        exps, scales = saved[:half], saved[half:]  # softmax of chunk c = exps[c] * scales[c] (row scale)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.weight_grad else None
        for i, (e, s) in enumerate(zip(exps, scales)):
            rows = slice(i * ctx.chunk, i * ctx.chunk + e.shape[1])
            w = weight[rows]  # (c, H)
            if w.dtype == torch.float32:  # rows scaled after the (N, c) x (c, H) product: no (N, c) pass
                grad_hidden.addcmul_(e @ w, s)
                if grad_weight is not None:
                    grad_weight[rows] = e.t() @ (hidden * s)
            else:  # bf16/fp16 head: the chunk's softmax in the weight's dtype, as the head's own backward multiplies
                p = (e * s).to(w.dtype)  # (N, c)
                grad_hidden += (p @ w).float()
                if grad_weight is not None:
                    grad_weight[rows] = (p.t() @ hidden.to(w.dtype)).float()
        labels = labels.clamp(0, weight.shape[0] - 1)  # an out-of-vocabulary label made the loss NaN already
        grad_hidden.sub_(weight[labels].float())  # minus the one-hot part
        if grad_weight is not None:
            grad_weight.index_add_(0, labels, hidden.float(), alpha=-1.0)
            grad_weight = (grad_weight * grad).to(weight.dtype)
        return (grad_hidden * grad).to(hidden.dtype), grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of cross-entropy(hidden @ weight.T, labels); hidden (N, H), weight (V, H), labels (N,).

    Equal to `F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")` up to fp32 rounding.
    """
    if hidden.shape[0] == 0:
        return F.linear(hidden, weight).float().sum()  # no labelled position: 0, still connected to the graph
    if chunk is None:
        chunk = CPU_CHUNK if hidden.device.type == "cpu" else DEVICE_CHUNK
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)
