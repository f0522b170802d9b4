"""A memory plan before training: will this recipe fit on this card?

An analytic estimate from the module shapes (a meta-device model, no weights) and the recipe: weights at
their stored precision (nf4/int8 for the quantized language-model linears), trainable parameters with
gradients and optimizer state, activations kept for backward (per layer, or per layer input with gradient
checkpointing, where backward's peak is the larger of the loss phase and one recomputed layer), the loss
logits, and a fixed CUDA/allocator overhead. Calibrated against measured CPU training steps (fp32, real
LoRA / nf4 QLoRA steps, `bench/calibrate_memory.py`, table in docs/benchmarks.md: within ±20% at every grid
point, kept there by tests/test_memory.py); not yet checked on a GPU at full size.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes nf4/fp4: 4 bits + one fp32 absmax per 64 weights; double quantization stores the absmax
# in 8 bits with an fp32 scale per 256 blocks.
_NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
_CUDA_OVERHEAD_GIB = 0.8  # context, cuBLAS workspace, allocator slack at small batch
# How several GPUs share the training state (finetune/distributed.py ships one accelerate config per engine).
_ENGINES = ("none", "ddp", "zero2", "zero2-offload", "zero3", "zero3-offload", "fsdp", "fsdp-offload")


@dataclass
class MemoryPlan:
    rows: list[tuple[str, float, str]]  # (item, GiB, how it was counted)
    where: str = "per GPU"

    @property
    def total_gib(self) -> float:
        return sum(g for _, g, _ in self.rows)

    def __str__(self) -> str:
        lines = [f"{f'memory plan (estimate, {self.where})':<34}{'GiB':>8}  basis"]
        lines += [f"{name:<34}{gib:>8.2f}  {basis}" for name, gib, basis in self.rows]
        lines.append(f"{'total':<34}{self.total_gib:>8.2f}")
        return "\n".join(lines)


def quantized_weight_names(model) -> set[str]:
    """Weights bitsandbytes quantizes: every Linear's weight outside the model class's `full_precision_modules`."""
    import torch.nn as nn

    keep = tuple(getattr(type(model), "full_precision_modules", ()))
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(name == k or name.startswith(k + ".") for k in keep)}


def plan_memory(model, cfg, trainable_lora: int, trainable_full: int, dtype_name: str,
                lora_in_features: int = 0, on_gpu: bool = True, world: int = 1, engine: str = "none") -> MemoryPlan:
    """Estimate peak training memory for `cfg` on `model` (real or meta device; only shapes are read).

    `lora_in_features`: summed input width of the LoRA-wrapped linears; with lora_dropout > 0 peft keeps each
    one's dropped-out input for backward (measured: about a third of the activations, docs/benchmarks.md).
    `on_gpu=False`: a CPU run's plan (host memory, no CUDA context).
    `world`, `engine`: the number of GPUs and how they share the state (docs/distributed.md): none/ddp keep
    everything on every GPU; zero2 shards gradients and optimizer state; zero3/fsdp shard weights too and
    gather one wrap unit (decoder or vision layer) at a time; *-offload keep the sharded state in CPU RAM.
    """
    if engine not in _ENGINES:
        raise ValueError(f"engine {engine!r}: use one of {', '.join(_ENGINES)}")
    n = max(1, int(world)) if engine != "none" else 1
    shard_weights = engine.startswith(("zero3", "fsdp"))
    shard_state = engine.startswith(("zero", "fsdp"))
    offload = engine.endswith("-offload")
    host: list[str] = []  # what an offload engine keeps in CPU RAM instead
    c = model.config
    act = _BYTES.get(dtype_name, 2)
    quant = cfg.quant.mode
    quant_params = other_params = released = 0
    quantized = quantized_weight_names(model) if quant != "none" else set()
    # data.feature_cache (not streaming): every image is cached before training and the frozen tower's weights
    # (the GLU's too when it is frozen) are released (finetune/feature_cache.py).
    cached = bool(getattr(cfg.data, "feature_cache", None)) and not cfg.data.streaming
    glu_trains = "glu_adapter" in cfg.lora.targets or "glu_adapter" in cfg.lora.modules_to_save
    cross_trains = "cross_tower" in cfg.lora.targets or "cross_tower" in cfg.lora.modules_to_save
    cached_prefixes = ("model.vision.patch_embedding.", "model.vision.transformer.", "model.vision.conv.") + (
        () if glu_trains else ("model.vision.linear_proj.",)) + (
        () if cross_trains else ("model.cross_vision.vit.",))  # CogAgent's frozen cross tower has its own cache
    for name, p in model.named_parameters():
        if cached and name.startswith(cached_prefixes):
            released += p.numel()
        elif name in quantized:
            quant_params += p.numel()
        else:
            other_params += p.numel()
    rows: list[tuple[str, float, str]] = []
    # sharded weights: 1/n per GPU (none with offload: the shard lives in CPU RAM and streams in per unit)
    w_share, w_note = (1.0, "") if not shard_weights else ((0.0, f", 1/{n} shard in CPU RAM") if offload
                                                           else (1 / n, f", 1/{n} shard"))
    qb = 0.0
    if quant in ("nf4", "fp4"):
        qb = _NF4_BYTES[cfg.quant.bnb_4bit_use_double_quant]
        rows.append(("weights: LM linears (4-bit)", quant_params * qb * w_share / GIB,
                     f"{quant_params / 1e9:.2f}B x {qb:.3f} B{w_note}"))
    elif quant == "int8":
        qb = 1.0
        rows.append(("weights: LM linears (int8)", quant_params * 1.0 * w_share / GIB,
                     f"{quant_params / 1e9:.2f}B x 1 B{w_note}"))
    rows.append((f"weights: rest ({dtype_name})", other_params * act * w_share / GIB,
                 f"{other_params / 1e9:.2f}B x {act} B{w_note}"))
    if cached:
        rows.append(("weights: vision tower (feature cache)", 0.0, f"{released / 1e9:.2f}B released: every image "
                     "is cached before training"))
    if offload and shard_weights:
        host.append(f"weights {(quant_params * qb + other_params * act) / n / GIB:.2f}")
    if shard_weights:
        unit, tail = _largest_unit_bytes(model, act, qb if quant != "none" else 0.0, quantized)
        rows.append(("weights: gathered units", max(2 * unit, tail + unit) / GIB,
                     f"max(2 wrap units (the running one + the prefetched one) of {unit / GIB:.2f} GiB, lm_head+norm "
                     f"{tail / GIB:.2f} GiB + 1 unit), whole, while they run"))
    state = 2 if "8bit" in cfg.train.optim else 8
    trainable = trainable_lora + trainable_full
    per = 4 + 4 + state  # fp32 weight + grad + optimizer state
    if not shard_state:
        rows.append(("trainable: weights+grads+optimizer", trainable * per / GIB,
                     f"{trainable / 1e6:.1f}M x {per} B ({cfg.train.optim})"))
        if engine == "ddp":
            rows.append(("trainable: DDP gradient buckets", trainable * 4 / GIB, "a second fp32 gradient copy"))
    else:
        weight = 0 if offload and shard_weights else (4 / n if shard_weights else 4)
        on_gpu_bytes = weight + (0 if offload else (4 + state) / n)
        what = ((f"weight/{n}" if weight and shard_weights else "weight" if weight else "weight shard")
                + (" + grads+optimizer in CPU RAM" if offload else f" + (grad + optimizer)/{n}"))
        rows.append(("trainable: weights+grads+optimizer", trainable * on_gpu_bytes / GIB,
                     f"{trainable / 1e6:.1f}M x {on_gpu_bytes:.2f} B ({what}; {cfg.train.optim})"))
        if offload:
            host.append(f"grads+optimizer {trainable * (4 + state) / n / GIB:.2f}")
    if trainable_full:
        rows.append(("modules_to_save: frozen copies", trainable_full * act * w_share / GIB,
                     "peft keeps the original" + w_note))

    b, seq = cfg.train.per_device_train_batch_size, cfg.data.max_length
    h, i, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    gc = cfg.train.gradient_checkpointing
    tokens = b * seq
    # One decoder layer's saved tensors per token: norm outputs, QKV, attention output, dense input,
    # expert gather/scatter copies (~10 H), MLP gate/up/activation/product (4 I); SDPA keeps no L x L matrix.
    per_layer = tokens * (10 * h + 4 * i) * act
    # peft keeps each LoRA layer's dropped-out input for backward; upper bound: every token counted for every
    # wrapped linear (an expert's LoRA sees only its own tokens). Measured: ~a third of the activations.
    dropout = tokens * lora_in_features * act if cfg.lora.lora_dropout > 0 and lora_in_features else 0
    # CogVLM2-Video: a row holds num_frames frames of image_tokens each, and the tower sees every frame
    # (docs/architecture.md §21).
    frames = 1 if getattr(c, "vision_expert", True) else (cfg.data.num_frames or 24)
    answer = max(1, seq - frames * c.image_tokens) * b  # label positions at most: the text part of each row
    # A plain lm_head runs through linear_cross_entropy: one (N, V) fp32 buffer (the chunks' exponentials) lives
    # from the loss to its backward. A wrapped head (LoRA or modules_to_save on lm_head) goes through
    # F.cross_entropy: logits, log-softmax and their gradient.
    head_wrapped = "lm_head" in cfg.lora.modules_to_save or any("lm_head" in t for t in cfg.lora.targets)
    copies = 3 if head_wrapped else 1
    logits = answer * c.vocab_size * 4 * copies
    logits_basis = (f"<= {answer} positions x V={c.vocab_size} x fp32 x "
                    + ("3 (logits, log-softmax, grad; lm_head wrapped)" if head_wrapped
                       else "1 (chunked loss: exponentials only)"))
    if gc:
        # Only the layer inputs stay between forward and backward. Backward first runs the loss (logits live),
        # frees them, then recomputes one layer at a time: the peak is the larger of those two phases
        # (calibrated on CPU, bench/calibrate_memory.py), not their sum.
        rows.append(("activations: decoder", n_layers * tokens * h * act / GIB,
                     f"{n_layers} layer inputs (checkpointing), {b}x{seq} tokens"))
        layer = per_layer + dropout / n_layers + 2 * tokens * h * act  # + the gradients flowing in and out
        if layer > logits:
            rows.append(("activations: 1 layer recomputed", layer / GIB,
                         f"(12H + 4I) + LoRA dropout inputs per token; the loss logits ({logits / GIB:.2f} GiB) "
                         "are freed before it"))
            rows.append(("loss logits (labelled positions)", 0.0, "freed before the larger recompute phase"))
        else:
            rows.append(("activations: 1 layer recomputed", 0.0,
                         f"{layer / GIB:.2f} GiB, after the loss logits are freed (the larger phase)"))
            rows.append(("loss logits (labelled positions)", logits / GIB, logits_basis))
    else:
        rows.append(("activations: decoder", n_layers * per_layer / GIB,
                     f"{n_layers} layers x (10H + 4I) per token, {b}x{seq} tokens"))
        if dropout:
            rows.append(("activations: LoRA dropout inputs", dropout / GIB, "every wrapped linear (upper bound)"))
        rows.append(("loss logits (labelled positions)", logits / GIB, logits_basis))
    vc = c.vision_config
    n_img = (vc["image_size"] // vc["patch_size"]) ** 2 + 1
    vision_layer = b * frames * n_img * (6 * vc["hidden_size"] + 2 * vc["intermediate_size"]) * act
    if cached:
        rows.append(("activations: vision tower", 0.0, "feature cache: the tower does not run"))
    elif any(t in ("vision_tower", "glu_adapter") for t in cfg.lora.targets):
        kept = (1 if gc else vc["num_hidden_layers"]) * vision_layer
        rows.append(("activations: vision tower", kept / GIB,
                     "one layer (checkpointing)" if gc else "all layers kept (LoRA in the tower)"))
    else:
        # A frozen tower saves nothing for backward: one layer is live during the forward, before any decoder
        # activation exists, so it only counts where it exceeds the decoder phase.
        decoder = sum(g for name, g, _ in rows if name.startswith(("activations", "loss"))) * GIB
        rows.append(("activations: vision tower", max(0.0, vision_layer - decoder) / GIB,
                     f"frozen: one layer live ({vision_layer / GIB:.2f} GiB) before the decoder runs"))
    if hasattr(c, "cross_vision_config"):  # CogAgent's high-res cross branch
        from .models.cogagent.configuration import cross_memory_rows

        rows += cross_memory_rows(c, list(cfg.lora.targets), b, act, gc)
    if on_gpu:
        rows.append(("CUDA context + allocator slack", _CUDA_OVERHEAD_GIB, "fixed"))
    if host:
        rows.append(("offloaded (CPU RAM, not on the GPU)", 0.0, "per process, GiB: " + ", ".join(host)))
    where = "per GPU" if on_gpu else "CPU RAM"
    if engine != "none":
        where += f", {engine} x{n}"
    return MemoryPlan(rows, where)


def _largest_unit_bytes(model, act: int, quant_bytes: float, quantized: set[str]) -> tuple[float, float]:
    """(largest FSDP/ZeRO-3 wrap unit: one decoder or vision layer, whole; lm_head + final norm) in bytes."""
    unit = 0.0
    classes = model._no_split_modules  # what accelerate's auto-wrap splits on (a PeftModel forwards it)
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            size = 0.0
            for pname, p in module.named_parameters():
                full = f"{name}.{pname}"
                size += p.numel() * (quant_bytes if full in quantized else act)
            unit = max(unit, size)
    tail = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("lm_head.", "model.norm."))) * act
    return unit, tail
