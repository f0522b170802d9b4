"""Calibrate the memory plan (finetune/memory.py) against measured CPU training steps.

For each grid point (hidden size, layers, text length, batch, LoRA targets, checkpointing, QLoRA) this builds
a small random CogVLM2-shaped model with the kit's own code (`CogVLMForCausalLM`, `finetune.lora.apply_lora`,
bitsandbytes nf4 through `finetune.loading.to_bnb_config` for QLoRA), runs real AdamW training steps on a
batch of full-length rows (BOS + image span + text, every text position labelled: the plan's worst case),
and compares the measured peak with `plan_memory(..., on_gpu=False)` for the same recipe values.

Measured peak = bytes live when the step starts + peak of the step's own allocations:
* live at the start: the unique storages of every parameter, buffer, bitsandbytes quantization state and
  AdamW state tensor (the state exists after one untimed warm-up step, as in any step after the first);
* the step (forward, backward, optimizer.step, zero_grad) is run under `torch.profiler` with
  `profile_memory=True`; its CPU allocation/free events are summed in time order and the maximum is taken.
  That covers activations saved for backward, the loss logits, gradients and every temporary torch allocates
  (the same method as bench/bench_cpu.py). Allocator caching and fragmentation are not counted.

    .venv/bin/python bench/calibrate_memory.py            # the table in docs/benchmarks.md (~1-2 min)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MIB = 2**20


@dataclass(frozen=True)
class Point:
    """One grid point: model shape and recipe values."""

    hidden: int = 256
    layers: int = 2
    text: int = 128  # text tokens per row (after BOS and the image span), all labelled
    batch: int = 2
    targets: tuple[str, ...] = ("experts",)
    gc: bool = True
    quant: str = "none"
    dropout: float = 0.05
    vocab: int = 4000
    image_size: int = 112
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        img = f"img{self.image_size}" if self.image_size != 112 else "img"
        return (f"h{self.hidden} L{self.layers} V{self.vocab} {self.batch}x({img}+{self.text}) "
                f"{'+'.join(self.targets)} "
                f"GC {'on' if self.gc else 'off'}{' nf4' if self.quant != 'none' else ''}"
                f"{f' drop {self.dropout:g}' if self.dropout != 0.05 else ''}")


GRID = [
    Point(),
    Point(hidden=512),
    Point(layers=4),
    Point(text=512),
    Point(batch=4),
    Point(targets=("language_expert_attn", "vision_expert_attn")),
    Point(gc=False),
    Point(gc=False, dropout=0.0),
    Point(gc=False, hidden=512, text=384),
    Point(gc=False, layers=4, batch=4),
    Point(quant="nf4"),
    Point(quant="nf4", gc=False),
    Point(quant="nf4", hidden=512, text=384),
    Point(vocab=32000, text=256),
    Point(targets=("experts", "vision_tower"), gc=False),
    Point(vocab=1000, text=768),
    Point(vocab=1000, text=768, gc=False),
    Point(vocab=1000, text=768, quant="nf4"),
    Point(image_size=224, text=64),
]
# The test's points (tests/test_memory.py): small vocabulary, so activations are a large share of the peak.
SMALL = [Point(hidden=128, text=192, vocab=1000), Point(hidden=128, text=192, vocab=1000, gc=False),
         Point(hidden=128, text=192, vocab=1000, quant="nf4")]


def model_config(p: Point):
    from finetune.tiny import tiny_config

    return tiny_config(2, hidden_size=p.hidden, intermediate_size=int(p.hidden * 2.6875) // 16 * 16,
                       num_hidden_layers=p.layers, num_attention_heads=8, num_multi_query_heads=2,
                       vocab_size=p.vocab, image_size=p.image_size,
                       vision_config={"hidden_size": 64, "num_heads": 2, "intermediate_size": 256,
                                      "num_hidden_layers": 2})


def run_config(p: Point):
    """The recipe values of a grid point (what `plan_memory` reads)."""
    from finetune.config import LoraSection, RunConfig

    cfg = RunConfig()
    cfg.lora = LoraSection(targets=list(p.targets), r=16, lora_alpha=32, lora_dropout=p.dropout)
    cfg.train.per_device_train_batch_size = p.batch
    cfg.train.gradient_checkpointing = p.gc
    cfg.quant.mode = p.quant
    cfg.quant.bnb_4bit_compute_dtype = "float32"
    cfg.model.dtype = "float32"
    return cfg


def plan_for(p: Point, config):
    """`plan_memory`'s plan for this point on CPU (meta-device model, as `cogtune train` plans)."""
    from finetune.memory import plan_memory
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.targets import resolve_targets, trainable_counts

    cfg = run_config(p)
    cfg.data.max_length = 1 + config.image_tokens + p.text
    with torch.device("meta"):
        meta = CogVLMForCausalLM(config)
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    matched = [n for hit in matches.values() for n in hit]
    lora_n, full_n = trainable_counts(meta, matched, cfg.lora.r, [])
    in_features = sum(dict(meta.named_modules())[n].in_features for n in matched)
    return plan_memory(meta, cfg, lora_n, full_n, "float32", lora_in_features=in_features, on_gpu=False)


