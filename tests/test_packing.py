"""Packed rows attend per segment: loss and gradients equal the rows run alone, and attention costs the sum of the
segments' squares, not the square of the pack."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from data_formats.schema import Conversation, Message
from finetune.models.cogvlm.modeling import segment_runs
from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
from finetune.tokenization import build_tiny_tokenizer

aten = torch.ops.aten
# torch's FLOP counter knows the CUDA SDPA kernels but not the CPU flash kernel that SDPA runs on here.
CPU_SDPA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(
        q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)),
}


@pytest.fixture()
def rows(tmp_path) -> list[Conversation]:
    """Four one-image rows with answers of different lengths and a text-only row."""
    out = []
    for i, (colour, answer) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "a blue square on the left side"),
                                          ((0, 255, 0), "green"), ((9, 9, 9), "dark grey, nearly black")]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), colour).save(path)
        out.append(Conversation(f"img{i}", [str(path)], [Message("user", "<image>What colour is it?"),
                                                          Message("assistant", answer)]))
    out.insert(2, Conversation("txt", [], [Message("user", "How many sides has a square?"),
                                           Message("assistant", "four")]))
    return out


def _batches(version: int, model, rows):
    tok = build_tiny_tokenizer(version)
    alone = [CogVLMCollator(CogVLMProcessor.from_config(model.config, tok))([r]) for r in rows]
    width = max(b["input_ids"].shape[1] for b in alone)
    packed = CogVLMCollator(CogVLMProcessor.from_config(model.config, tok, max_length=2 * width + 4), packing=True,
                            pad_to_multiple_of=8)(rows)
    runs = segment_runs(packed["attention_mask"])
    # The layout the test is about: several rows hold two or more segments with image spans, and every pack's
    # last run is padding.
    assert runs is not None and len(runs) < len(rows)
    assert all(not r[-1][2] for r in runs) and max(len(r) for r in runs) >= 3
    types = packed["token_type_ids"]
    assert sum(bool(types[r, a:e].any()) for r, rr in enumerate(runs) for a, e, real in rr if real) == 4
    return alone, packed


def _loss_and_grads(model, batches, n_items):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        total += loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return total, grads


def _compare(model, alone, packed):
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in alone)
    ref_loss, ref_grads = _loss_and_grads(model, alone, n_items)
    loss, grads = _loss_and_grads(model, [packed], n_items)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    # Every gradient is non-trivial but the last decoder layer's vision expert after attention (its output feeds
    # image positions only, which carry no label).
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    zero = [n for n, g in grads.items() if not g.abs().sum() > 0]
    assert all(last in n and ("vision_expert_dense" in n or "vision_mlp" in n) for n in zero), zero
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("version", [1, 2], ids=["cogvlm", "cogvlm2"])
def test_packed_base_grads_equal_rows_alone(version, rows, tiny_models):
    """Full fine-tuning: loss and the gradient of every base parameter, vision tower included."""
    model = copy.deepcopy(tiny_models[version]).train()
    alone, packed = _batches(version, model, rows)
    _compare(model, alone, packed)


@pytest.mark.parametrize("version", [1, 2], ids=["cogvlm", "cogvlm2"])
def test_packed_lora_grads_equal_rows_alone(version, rows, tiny_models):
    """LoRA on both experts' attention and MLP (B initialised non-zero, so A's gradients are non-zero too)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_models[version]).train()
    targets = ["language_expert_query_key_value", "vision_expert_query_key_value", "language_expert_dense",
               "vision_expert_dense", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    alone, packed = _batches(version, base, rows)
    assert sum(p.requires_grad for p in model.parameters()) > 20
    _compare(model, alone, packed)


def test_packed_attention_costs_sum_of_segment_squares(rows, tiny_models):
    """The FLOP counter sees causal SDPA over each segment only (forward and backward), not over the whole pack."""
    model = copy.deepcopy(tiny_models[2]).train()
    _, packed = _batches(2, model, rows)
    cfg = model.config
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        model(**packed).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "scaled_dot_product" in str(op))
    lengths = [e - a for r in segment_runs(packed["attention_mask"]) for a, e, real in r if real]
    # torch's count per n x n attention block: forward 2 matmuls (4*h*d*n^2), backward 5 (10*h*d*n^2).
    per_square = 14 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    vision = cfg.vision_config
    n_img, tokens = packed["images"].shape[0], (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    vis = 14 * vision["hidden_size"] * tokens**2 * n_img * vision["num_hidden_layers"]  # per image, unchanged
    assert attention == per_square * sum(n * n for n in lengths) + vis
    b, width = packed["input_ids"].shape
    assert attention < per_square * b * width**2 + vis  # what the block-diagonal mask cost


def test_segment_runs():
    """Maximal runs of one segment id, padding marked; plain 0/1 masks and bool masks are not packed."""
    assert segment_runs(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 3, 3]])) == [
        [(0, 2, True), (2, 5, True), (5, 6, False)], [(0, 3, True), (3, 4, True), (4, 6, True)]]
    assert segment_runs(torch.tensor([[1, 1, 0]])) is None
    assert segment_runs(torch.ones(1, 3, dtype=torch.bool)) is None
    assert segment_runs(None) is None
