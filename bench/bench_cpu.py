"""CPU benchmarks of the kit's design choices on one small CogVLM2-shaped model (no GPU, no downloads).

Each table compares one choice on the SAME randomly initialised model and the SAME inputs:

1. labelled-only logits (`loss_only=True`) vs full (B, L, V) logits, for a LoRA training step;
2. fixed-length padding (official demo) vs dynamic padding vs packing, over one small mixed-length data set;
3. expert routing: ours (indices once per forward) vs the official style (boolean masks re-derived in every
   call) vs a dense baseline (both experts on every token, then `torch.where`);
4. gradient checkpointing on vs off.

Model: `finetune.tiny.tiny_config(2, ...)` scaled to hidden 512 / MLP 1376 / 4 layers / 8 heads, 2 KV heads /
vocab 32000, vision tower 128 wide, 2 layers, 224 px -> (224/14/2)^2 + 2 = 66 image tokens; LoRA r=16 on both
experts (`targets: [experts]`, as recipes/cogvlm2-lora.yaml), fp32, random weights.

Time: median of --runs fwd+bwd steps per variant after one warm-up step; variants are interleaved
(A B C A B C ...) so that load from other processes hits every variant alike. Memory: peak bytes of torch
CPU tensor allocations during one step, above what was live when the step started (weights are excluded),
read from the allocation events of `torch.profiler` (profile_memory=True) in a separate, untimed step.
This counts exactly the tensors torch allocates (activations kept for backward, logits, gradients); it does
not count allocator caching or fragmentation. No assertions: these are measurements, not tests.

    .venv/bin/python bench/bench_cpu.py --quick     # smoke run, < 1 min on 2 cores
    .venv/bin/python bench/bench_cpu.py             # the numbers in docs/benchmarks.md, < 5 min
    .venv/bin/python bench/bench_cpu.py --plan      # analytic memory plan of the shipped recipes at full size
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MIB = 2**20
SEED = 0
IMAGE_SIZE = 224
# Words the tiny tokenizer knows (about one token each), for synthetic questions and answers.
WORDS = ("the a red green blue yellow purple orange white black circle square triangle star shape is on left "
         "right top bottom middle large small two three there are in of image picture color background").split()


@dataclass
class Setup:
    """Sizes of one run (quick or full)."""

    hidden: int
    intermediate: int
    layers: int
    text_range: tuple[int, int]  # text tokens (question + answer) per row, uniform
    rows: int  # rows in the packing data set
    batch_rows: int  # rows per micro-batch (per_device_train_batch_size)
    max_length: int  # row length limit; the fixed-padding baseline pads every row to it
    runs: int  # timed repetitions per variant (median reported)
    pack_runs: int  # timed epochs per variant in the packing table


QUICK = Setup(hidden=256, intermediate=688, layers=2, text_range=(20, 200), rows=8, batch_rows=4, max_length=320,
              runs=2, pack_runs=1)
FULL = Setup(hidden=512, intermediate=1376, layers=4, text_range=(20, 400), rows=16, batch_rows=4, max_length=512,
             runs=3, pack_runs=2)


# ------------------------------------------------------------------------------------------------------------
# Model and data
# ------------------------------------------------------------------------------------------------------------


def small_config(setup: Setup):
    """The small CogVLM2-shaped config (66 image tokens per 224 px image)."""
    from finetune.tiny import tiny_config

    return tiny_config(
        2, hidden_size=setup.hidden, intermediate_size=setup.intermediate, num_hidden_layers=setup.layers,
        num_attention_heads=8,
        num_multi_query_heads=2, vocab_size=32000, image_size=IMAGE_SIZE,
        vision_config={"hidden_size": 128, "num_heads": 2, "intermediate_size": 512, "num_hidden_layers": 2},
    )


def lora_section(dropout: float = 0.05):
    """LoRA as in recipes/cogvlm2-lora.yaml: r=16 on both experts' attention and MLP."""
    from finetune.config import LoraSection

    return LoraSection(targets=["experts"], r=16, lora_alpha=32, lora_dropout=dropout)


