"""Evaluation of a model during and after training: token-weighted loss and generation accuracy.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def token_weighted_eval_loss(model, examples: list, collator, batch_size: int = 4) -> float:
    """Sum of label-token losses over all rows / number of label tokens (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collator(examples[i:i + batch_size])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = model(**batch, loss_only=True, num_items_in_batch=1)  # summed over label tokens
        total += float(out.loss)
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def generation_eval(model, processor, convs: list, max_new_tokens: int, rows: int,
                    batch_size: int = 8) -> tuple[dict, list[dict]]:
    """Greedy answers for the first `rows` held-out rows, scored against their last assistant turn."""
    from .generation import generate_answers, score

    convs = [c for c in convs if c.messages and c.messages[-1].role == "assistant"][:rows]
    if not convs:
        return {}, []
    refs = [c.messages[-1].content for c in convs]
    was_training = model.training
    model.eval()
    # generate_answers answers the last user turn; the trailing reference answer is left out of the prompt
    preds = generate_answers(model, processor, convs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    model.train(was_training)
    metrics = score(preds, refs)
    samples = [{"id": c.id, "prediction": p, "reference": r} for c, p, r in zip(convs, preds, refs)]
    return metrics, samples
