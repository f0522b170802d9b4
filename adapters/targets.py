"""LoRA target presets resolved to anchored regexes, and the match report printed before training.

Bare leaf names are ambiguous in CogVLM (docs/architecture.md §19.8, docs/conventions.md §5): `gate_proj` matches the
language MLP, the vision MLP *and* the vision adapter's GLU; `dense` matches the vision tower. Every
preset here is a `re.fullmatch` pattern anchored at `model.layers.N.` or `model.vision.`, and the
union is handed to peft as one string (peft full-matches a string `target_modules`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable

_LAYER = r"model\.layers\.\d+\."

# preset -> anchored pattern (re.fullmatch against the module's dotted name)
PRESETS: dict[str, str] = {
    "language_expert_attn": _LAYER + r"self_attn\.language_expert_(?:query_key_value|dense)",
    "vision_expert_attn": _LAYER + r"self_attn\.vision_expert_(?:query_key_value|dense)",
    "language_expert_mlp": _LAYER + r"mlp\.language_mlp\.(?:gate|up|down)_proj",
    "vision_expert_mlp": _LAYER + r"mlp\.vision_mlp\.(?:gate|up|down)_proj",
    "vision_tower": r"model\.vision\.transformer\.layers\.\d+\.(?:attention\.(?:query_key_value|dense)|mlp\.fc[12])",
    "glu_adapter": r"model\.vision\.linear_proj\.(?:linear_proj|gate_proj|dense_h_to_4h|dense_4h_to_h)",
}
# Shorthands that expand to several presets.
GROUPS: dict[str, list[str]] = {
    "language_expert": ["language_expert_attn", "language_expert_mlp"],
    "vision_expert": ["vision_expert_attn", "vision_expert_mlp"],
    "experts": ["language_expert_attn", "language_expert_mlp", "vision_expert_attn", "vision_expert_mlp"],
}
# modules_to_save presets: trained fully and saved with the adapter (boi_eoi: see extra_params.py). Full
# dotted names, because peft matches modules_to_save by suffix and `linear_proj` alone would also hit the
# GLU's inner linear.
SAVE_PRESETS: dict[str, str] = {
    "glu_adapter": "model.vision.linear_proj",
    "embed_tokens": "model.embed_tokens",
    "lm_head": "lm_head",
}

# Components for the parameter table, first match wins.
COMPONENTS: list[tuple[str, str]] = [
    ("language expert attn", PRESETS["language_expert_attn"]),
    ("language expert mlp", PRESETS["language_expert_mlp"]),
    ("vision expert attn", PRESETS["vision_expert_attn"]),
    ("vision expert mlp", PRESETS["vision_expert_mlp"]),
    ("vision tower", r"model\.vision\.(?:transformer|patch_embedding)\..*"),
    ("vision adapter (conv, GLU, boi/eoi)", r"model\.vision\.(?:conv|linear_proj|boi|eoi).*"),
    ("embeddings + lm_head", r"(?:model\.embed_tokens|lm_head)\..*"),
    ("norms", r"model\.(?:layers\.\d+\.\w+_layernorm|norm)\..*"),
]


def expand(targets: Iterable[str]) -> list[str]:
    """Group names -> preset names; presets and regexes pass through (order kept, duplicates dropped)."""
    out: list[str] = []
    for t in targets:
        for name in GROUPS.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def target_pattern(target: str) -> str:
    """A preset's pattern, or the user's own regex (checked to compile)."""
    if target in PRESETS:
        return PRESETS[target]
    try:
        re.compile(target)
    except re.error as err:
        raise ValueError(f"lora.targets: {target!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a valid regex: {err}") from None
    return target


def gradient_free(names: Iterable[str]) -> list[str]:
    """Modules whose LoRA could never train: the LAST decoder layer's vision-expert dense and MLP.

    They only transform image positions of the last layer, whose outputs feed nothing but the logits
    at image positions, and those are always labelled -100 (attention reads the layer's *input*).
    """
    names = list(names)
    layers = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    if not layers:
        return []
    last = max(layers)
    dead = rf"model\.layers\.{last}\.(?:self_attn\.vision_expert_dense|mlp\.vision_mlp\.(?:gate|up|down)_proj)"
    return [n for n in names if re.fullmatch(dead, n)]


def resolve_targets(targets: Iterable[str], module_names: Iterable[str],
                    linear_names: Iterable[str] | None = None) -> tuple[str, dict[str, list[str]], list[str]]:
    """(fullmatch regex for peft, target -> matched module names, matched-but-skipped names).

    `linear_names` (defaults to all names) restricts matches to modules LoRA can wrap. Modules that
    can never receive a gradient (`gradient_free`) are left out of the regex and returned as skipped.
    Zero matches for any target is an error naming the nearest module names.
    """
    names = list(module_names)
    candidates = list(linear_names) if linear_names is not None else names
    dead = set(gradient_free(candidates))
    matches: dict[str, list[str]] = {}
    skipped: list[str] = []
    problems = []
    for target in expand(targets):
        pattern = target_pattern(target)
        hit = [n for n in candidates if re.fullmatch(pattern, n)]
        skipped += [n for n in hit if n in dead and n not in skipped]
        matches[target] = [n for n in hit if n not in dead]
        if not hit:
            near = difflib.get_close_matches(target, candidates, n=5, cutoff=0.0)
            kind = "preset" if target in PRESETS else "regex"
            problems.append(f"lora.targets: {kind} {target!r} matches no module of this model (patterns must "
                            f"match the full module name, re.fullmatch); nearest module names: {', '.join(near)}. "
                            f"Presets: {', '.join([*PRESETS, *GROUPS])}")
    if problems:
        raise ValueError("\n".join(problems))
    union = "|".join(f"(?:{target_pattern(t)})" for t in matches)
    exclude = "|".join(re.escape(n) for n in skipped)
    combined = f"(?!(?:{exclude})$)(?:{union})" if exclude else union
    return combined, matches, skipped


def resolve_modules_to_save(names: Iterable[str]) -> list[str]:
    return [SAVE_PRESETS.get(n, n) for n in names]


def component_of(param_name: str) -> str:
    for label, pattern in COMPONENTS:
        if re.fullmatch(pattern, param_name) or re.fullmatch(pattern, param_name.rsplit(".", 1)[0]):
            return label
    return "other"


def parameter_table(model, matched: Iterable[str], r: int, modules_to_save: Iterable[str] = ()) -> str:
    """Per-component table of frozen base parameters and the trainable parameters the adapter adds.

    Works on a meta-device model: only shapes are read.
    """
    import math

    import torch.nn as nn

    matched = set(matched)
    save = list(modules_to_save)
    rows: dict[str, list[int]] = {}  # label -> [base params, lora params, fully trained params, lora modules]
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        label = component_of(name)
        row = rows.setdefault(label, [0, 0, 0, 0])
        owner = name.rsplit(".", 1)[0]
        qs = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: two 4-bit weights per stored element
        numel = math.prod(qs.shape) if type(p).__name__ == "Params4bit" and qs is not None else p.numel()
        if any(owner == s or owner.startswith(s + ".") or name == s for s in save):
            row[2] += numel
        else:
            row[0] += numel
    for name in matched:
        mod = modules[name]
        if isinstance(mod, nn.Linear) or hasattr(mod, "in_features"):
            row = rows.setdefault(component_of(name + ".weight"), [0, 0, 0, 0])
            row[1] += r * (mod.in_features + mod.out_features)
            row[3] += 1
    lines = [f"{'component':<38}{'frozen':>16}{'LoRA modules':>14}{'LoRA params':>14}{'full-trained':>14}"]
    tot = [0, 0, 0, 0]
    order = [label for label, _ in COMPONENTS] + ["other"]
    for label, (base, lora, full, n) in sorted(rows.items(), key=lambda kv: order.index(kv[0])):
        lines.append(f"{label:<38}{base:>16,}{n:>14,}{lora:>14,}{full:>14,}")
        tot = [a + b for a, b in zip(tot, (base, lora, full, n))]
    lines.append(f"{'total':<38}{tot[0]:>16,}{tot[3]:>14,}{tot[1]:>14,}{tot[2]:>14,}")
    trainable = tot[1] + tot[2]
    share = 100 * trainable / max(1, tot[0] + trainable)
    lines.append(f"trainable: {trainable:,} of {tot[0] + trainable:,} ({share:.3f}%)")
    return "\n".join(lines)


def trainable_counts(model, matched: Iterable[str], r: int, modules_to_save: Iterable[str] = ()) -> tuple[int, int]:
    """(LoRA parameters the adapter adds, parameters trained fully via modules_to_save)."""
    modules = dict(model.named_modules())
    lora = sum(r * (modules[n].in_features + modules[n].out_features) for n in matched)
    save = list(modules_to_save)
    full = sum(p.numel() for n, p in model.named_parameters()
               if any(n.startswith(s + ".") or n == s for s in save))
    return lora, full


def memory_plan_for(model, cfg, matched: list[str], world: int = 1, engine: str = "none"):
    """The recipe's memory plan (finetune/memory.py) for this model's shapes, on `world` GPUs under `engine`."""
    from finetune.loading import resolve_dtype
    from finetune.memory import plan_memory

    from .extra_params import split_modules_to_save

    modules, params = split_modules_to_save(cfg.lora.modules_to_save)
    lora, full = trainable_counts(model, matched, cfg.lora.r, resolve_modules_to_save(modules) + params)
    dtype = str(resolve_dtype(cfg.model.dtype)).replace("torch.", "")
    if cfg.model.dtype == "auto":
        dtype = "bfloat16"  # what a GPU run uses; CPU runs are fp32 and far from memory limits
    modules = dict(model.named_modules())
    in_features = sum(modules[n].in_features for n in matched)
    return plan_memory(model, cfg, lora, full, dtype, lora_in_features=in_features, world=world, engine=engine)


def match_report(matches: dict[str, list[str]], skipped: Iterable[str] = ()) -> str:
    """One line per target: how many modules, and an example name; then what was skipped and why."""
    lines = []
    for target, hit in matches.items():
        example = hit[0] if hit else "-"
        lines.append(f"  {target:<24} {len(hit):>5} modules   e.g. {example}")
    skipped = list(skipped)
    if skipped:
        lines.append(f"  skipped {len(skipped)} module(s) that can never train (last layer's vision-expert dense/MLP "
                     f"only feed image-position logits, which carry no loss): {', '.join(skipped)}")
    return "\n".join(lines)


def linear_module_names(model) -> list[str]:
    import torch.nn as nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"
            or type(m).__name__ == "Linear8bitLt"]


def main(argv: list[str]) -> int:
    """`cogtune targets RECIPE [k=v ...] [--gpus N --engine fsdp]`: matched modules, parameter table and the
    per-GPU memory plan, on a meta-device model."""
    from finetune.config import parse_recipe_args
    from finetune.distributed import split_plan_args

    try:
        argv, world, engine = split_plan_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, cfg = parse_recipe_args(argv, "cogtune targets", "show what a recipe's LoRA targets match")
    from finetune.loading import build_meta_model

    try:
        model = build_meta_model(cfg.model.checkpoint_dir)
    except (ValueError, FileNotFoundError) as err:  # missing/mistyped folder, not a CogVLM config
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        _, matches, skipped = resolve_targets(cfg.lora.targets, [n for n, _ in model.named_modules()],
                                              linear_module_names(model))
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(match_report(matches, skipped))
    matched = [n for hit in matches.values() for n in hit]
    from .extra_params import split_modules_to_save

    modules, params = split_modules_to_save(cfg.lora.modules_to_save)
    print(parameter_table(model, matched, cfg.lora.r, resolve_modules_to_save(modules) + params))
    print(memory_plan_for(model, cfg, matched, world=world, engine=engine))
    return 0