def build_model(config, gradient_checkpointing: bool, dropout: float = 0.05):
    """Seeded random model wrapped by the kit's `apply_lora` (which also switches checkpointing on or off)."""
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    torch.manual_seed(SEED)
    model = CogVLMForCausalLM(config)
    model = apply_lora(model, lora_section(dropout), gradient_checkpointing=gradient_checkpointing,
                       log=lambda *_: None)
    return model.train()


def make_rows(config, n: int, seed: int = SEED, text_range: tuple[int, int] = (20, 400)) -> list[Any]:
    """n encoded one-image rows whose text part (question + answer) is uniform in `text_range` tokens."""
    from data_formats.schema import Conversation, Message
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer

    tok = build_tiny_tokenizer(2)
    processor = CogVLMProcessor.from_config(config, tok, template_version="chat", max_length=None)
    cost = {w: len(tok.encode(" " + w, add_special_tokens=False)) for w in WORDS}
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def text(n_tokens: int) -> str:
        words, used = [], 0
        while used < n_tokens:
            w = rng.choice(WORDS)
            words.append(w)
            used += cost[w]
        return " ".join(words)

    rows = []
    for i in range(n):
        total = rng.randint(*text_range)
        q = max(4, total // 5)
        image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)  # already "transformed" pixels
        conv = Conversation(id=str(i), images=[image],
                            messages=[Message("user", text(q)), Message("assistant", text(total - q))])
        rows.append(processor.encode(conv))
    return rows


def collator(config, max_length: int, packing: bool = False, fixed: bool = False):
    """The kit's collator; `fixed` pads every row to max_length, as the official CogVLM2 demo does."""
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer

    processor = CogVLMProcessor.from_config(config, build_tiny_tokenizer(2), template_version="chat",
                                            max_length=max_length)
    return CogVLMCollator(processor, packing=packing, pad_to_multiple_of=max_length if fixed else None)


# ------------------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------------------


def train_step(model, batch: dict[str, Any], **kwargs: Any) -> None:
    """One forward + backward; gradients are dropped afterwards (no optimizer: not what is compared)."""
    model(**batch, **kwargs).loss.backward()
    for p in model.parameters():
        p.grad = None


