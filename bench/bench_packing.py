"""Packing that computes only the blocks: real tokens/s and attention FLOPs of packing vs dynamic padding (CPU).

Rows are CogVLM2-like, scaled down by ~8: one image span of 291 tokens (CogVLM2: 2306) plus 16-192 text tokens
(CogVLM2 recipes: up to ~760), so image tokens are most of every row, as at full size. Packs are planned over
the whole data set (`finetune.dataset.PackedDataset`, best fit) at max_length 1024 (CogVLM2's 8192 / 8).

Variants, all over the same rows in the same order, with the kit's LoRA (r=16, both experts, checkpointing on):

* dynamic padding, 1 row per step (no padding at all) and 3 rows per step (padded to the longest row);
* packing with the block-diagonal mask the model used before (one SDPA call over the pack's L x L scores);
* packing with per-segment attention (`modeling_cogvlm.segment_attention`, the kit's path now).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` over one untimed epoch; torch does not count its CPU
flash-attention kernel, so its formula for the CUDA kernels is mapped onto the CPU ops here (it counts every
score of the block it is given, causal or not). "decoder attention" excludes the vision tower's attention,
which is per image and the same in every variant. Time: median of --runs epochs (the FLOP-counting epoch is
the warm-up), variants interleaved. The epoch loss (token-weighted over the epoch) and the LoRA gradients are
compared with the 1-row-per-step variant as an exactness check.

    .venv/bin/python bench/bench_packing.py             # the table in docs/benchmarks.md, < 1 min
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

SEED = 0
IMAGE_SIZE = 476  # 34 x 34 patches -> 2x2 conv -> 17^2 + boi + eoi = 291 image tokens
MAX_LENGTH = 1024
WORDS = ("the a red green blue yellow purple orange white black circle square triangle star shape is on left "
         "right top bottom middle large small two three there are in of image picture color background").split()


def small_config():
    """CogVLM2-shaped (GQA, vision conv), hidden 256, 2 layers, 4 heads of 64 / 2 KV heads; tiny vision tower."""
    from finetune.tiny import tiny_config

    return tiny_config(2, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                       num_multi_query_heads=2, image_size=IMAGE_SIZE,
                       vision_config={"hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                                      "num_hidden_layers": 1})


def build_model(config):
    from finetune.config import LoraSection
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    torch.manual_seed(SEED)
    model = CogVLMForCausalLM(config)
    lora = LoraSection(targets=["experts"], r=16, lora_alpha=32, lora_dropout=0.0)  # no dropout: exactness check
    return apply_lora(model, lora, gradient_checkpointing=True, log=lambda *_: None).train()


def make_rows(config, n: int) -> list[Any]:
    """n encoded one-image rows with 16-192 text tokens (question + answer) each."""
    from data_formats.schema import Conversation, Message
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer

    tok = build_tiny_tokenizer(2)
    processor = CogVLMProcessor.from_config(config, tok, template_version="chat")
    rng = random.Random(SEED)
    gen = torch.Generator().manual_seed(SEED)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    rows = []
    for i in range(n):
        total = rng.randint(16, 192)
        q = max(4, total // 5)
        image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)  # already "transformed" pixels
        conv = Conversation(id=str(i), images=[image],
                            messages=[Message("user", text(q)), Message("assistant", text(total - q))])
        rows.append(processor.encode(conv))
    return rows


@contextmanager
def block_diagonal_mask() -> Iterator[None]:
    """The model as it was: packed rows through one SDPA call with the (B, 1, L, L) block-diagonal mask."""
    from finetune import modeling_cogvlm

    saved = modeling_cogvlm.segment_runs
    modeling_cogvlm.segment_runs = lambda attention_mask: None
    try:
        yield
    finally:
        modeling_cogvlm.segment_runs = saved


class AttentionFlops:
    """FLOP formulas for torch's CPU flash-attention ops; also tallies attention inside the vision tower."""

    def __init__(self, model) -> None:
        self.vision = 0
        self.inside_vision = False
        tower = model.get_base_model().model.vision
        tower.register_forward_pre_hook(lambda *_: setattr(self, "inside_vision", True))
        tower.register_forward_hook(lambda *_: setattr(self, "inside_vision", False))
        aten = torch.ops.aten
        self.mapping = {aten._scaled_dot_product_flash_attention_for_cpu: self.forward,
                        aten._scaled_dot_product_flash_attention_for_cpu_backward: self.backward}

    def forward(self, q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        n = sdpa_flop_count(q, k, v)
        self.vision += n if self.inside_vision else 0
        return n

    def backward(self, g, q, k, v, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(g, q, k, v)  # the vision tower is frozen: no backward there


def run_epoch(model, batches: list[dict[str, Any]], n_items: int) -> float:
    """fwd+bwd over every batch; gradients accumulate (token-weighted), the epoch loss is returned."""
    total = 0.0
    for b in batches:
        loss = model(**b, num_items_in_batch=n_items).loss
        loss.backward()
        total += float(loss.detach())
    return total


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="timed epochs per variant (median)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from finetune.dataset import PackedDataset
    from finetune.models.cogvlm.modeling import segment_runs
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer

    config = small_config()
    model = build_model(config)
    rows = make_rows(config, args.rows)
    processor = CogVLMProcessor.from_config(config, build_tiny_tokenizer(2), max_length=MAX_LENGTH)
    plain = CogVLMCollator(processor)
    packer = CogVLMCollator(processor, packing=True)
    packs = PackedDataset(rows, [len(r) for r in rows], MAX_LENGTH)
    packed = [packer([packs[i]]) for i in range(len(packs))]
    batches = {
        "dynamic padding, 1 row per step": [plain([r]) for r in rows],
        "dynamic padding, 3 rows per step": [plain(rows[i:i + 3]) for i in range(0, len(rows), 3)],
        "packing, block-diagonal mask (before)": packed,
        "packing, per-segment attention (now)": packed,
    }
    modes: dict[str, Callable[[], Any]] = {k: (block_diagonal_mask if "before" in k else _nothing) for k in batches}
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches["dynamic padding, 1 row per step"])

    # Exactness and FLOPs: one untimed epoch per variant.
    flops = AttentionFlops(model)
    losses, grads, counted = {}, {}, {}
    for k, bs in batches.items():
        zero_grads(model)
        flops.vision = 0
        with modes[k](), FlopCounterMode(display=False, custom_mapping=flops.mapping) as fc:
            losses[k] = run_epoch(model, bs, n_items)
        grads[k] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        per_op = fc.get_flop_counts()["Global"]
        attn = sum(v for op, v in per_op.items() if "scaled_dot_product" in str(op))
        counted[k] = (attn - flops.vision, fc.get_total_flops())

    # Time: interleaved epochs.
    def epoch(k: str) -> None:
        with modes[k]():
            run_epoch(model, batches[k], n_items)
        zero_grads(model)

    times: dict[str, list[float]] = {k: [] for k in batches}
    for _ in range(args.runs):
        for k in batches:
            t0 = time.perf_counter()
            epoch(k)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    ref = "dynamic padding, 1 row per step"
    base = "dynamic padding, 3 rows per step"
    real = sum(len(r) for r in rows)
    out = ["| variant | steps | positions computed | pad fraction | decoder attention GFLOP | step GFLOP (all ops) "
           "| epoch time (median) | real tokens/s | speed vs padding x3 | loss / grad diff vs 1 row |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for k, bs in batches.items():
        positions = sum(b["input_ids"].numel() for b in bs)
        grad_diff = max(float((g - grads[ref][n]).abs().max()) for n, g in grads[k].items())
        out.append(f"| {k} | {len(bs)} | {positions} | {1 - real / positions:.0%} | {counted[k][0] / 1e9:.2f} "
                   f"| {counted[k][1] / 1e9:.1f} | {med[k] * 1e3:.0f} ms | {real / med[k]:.0f} "
                   f"| {med[base] / med[k]:.2f}x | {abs(losses[k] - losses[ref]):.1e} / {grad_diff:.1e} |")
    lengths = [len(r) for r in rows]
    seg_lengths = [[e - a for a, e, real_ in r if real_] for p in packed for r in segment_runs(p["attention_mask"])]
    print(f"- environment: {datetime.date.today()}, {platform.machine()}, {args.threads} torch thread(s), "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"- model: CogVLM2-shaped, hidden 256, MLP 688, 2 layers, 4 heads of 64 / 2 KV heads, vocab "
          f"{config.vocab_size}; vision 32 x 1 layer @ {IMAGE_SIZE} px -> {config.image_tokens} image tokens; "
          "LoRA r=16 on both experts, gradient checkpointing on; fp32")
    print(f"- data: {len(rows)} one-image rows of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.0f}, {config.image_tokens} of them image), {real} real tokens; packs "
          f"(max_length {MAX_LENGTH}, best fit over the data set): {seg_lengths}")
    print(f"- time: median of {args.runs} epochs after the FLOP-counting one, variants interleaved; tokens/s counts "
          "real tokens only; FLOPs: one epoch under torch's FLOP counter (checkpointing recomputes the forward, so "
          "attention is counted forward x2 + backward)")
    print()
    print("\n".join(out))
    first = seg_lengths[0]
    print(f"\nAttention alone over the first pack (segments {first} + {MAX_LENGTH - sum(first)} padding; "
          f"{config.num_attention_heads} heads of {config.head_dim}), median of {args.runs}:\n")
    print("\n".join(attention_methods(first, MAX_LENGTH - sum(first), config.num_attention_heads, config.head_dim,
                                     args.runs)))
    print(f"\n_total wall time {time.perf_counter() - t_start:.0f} s_")
    return 0


def attention_methods(lengths: list[int], pad: int, heads: int, head_dim: int, runs: int) -> list[str]:
    """Causal attention over one pack (segments `lengths`, then `pad` padding), fwd+bwd, per candidate method."""
    import torch.nn.functional as F

    from finetune.models.cogvlm.modeling import build_attention_mask, segment_attention

    torch.manual_seed(SEED)
    n = sum(lengths) + pad
    seg = torch.tensor([[i + 1 for i, m in enumerate(lengths) for _ in range(m)] + [0] * pad])
    q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
    mask = build_attention_mask(seg, n, 0, q.device)[0]
    runs_ = [[(a, a + m, True) for a, m in zip([sum(lengths[:i]) for i in range(len(lengths))], lengths)]
             + ([(sum(lengths), n, False)] if pad else [])]

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        s = seg[0]
        block = create_block_mask(lambda b, h, i, j: ((s[i] == s[j]) & (j <= i) & (s[j] != 0)) | (i == j), 1, 1, n,
                                  n, device="cpu")
        return flex_attention(q, k, v, block_mask=block)

    def nested():
        parts = [slice(a, e) for a, e, real in runs_[0] if real]
        nq, nk, nv = (torch.nested.as_nested_tensor([t[0, :, p].transpose(0, 1) for p in parts], layout=torch.jagged)
                      .transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(nq, nk, nv, is_causal=True)

    def varlen():
        from torch.nn.attention.varlen import varlen_attn

        cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32)
        t = [x[0, :, : sum(lengths)].transpose(0, 1) for x in (q, k, v)]
        return varlen_attn(*t, cu, cu, max(lengths), max(lengths))

    methods = {
        "one SDPA call, (L x L) block-diagonal mask (before)": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask),
        "per-segment causal SDPA loop (chosen)": lambda: segment_attention(q, k, v, runs_),
        "FlexAttention + block mask, eager": flex,
        "nested (jagged) tensors + SDPA": nested,
        "torch.nn.attention.varlen.varlen_attn": varlen,
    }
    notes = {
        "FlexAttention + block mask, eager": "eager FlexAttention also materializes the full L x L scores; compiled "
                                             "(needs a C++ toolchain) it has no CPU backward either",
        "nested (jagged) tensors + SDPA": "jagged SDPA refuses is_causal=True",
        "torch.nn.attention.varlen.varlen_attn": "a CUDA flash kernel",
    }
    lines = ["| method | fwd+bwd (median) | note |", "|---|---|---|"]
    for name, fn in methods.items():
        try:
            times = []
            for _ in range(runs + 1):
                t0 = time.perf_counter()
                out = fn()
                (out.values() if out.is_nested else out).sum().backward()
                times.append(time.perf_counter() - t0)
            lines.append(f"| {name} | {statistics.median(times[1:]) * 1e3:.0f} ms | {notes.get(name, '')} |")
        except Exception as e:  # a method this torch cannot run on CPU: say why
            why = str(e).strip().splitlines()[0].split(". ")[0][:90].replace("|", "/")
            lines.append(f"| {name} | - | fails on CPU: {type(e).__name__}: {why}; {notes.get(name, '')} |")
    return lines


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    raise SystemExit(main())
