"""The chunked LM-head loss equals F.cross_entropy over full logits: value, input and weight gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.models import linear_cross_entropy as lce
from finetune.tiny import tiny_config


def _reference(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")


def _grads(fn, hidden, weight, labels):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(h, w, labels)
    (loss * 0.37).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [7, 300, 1000, 4096])  # uneven last chunk, one chunk, chunk > V
@pytest.mark.parametrize("weight_grad", [False, True])
def test_equals_full_cross_entropy(chunk, weight_grad):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 32, generator=gen)
    weight = (torch.randn(1000, 32, generator=gen) * 0.5).requires_grad_(weight_grad)
    labels = torch.tensor([0, 999, 299, 300, 301, 6, 7, 500, 999, 0, 123, 700, 42])  # chunk edges, repeats
    ref = _grads(_reference, hidden, weight, labels)
    got = _grads(lambda h, w, y: lce.linear_cross_entropy(h, w, y, chunk), hidden, weight, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    if weight_grad:
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    else:
        assert got[2] is None


def test_large_logits_stay_finite_and_exact():
    """Logits in the thousands, the largest in a different chunk per row: the rescaling across chunks holds."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 16, generator=gen) * 40
    weight = torch.randn(500, 16, generator=gen) * 5
    labels = torch.tensor([3, 120, 260, 499, 250, 10])
    ref = _grads(_reference, hidden, weight, labels)
    got = _grads(lambda h, w, y: lce.linear_cross_entropy(h, w, y, 64), hidden, weight, labels)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_bfloat16_matches_the_bfloat16_head(weight_grad):
    """bf16 weights: logits come from the same bf16 matmul as `lm_head(h).float()`, then fp32 math."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 64, generator=gen).bfloat16()
    weight = (torch.randn(700, 64, generator=gen) * 0.2).bfloat16().requires_grad_(weight_grad)
    labels = torch.randint(0, 700, (9,), generator=gen)
    ref = _grads(_reference, hidden, weight, labels)
    got = _grads(lambda h, w, y: lce.linear_cross_entropy(h, w, y, 128), hidden, weight, labels)
    assert got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=2e-2, atol=2e-3)
    if weight_grad:
        assert got[2].dtype == torch.bfloat16
        torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=2e-2, atol=2e-3)


def test_no_labelled_rows_gives_zero_and_a_gradient():
    hidden = torch.zeros(0, 8, requires_grad=True)
    loss = lce.linear_cross_entropy(hidden, torch.randn(50, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad.shape == (0, 8)


def test_model_uses_it_for_a_plain_head_and_not_for_a_wrapped_one(monkeypatch):
    """The training loss goes through the chunked path for a plain lm_head and equals the full-logits loss."""
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    calls = []
    real = lce.linear_cross_entropy
    monkeypatch.setattr("finetune.models.cogvlm.modeling.linear_cross_entropy",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    cfg = tiny_config(2)
    model = CogVLMForCausalLM(cfg).train()
    ids = torch.randint(3, cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    tt = torch.zeros_like(ids)
    fused = model(input_ids=ids, token_type_ids=tt, labels=labels).loss
    assert calls == [1]
    full = model(input_ids=ids, token_type_ids=tt, labels=labels, loss_only=False).loss
    torch.testing.assert_close(fused, full, rtol=1e-6, atol=1e-6)

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head"]))
    wrapped(input_ids=ids, token_type_ids=tt, labels=labels)
    assert calls == [1]  # the LoRA-wrapped head runs its own forward (F.cross_entropy path)


def test_a_label_outside_the_vocabulary_gives_nan_not_garbage():
    """F.cross_entropy raises on such a label; here it must at least be loud: a NaN loss the guard will stop on,
    and a backward that does not crash (the step is dropped anyway)."""
    hidden = torch.randn(3, 8, requires_grad=True)
    loss = lce.linear_cross_entropy(hidden, torch.randn(50, 8), torch.tensor([1, 50, 7]), 16)
    assert torch.isnan(loss)
    loss.backward()
    assert hidden.grad.shape == (3, 8)