def peak_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak of torch CPU tensor bytes allocated by `fn` and live at the same time (profiler allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    allocs = [n for n in events if n.tag == _EventType.Allocation]
    allocs.sort(key=lambda n: n.start_time_ns)
    live = peak = 0
    for a in allocs:
        if str(a.extra_fields.device) == "cpu":
            live += a.extra_fields.alloc_size
            peak = max(peak, live)
    return peak


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_medians(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per variant; one untimed warm-up each, then `runs` rounds of A, B, C, ..."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def real_tokens(batch: dict[str, Any]) -> int:
    return int((batch["attention_mask"] != 0).sum())


def batch_shape(batch: dict[str, Any]) -> str:
    b, n = batch["input_ids"].shape
    return f"{b}x{n}"


# ------------------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """A markdown table with a title line and notes below."""
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms"


def mib(b: float) -> str:
    return f"{b / MIB:.0f} MiB"


def rel(x: float, base: float) -> str:
    return f"{x / base:.2f}x"


def formula_activations(model, config, batch: dict[str, Any], gradient_checkpointing: bool) -> float:
    """`finetune.memory.plan_memory`'s activation + logits rows for this batch's shape, in fp32 bytes."""
    from finetune.config import RunConfig
    from finetune.memory import GIB, plan_memory

    cfg = RunConfig()
    cfg.lora = lora_section()
    cfg.train.per_device_train_batch_size, cfg.data.max_length = batch["input_ids"].shape
    cfg.train.gradient_checkpointing = gradient_checkpointing
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    in_features = sum(m.in_features for n, m in model.get_base_model().named_modules()
                      if hasattr(m, "lora_A") and hasattr(m, "in_features"))
    plan = plan_memory(model.get_base_model(), cfg, lora, 0, "float32", lora_in_features=in_features, on_gpu=False)
    return sum(g for name, g, _ in plan.rows if name.startswith(("activations", "loss logits"))) * GIB


def bench_loss_only(model_gc, config, batch: dict[str, Any], runs: int) -> str:
    """Table 1: lm_head on labelled positions only vs on every position."""
    variants = {"full logits (`loss_only=False`)": False, "labelled only (`loss_only=True`, kit default)": True}
    fns = {k: (lambda lo=lo: train_step(model_gc, batch, loss_only=lo)) for k, lo in variants.items()}
    t = interleaved_medians(fns, runs)
    m = {k: peak_alloc_bytes(fn) for k, fn in fns.items()}
    base = next(iter(variants))
    n_lab = int((batch["labels"][:, 1:] != -100).sum())
    rows = [[k, ms(t[k]), rel(t[k], t[base]), mib(m[k]), rel(m[k], m[base])] for k in variants]
    b, n = batch["input_ids"].shape
    notes = [f"one fwd+bwd step, batch {b}x{n} ({real_tokens(batch)} real tokens, {n_lab} labelled), "
             f"vocab {config.vocab_size}, LoRA on experts, gradient checkpointing on (kit default)",
             f"full logits are a ({b}, {n}, {config.vocab_size}) fp32 tensor = "
             f"{mib(b * n * config.vocab_size * 4)} before softmax and its gradient"]
    return table("1. Labelled-only logits", ["variant", "step time (median)", "time vs full", "peak step memory",
                                             "memory vs full"], rows, notes)


def bench_packing(model_gc, config, rows_data: list[Any], setup: Setup) -> str:
    """Table 2: fixed padding to max_length vs dynamic padding vs packing, same rows, same rows per step."""
    order = list(range(len(rows_data)))
    random.Random(SEED).shuffle(order)
    rows_data = [rows_data[i] for i in order]
    bs, ml = setup.batch_rows, setup.max_length
    variants = {
        "fixed padding to max_length (official demo)": collator(config, ml, fixed=True),
        "dynamic padding per batch (kit default)": collator(config, ml),
        "packing (`data.packing: true`)": collator(config, ml, packing=True),
    }
    batches = {k: [c(rows_data[i:i + bs]) for i in range(0, len(rows_data), bs)] for k, c in variants.items()}

    def epoch(k: str) -> None:
        for b in batches[k]:
            train_step(model_gc, b)

    fns = {k: (lambda k=k: epoch(k)) for k in variants}
    for k in variants:  # warm-up: one micro-batch of each variant (a whole epoch would double the run time)
        train_step(model_gc, batches[k][0])
    t = interleaved_medians(fns, setup.pack_runs, warmup=0)
    largest = {k: max(batches[k], key=lambda b: b["input_ids"].numel()) for k in variants}
    m = {k: peak_alloc_bytes(lambda k=k: train_step(model_gc, largest[k])) for k in variants}
    base = next(iter(variants))
    out = []
    for k in variants:
        real = sum(real_tokens(b) for b in batches[k])
        positions = sum(b["input_ids"].numel() for b in batches[k])
        out.append([k, str(len(batches[k])), f"{positions}", f"{1 - real / positions:.0%}", ms(t[k]),
                    f"{real / t[k]:.0f}", rel(t[base], t[k]), mib(m[k])])
    lengths = [len(r) for r in rows_data]
    lo, hi = setup.text_range
    notes = [f"{len(rows_data)} rows, one image span ({config.image_tokens} tokens) + {lo}-{hi} text tokens each "
             f"(row lengths {min(lengths)}-{max(lengths)}, mean {statistics.mean(lengths):.0f}); "
             f"{bs} rows per micro-step, max_length {ml}; every variant sees the same rows in the same order",
             f"time = one epoch (all micro-steps, fwd+bwd), median of {setup.pack_runs}; tokens/s counts real "
             "(non-pad) tokens only; peak memory = the micro-step with the most positions",
             "packing concatenates the micro-step's rows into as few max_length rows as fit, with a block-diagonal "
             "(per-row) segment ids; attention runs per segment (the sum of the segments' squares, not L x L)"]
    return table("2. Packing vs padding",
                 ["variant", "micro-batches", "positions computed", "pad fraction", "epoch time (median)",
                  "real tokens/s", "speed vs fixed", "peak step memory"], out, notes)


@contextmanager
def routing_mode(mode: str) -> Iterator[None]:
    """Temporarily replace `ExpertRouting.apply`: 'routed' (ours), 'masked' (official style) or 'dense'."""
    from finetune import modeling_cogvlm as mc
    from finetune.token_types import get_expert_mask

    cls = mc.ExpertRouting
    orig_apply, orig_from = cls.apply, cls.from_token_types.__func__

    def from_token_types(klass, token_type_ids):
        r = orig_from(klass, token_type_ids)
        r.token_type_ids = token_type_ids  # the masked variant re-derives its masks from these
        return r

    def masked(self, x, language, vision):  # official: masks recomputed, boolean gather + index_put per call
        if self.inv is None:
            return language(x)
        vis = get_expert_mask(self.token_type_ids)  # (B, L)
        lang = ~vis
        lang_out = language(x[lang])
        out = lang_out.new_empty((*x.shape[:2], lang_out.shape[-1]))
        out[vis] = vision(x[vis])
        out[lang] = lang_out
        return out

    def dense(self, x, language, vision):  # both experts on all tokens, then select
        if self.inv is None:
            return language(x)
        b, n = x.shape[:2]
        vis = torch.zeros(b * n, dtype=torch.bool, device=x.device)
        vis[self.vis_idx] = True
        return torch.where(vis.view(b, n, 1), vision(x), language(x))

    cls.from_token_types = classmethod(from_token_types)
    cls.apply = {"routed": orig_apply, "masked": masked, "dense": dense}[mode]
    try:
        yield
    finally:
        cls.apply = orig_apply
        cls.from_token_types = classmethod(orig_from)


def bench_routing(model_gc, config, batch: dict[str, Any], runs: int) -> str:
    """Table 3: expert routing variants, forward (no grad) and a training step."""
    from finetune.token_types import get_expert_mask

    variants = {"dense: both experts on all tokens + torch.where": "dense",
                "masked: official style (masks re-derived per call)": "masked",
                "routed: kit (indices once per forward)": "routed"}

    def fwd(mode: str) -> None:
        with routing_mode(mode), torch.no_grad():
            model_gc(**batch)

    def step(mode: str) -> None:
        with routing_mode(mode):
            train_step(model_gc, batch)

    tf = interleaved_medians({k: (lambda m=m: fwd(m)) for k, m in variants.items()}, runs)
    steps = {k: (lambda m=m: step(m)) for k, m in variants.items()}
    ts = interleaved_medians(steps, runs)
    mem = {k: peak_alloc_bytes(fn) for k, fn in steps.items()}
    with torch.no_grad():  # same numbers from every variant (sanity check printed in the notes)
        losses = {}
        for k, m in variants.items():
            with routing_mode(m):
                torch.manual_seed(SEED)
                losses[k] = float(model_gc.eval()(**batch).loss)
        model_gc.train()
    spread = max(losses.values()) - min(losses.values())
    base = next(iter(variants))
    rows = [[k, ms(tf[k]), rel(tf[k], tf[base]), ms(ts[k]), rel(ts[k], ts[base]), mib(mem[k])] for k in variants]
    vis = int(get_expert_mask(batch["token_type_ids"]).sum())
    b, n = batch["input_ids"].shape
    notes = [f"batch {b}x{n}: {vis} of {b * n} positions ({vis / (b * n):.0%}) go to the vision expert "
             f"(CogVLM2-19B rows are ~75% image tokens: 2306 of ~3k)",
             f"train step = fwd+bwd with LoRA on experts and gradient checkpointing; eval loss max difference "
             f"between variants {spread:.1e} (same math)",
             "the official CogVLM/CogVLM2 code is the 'masked' row, not the dense one; with checkpointing on, the "
             "step's peak is set by the loss logits, so the dense variant's extra expert outputs do not show there"]
    return table("3. Expert routing", ["variant", "forward (no grad)", "vs dense", "train step", "vs dense",
                                         "train step peak memory"],
                 rows, notes)


def bench_checkpointing(model_gc, model_nogc, config, batch: dict[str, Any], runs: int) -> str:
    """Table 4: gradient checkpointing off (official demos) vs on (kit default)."""
    variants = {"off (official demos)": (model_nogc, False), "on (kit default, non-reentrant)": (model_gc, True),
                "off, lora_dropout 0 (formula check)": (build_model(config, False, dropout=0.0), False)}
    fns = {k: (lambda m=m: train_step(m, batch)) for k, (m, _) in variants.items()}
    t = interleaved_medians(fns, runs)
    mem = {k: peak_alloc_bytes(fn) for k, fn in fns.items()}
    est = {k: formula_activations(m, config, batch, gc) for k, (m, gc) in variants.items()}
    base = next(iter(variants))
    rows = [[k, ms(t[k]), rel(t[k], t[base]), mib(mem[k]), rel(mem[k], mem[base]), mib(est[k])] for k in variants]
    b, n = batch["input_ids"].shape
    n_lab = int((batch["labels"][:, 1:] != -100).sum())
    text = (n - config.image_tokens) * b
    notes = [f"one fwd+bwd step, batch {b}x{n}, {config.num_hidden_layers} decoder layers, LoRA on experts "
             "(lora_dropout 0.05 as in the recipes unless stated), `loss_only` on (default)",
             "formula = finetune/memory.py's activation + vision + logits rows for this batch shape in fp32 (the "
             "terms a CPU run can check; weights, optimizer and CUDA overhead are not part of a step's peak)",
             f"the formula's logits row assumes every text position is labelled ({text} here, "
             f"{mib(3 * text * config.vocab_size * 4)}); this batch has {n_lab} labels "
             f"({mib(3 * n_lab * config.vocab_size * 4)} for logits, softmax and gradient)"]
    return table("4. Gradient checkpointing", ["variant", "step time (median)", "time vs off", "peak step memory",
                                               "memory vs off", "formula (memory.py)"], rows, notes)


# ------------------------------------------------------------------------------------------------------------
# Analytic memory plan of the shipped recipes (full size, meta device)
# ------------------------------------------------------------------------------------------------------------

PLAN_MODELS = {  # recipe (+ overrides) -> reference config.json (shapes only)
    "cogvlm2-lora": "cogvlm2-llama3-chat-19B",
    "cogvlm2-lora train.gradient_checkpointing=false": "cogvlm2-llama3-chat-19B",
    "cogvlm2-qlora-24gb": "cogvlm2-llama3-chat-19B",
    "cogvlm2-vision-expert": "cogvlm2-llama3-chat-19B",
    "cogvlm-chat-lora": "cogvlm-chat-hf",
    "cogvlm-grounding-lora": "cogvlm-grounding-generalist-hf",
}


def memory_plans(config_dir: Path) -> str:
    """`cogtune targets`-equivalent memory plan of every shipped full-size recipe, as one markdown table."""
    from finetune.config import load_recipe
    from finetune.models.cogvlm.configuration import CogVLMConfig
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.targets import memory_plan_for, resolve_targets

    header = ["recipe", "model", "quant", "targets", "tokens/row", "GC", "weights", "trainable+optim",
              "activations", "logits", "overhead", "total (GiB)"]
    rows, models = [], {}
    for spec, ref in PLAN_MODELS.items():
        recipe, *overrides = spec.split()
        cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)
        if ref not in models:
            config = CogVLMConfig(**json.loads((config_dir / f"{ref}.config.json").read_text()))
            with torch.device("meta"):
                models[ref] = CogVLMForCausalLM(config)
        model = models[ref]
        _, matches, _ = resolve_targets(cfg.lora.targets, model)
        plan = memory_plan_for(model, cfg, [n for hit in matches.values() for n in hit])
        g = {k: sum(v for name, v, _ in plan.rows if name.startswith(k)) for k in
             ("weights", "trainable", "activations", "loss logits", "CUDA")}
        name = " ".join([recipe, *(f"`{o}`" for o in overrides)])
        rows.append([name, ref, cfg.quant.mode, ", ".join(cfg.lora.targets),
                     f"{cfg.train.per_device_train_batch_size}x{cfg.data.max_length}",
                     "on" if cfg.train.gradient_checkpointing else "off",
                     *(f"{g[k]:.1f}" for k in ("weights", "trainable", "activations", "loss logits", "CUDA")),
                     f"**{plan.total_gib:.1f}**"])
    return table("Analytic memory plan, shipped recipes at full size (ESTIMATE, not measured)", header, rows,
                 ["from finetune.targets.memory_plan_for on a meta-device model built from the reference "
                  "config.json (no weights); the same numbers `cogtune targets RECIPE` prints",
                  "bf16 weights (dtype auto on a GPU); per GPU; no GPU measurement backs these numbers yet"])


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------


def environment() -> str:
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:
        peft_v = "-"
    return (f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft_v}, python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 1 min on 2 cores)")
    parser.add_argument("--only", nargs="*", choices=["loss_only", "packing", "routing", "checkpointing"],
                        help="run only these tables")
    parser.add_argument("--runs", type=int, default=None, help="timed repetitions per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--plan", action="store_true", help="print the analytic full-size memory plan and exit")
    parser.add_argument("--config-dir", type=Path, default=REPO / "tests" / "assets" / "reference" / "configs",
                        help="folder of the reference config.json files (for --plan)")
    args = parser.parse_args(argv)
    if args.plan:
        print(memory_plans(args.config_dir))
        return 0
    setup = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.runs:
        setup.runs = args.runs
    only = set(args.only or ["loss_only", "packing", "routing", "checkpointing"])
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    config = small_config(setup)
    model_gc = build_model(config, gradient_checkpointing=True)
    model_nogc = build_model(config, gradient_checkpointing=False) if "checkpointing" in only else None
    rows_data = make_rows(config, setup.rows, text_range=setup.text_range)
    # The single-batch tables use the first micro-batch of the (unshuffled) data set, dynamically padded.
    batch = collator(config, setup.max_length)(rows_data[:setup.batch_rows])
    n_params = sum(p.numel() for p in model_gc.parameters())
    n_train = sum(p.numel() for p in model_gc.parameters() if p.requires_grad)
    print(f"## cogtune CPU benchmarks ({'quick' if args.quick else 'full'})\n")
    print(f"- environment: {environment()}")
    print(f"- model: CogVLM2-shaped, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads / {config.num_multi_query_heads} "
          f"KV heads, vocab {config.vocab_size}, vision 128 x 2 layers @ {IMAGE_SIZE} px -> {config.image_tokens} "
          f"image tokens; {n_params / 1e6:.1f}M params fp32, {n_train / 1e6:.2f}M trainable (LoRA r=16, experts)")
    print(f"- single-batch tables use batch {batch_shape(batch)}; timings: median of {setup.runs} after 1 warm-up, "
          "variants interleaved\n")
    train_step(model_gc, batch)  # process-level warm-up (first-call kernel selection, page faults)
    if "loss_only" in only:
        print(bench_loss_only(model_gc, config, batch, setup.runs))
    if "packing" in only:
        print(bench_packing(model_gc, config, rows_data, setup))
    if "routing" in only:
        print(bench_routing(model_gc, config, batch, setup.runs))
    if "checkpointing" in only:
        print(bench_checkpointing(model_gc, model_nogc, config, batch, setup.runs))
    print(f"_total wall time {time.perf_counter() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