def plan_step_bytes(plan) -> float:
    """The plan's share that a step allocates: everything but weights and the AdamW state (12 of the 16 B)."""
    from finetune.memory import GIB

    step = 0.0
    for name, gib, _ in plan.rows:
        if name.startswith("trainable"):
            step += gib / 4  # the gradient; weight and AdamW state are live between steps
        elif not name.startswith("weights") and not name.startswith("modules_to_save"):
            step += gib
    return step * GIB


def build_model(p: Point, config):
    """The kit's model (random, seeded) with LoRA applied; nf4 goes through save + from_pretrained as in training."""
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.modeling import FULL_PRECISION_MODULES, CogVLMForCausalLM

    torch.manual_seed(0)
    model = CogVLMForCausalLM(config)
    if p.quant != "none":
        from finetune.loading import to_bnb_config

        cfg = run_config(p)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            model = CogVLMForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                      quantization_config=to_bnb_config(cfg.quant, torch.float32,
                                                                                        FULL_PRECISION_MODULES))
    return apply_lora(model, run_config(p).lora, gradient_checkpointing=p.gc, log=lambda *_: None).train()


def make_batch(p: Point, config) -> dict[str, Any]:
    """`batch` full-length rows: BOS, the image span, `text` random labelled tokens (no padding)."""
    gen = torch.Generator().manual_seed(1)
    n_img = config.image_tokens
    ids = torch.randint(10, config.vocab_size, (p.batch, 1 + n_img + p.text), generator=gen)
    ids[:, 0] = config.bos_token_id
    ids[:, 1:1 + n_img] = config.pad_token_id
    types = torch.zeros_like(ids)
    types[:, 1:1 + n_img] = 1
    labels = ids.clone()
    labels[:, :1 + n_img] = -100
    s = config.vision_config["image_size"]
    images = [[torch.randn(3, s, s, generator=gen)] for _ in range(p.batch)]
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids), "images": images,
            "labels": labels}


def _storages(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def live_bytes(model, optimizer) -> int:
    """Bytes of every tensor a training run keeps between steps: parameters, buffers, quant states, AdamW state."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:  # bitsandbytes QuantState (and its nested state2 with double quantization)
            tensors += [getattr(qs, k, None) for k in ("absmax", "code", "offset")]
            qs = getattr(qs, "state2", None)
    for state in optimizer.state.values():
        tensors += list(state.values())
    return _storages(tensors)


def peak_alloc_bytes(fn) -> int:
    """Peak of torch CPU tensor bytes allocated by `fn` and live at the same time (profiler allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocs = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def measure(p: Point, config) -> tuple[float, dict[str, float]]:
    """(measured peak bytes, parts) of one AdamW training step after a warm-up step."""
    model = build_model(p, config)
    batch = make_batch(p, config)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW allocates its state on the first step
    live = live_bytes(model, opt)
    delta = peak_alloc_bytes(step)
    return live + delta, {"live": live, "step": delta}


@dataclass
class Result:
    point: Point
    plan: float  # bytes, whole plan
    measured: float  # bytes, live + step peak
    plan_step: float  # bytes, the plan without weights / AdamW state
    measured_step: float  # bytes, the step's own peak
    rows: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.plan / self.measured

    @property
    def step_ratio(self) -> float:
        return self.plan_step / self.measured_step


def calibrate(points: list[Point]) -> list[Result]:
    """Plan and measurement per grid point."""
    from finetune.memory import GIB

    out = []
    for p in points:
        config = model_config(p)
        measured, parts = measure(p, config)
        plan = plan_for(p, config)
        out.append(Result(p, plan.total_gib * GIB, measured, plan_step_bytes(plan), parts["step"], plan.rows))
    return out


def table(results: list[Result]) -> str:
    lines = ["| config | plan (MiB) | measured (MiB) | plan / measured | step: plan (MiB) | step: measured (MiB) "
             "| step: plan / measured |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.point.label()} | {r.plan / MIB:.1f} | {r.measured / MIB:.1f} | {r.ratio:.2f} "
                     f"| {r.plan_step / MIB:.1f} | {r.measured_step / MIB:.1f} | {r.step_ratio:.2f} |")
    ratios = [r.ratio for r in results]
    steps = [r.step_ratio for r in results]
    lines += ["", f"- whole step (weights + AdamW state + step): plan / measured min {min(ratios):.2f}, "
              f"max {max(ratios):.2f} over {len(ratios)} points",
              f"- step only (activations, logits, gradients, temporaries): plan / measured min {min(steps):.2f}, "
              f"max {max(steps):.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test's three small points only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", action="store_true", help="also print each point's plan rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = calibrate(SMALL if args.small else GRID)
    print(table(results))
    if args.rows:
        for r in results:
            print(f"\n{r.point.label()}: measured live {(r.measured - r.measured_step) / MIB:.1f} MiB + step "
                  f"{r.measured_step / MIB:.1f} MiB")
            for name, gib, basis in r.rows:
                print(f"    {name:<36}{gib * 1024:8.1f} MiB  {basis}")
    print(f"- fp32, CPU, torch {torch.__version__}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
