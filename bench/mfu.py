"""Achieved FLOP/s of a LoRA training step against the machine's measured matmul throughput (MFU-style, CPU).

The batch is the padded CogVLM2-shaped one of bench/speed_vs_official.py: hidden 512, MLP 1376, 4 layers,
GQA 8/2, the real 128256-token vocabulary, 224-px images (66 image tokens), 4 right-padded rows of
BOS + image + 160/120/84/40 text tokens = 4 x 227 positions, 672 of them real, 20 labelled per row;
LoRA r=8 on both experts (attention and MLP), fp32, no checkpointing.

* FLOPs of one step (forward + backward): `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions,
  attention; element-wise work is not counted, as in the usual MFU definition).
* Step time: the fastest of --repeats steps after a warm-up (the matmul peak is taken the same way).
* Machine limit: the best fp32 `torch.mm` throughput over a few square and model-shaped products, same threads.
* floor = FLOPs / matmul throughput: the step's time if every counted FLOP ran at the matmul peak.

With --official-dir DIR (the official modeling files, see bench/parity_official.py; kept outside the
repository) the official code is measured on the same weights and batch, with peft LoRA on the same linears.

    .venv/bin/python bench/mfu.py [--threads 1] [--repeats 5] [--official-dir /tmp/official] [--profile]

--profile adds where the kit's step spends its time (torch profiler, self time per op over 3 steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_official import BOS_ID, EOS_ID, PAD_ID, VOCAB, _batch, _with_labels  # noqa: E402

TEXT = (160, 120, 84, 40)  # text tokens per row -> 1 + 66 + 160 = 227 positions, 672 real
# The same linears as the kit's `experts` preset, anchored (a bare `gate_proj` would also hit the GLU adapter).
OFFICIAL_TARGETS = (r"model\.layers\.\d+\.(?:self_attn\.(?:language|vision)_expert_(?:query_key_value|dense)"
                    r"|mlp\.(?:language|vision)_mlp\.(?:gate|up|down)_proj)")


def kit_config():
    from finetune.tiny import tiny_config

    return tiny_config(2, vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_multi_query_heads=2, image_size=224,
                       vision_config={"hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                                      "num_hidden_layers": 2})


def kit_model(cfg):
    from finetune.config import LoraSection
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    torch.manual_seed(0)
    model = CogVLMForCausalLM(cfg)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}  # before peft renames the wrapped keys
    lora = LoraSection(targets=["experts"], r=8, lora_alpha=16, lora_dropout=0.05)
    return base_state, apply_lora(model, lora, gradient_checkpointing=False, log=lambda *_: None).train()


def official_model(official_dir: Path, base_state: dict[str, torch.Tensor], cfg):
    """The official CogVLM2 code with the kit model's weights and peft LoRA r=8 on the same linears."""
    from parity_official import load_official
    from peft import LoraConfig, get_peft_model

    official = load_official(official_dir)
    off_cfg = official.CogVLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_multi_query_heads=cfg.num_multi_query_heads, rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vision_config=dict(cfg.vision_config))
    ref = official.CogVLMForCausalLM(off_cfg)
    ref.load_state_dict(base_state, strict=True)
    return get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                          target_modules=OFFICIAL_TARGETS)).train()


def step_fn(model, batch: dict[str, Any]):
    def step() -> None:
        model(**batch, use_cache=False).loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def _cpu_attention_flops(query, key, *_: Any, **__: Any) -> int:
    """SDPA's CPU kernel (not in torch's FLOP registry): QK^T and PV, 2 FLOPs per multiply-add, every score."""
    b, h, lq, d = query
    return 4 * b * h * lq * key[-2] * d


def _cpu_attention_backward_flops(grad_out, query, key, *_: Any, **__: Any) -> int:
    """Four matmuls of the same size (dQ, dK, dV, dP), as torch counts the GPU kernels' backward."""
    return 2 * _cpu_attention_flops(query, key)


def step_flops(step) -> int:
    """FLOPs of one step; the CPU attention kernels are added to torch's registry (it counts only GPU ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after a warm-up: on a shared machine the least disturbed run, for the step
    and the matmul peak alike, so their ratio does not depend on other jobs' load."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_flops_per_s(repeats: int = 5) -> tuple[float, str]:
    """Best fp32 matmul throughput over square and model-shaped products (M, K, N)."""
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (908, 512, 1376), (908, 1376, 512), (80, 512, 128256)]
    best, where = 0.0, ""
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        t = best_time(lambda a=a, b=b: torch.mm(a, b), repeats)
        rate = 2 * m * k * n / t
        if rate > best:
            best, where = rate, f"{m}x{k} @ {k}x{n}"
    return best, where


def profile_table(step, rows: int = 12) -> str:
    """Markdown table of the ops with the most self time over 3 steps (the step's own overheads show here)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | share of step time | per step | calls per step |", "|---|---:|---:|---:|"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / total:.0%} | {e.self_cpu_time_total / 3e3:.0f} ms "
                     f"| {e.count // 3} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--official-dir", type=Path, default=None,
                        help="folder with the official modeling files (see bench/parity_official.py)")
    parser.add_argument("--profile", action="store_true", help="also print the kit step's time per op")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = kit_config()
    base, kit = kit_model(cfg)
    gen = torch.Generator().manual_seed(1)
    batch = _with_labels(_batch([(n, True) for n in TEXT], cfg, gen), 20)
    b, n = batch["input_ids"].shape
    real = int(batch["attention_mask"].sum())
    peak, peak_shape = matmul_flops_per_s(args.repeats)
    models = {"cogtune": kit}
    if args.official_dir is not None:
        if (args.official_dir / "modeling_cogvlm.py").is_file():
            models["official"] = official_model(args.official_dir, base, cfg)
        else:
            print(f"note: {args.official_dir}/modeling_cogvlm.py not found; official code not measured")
    else:
        print("note: no --official-dir given (the official files live outside the repository); kit only")
    print(f"\nbatch {b}x{n} ({real} real positions, {cfg.image_tokens} image tokens per row, 20 labelled per row), "
          f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, LoRA r=8 on both "
          f"experts, fp32, {torch.get_num_threads()} thread(s), best of {args.repeats}")
    print(f"machine: fp32 matmul {peak / 1e9:.1f} GFLOP/s (best of several shapes, {peak_shape})\n")
    print("| code | GFLOP / step | step time | achieved GFLOP/s | MFU (achieved / matmul) | floor | step / floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        step = step_fn(model, batch)
        flops = step_flops(step)
        t = best_time(step, args.repeats)
        floor = flops / peak
        print(f"| {name} | {flops / 1e9:.1f} | {t * 1e3:.0f} ms | {flops / t / 1e9:.1f} | {flops / t / peak:.0%} "
              f"| {floor * 1e3:.0f} ms | {t / floor:.2f}x |")
    if args.profile:
        print("\nwhere the kit's step goes (torch profiler, self time, 3 steps):\n")
        print(profile_table(step_fn(kit, batch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
