"""LoRA target presets resolved to anchored regexes, and the match report printed before training.

Each model class owns its presets (`target_spec`, a `TargetSpec`); this module only resolves them. Bare leaf
names are ambiguous in CogVLM (docs/architecture.md §19.8, docs/conventions.md §5): `gate_proj` matches the
language MLP, the vision MLP *and* the vision adapter's GLU; `dense` matches the vision tower. Every preset is a
`re.fullmatch` pattern anchored at `model.layers.N.` or `model.vision.`, and the union is handed to peft as one
string (peft full-matches a string `target_modules`).
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TargetSpec:
    """What a model family's LoRA targets are, owned by its model class (`CogVLMForCausalLM.target_spec`).

    presets: name -> anchored pattern (re.fullmatch against a module's dotted name).
    groups: shorthands that expand to several presets.
    save_presets: modules_to_save names -> full dotted module names (peft matches modules_to_save by suffix,
        so `linear_proj` alone would also hit the GLU's inner linear).
    components: (label, pattern) rows of the parameter table, first match wins.
    gradient_free_in_last_layer: modules of the LAST decoder layer whose LoRA could never train (pattern after
        `model.layers.N.`), or "" when there are none.
    refused: target names (presets or groups of other families) that cannot apply to this one -> the reason.
    """

    presets: dict[str, str]
    groups: dict[str, list[str]] = field(default_factory=dict)
    save_presets: dict[str, str] = field(default_factory=dict)
    components: list[tuple[str, str]] = field(default_factory=list)
    gradient_free_in_last_layer: str = ""
    refused: dict[str, str] = field(default_factory=dict)  # target names refused, with the reason
    # Prefix (pattern) of a stack of numbered blocks whose LAST block is built but never run (CogAgent's cross
    # tower): LoRA there could never train either. "" when there is none.
    never_run_last_block: str = ""


def spec_of(model: Any) -> TargetSpec:
    """The target spec of a model (a PeftModel's base model too)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    spec = getattr(base, "target_spec", None)
    if spec is None:
        raise ValueError(f"{type(base).__name__} declares no LoRA target presets (a `target_spec` class attribute)")
    return spec


def expand(targets: Iterable[str], spec: TargetSpec) -> list[str]:
    """Group names -> preset names; presets and regexes pass through (order kept, duplicates dropped)."""
    out: list[str] = []
    for t in targets:
        for name in spec.groups.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def target_pattern(target: str, spec: TargetSpec) -> str:
    """A preset's pattern, or the user's own regex (checked to compile)."""
    if target in spec.presets:
        return spec.presets[target]
    try:
        re.compile(target)
    except re.error as err:
        raise ValueError(f"lora.targets: {target!r} is neither a preset ({', '.join(spec.presets)}) "
                         f"nor a valid regex: {err}") from None
    return target


def gradient_free(names: Iterable[str], spec: TargetSpec) -> list[str]:
    """Modules whose LoRA could never train. For CogVLM: the LAST decoder layer's vision-expert dense and MLP.

    They only transform image positions of the last layer, whose outputs feed nothing but the logits
    at image positions, and those are always labelled -100 (attention reads the layer's *input*).
    """
    names = list(names)
    patterns = []
    layers = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    if spec.gradient_free_in_last_layer and layers:
        patterns.append(rf"model\.layers\.{max(layers)}\.(?:{spec.gradient_free_in_last_layer})")
    blocks = [int(m.group(1)) for n in names if spec.never_run_last_block
              and (m := re.match(spec.never_run_last_block + r"(\d+)\.", n))]
    if blocks:
        patterns.append(spec.never_run_last_block + rf"{max(blocks)}\..*")
    return [n for n in names if any(re.fullmatch(p, n) for p in patterns)]


def resolve_targets(targets: Iterable[str], model: Any) -> tuple[str, dict[str, list[str]], list[str]]:
    """(fullmatch regex for peft, target -> matched module names, matched-but-skipped names).

    Presets come from the model class (`spec_of`); matches are restricted to modules LoRA can wrap. Modules
    that can never receive a gradient (`gradient_free`) are left out of the regex and returned as skipped.
    Zero matches for any target is an error naming the nearest module names. Works on a meta-device model.
    """
    spec = spec_of(model)
    candidates = linear_module_names(model)
    dead = set(gradient_free(candidates, spec))
    matches: dict[str, list[str]] = {}
    skipped: list[str] = []
    problems = []
    for target in expand(targets, spec):
        if target in spec.refused:  # a name other families use that cannot apply here, and why
            problems.append(f"lora.targets: {target!r}: {spec.refused[target]}")
            continue
        pattern = target_pattern(target, spec)
        hit = [n for n in candidates if re.fullmatch(pattern, n)]
        skipped += [n for n in hit if n in dead and n not in skipped]
        matches[target] = [n for n in hit if n not in dead]
        if not hit:
            near = difflib.get_close_matches(target, candidates, n=5, cutoff=0.0)
            kind = "preset" if target in spec.presets else "regex"
            problems.append(f"lora.targets: {kind} {target!r} matches no module of this model (patterns must "
                            f"match the full module name, re.fullmatch); nearest module names: {', '.join(near)}. "
                            f"Presets: {', '.join([*spec.presets, *spec.groups])}")
    if problems:
        raise ValueError("\n".join(problems))
    union = "|".join(f"(?:{target_pattern(t, spec)})" for t in matches)
    exclude = "|".join(re.escape(n) for n in skipped)
    combined = f"(?!(?:{exclude})$)(?:{union})" if exclude else union
    return combined, matches, skipped


def resolve_modules_to_save(names: Iterable[str], model: Any) -> list[str]:
    """modules_to_save presets of the model's family -> full dotted module names (other names pass through)."""
    save = spec_of(model).save_presets
    return [save.get(n, n) for n in names]


def component_of(param_name: str, spec: TargetSpec) -> str:
    for label, pattern in spec.components:
        if re.fullmatch(pattern, param_name) or re.fullmatch(pattern, param_name.rsplit(".", 1)[0]):
            return label
    return "other"


def parameter_table(model, matched: Iterable[str], r: int, modules_to_save: Iterable[str] = ()) -> str:
    """Per-component table of frozen base parameters and the trainable parameters the adapter adds.

    Works on a meta-device model: only shapes are read.
    """
    import math

    import torch.nn as nn

    spec = spec_of(model)
    matched = set(matched)
    save = list(modules_to_save)
    rows: dict[str, list[int]] = {}  # label -> [base params, lora params, fully trained params, lora modules]
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        label = component_of(name, spec)
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
            row = rows.setdefault(component_of(name + ".weight", spec), [0, 0, 0, 0])
            row[1] += r * (mod.in_features + mod.out_features)
            row[3] += 1
    lines = [f"{'component':<38}{'frozen':>16}{'LoRA modules':>14}{'LoRA params':>14}{'full-trained':>14}"]
    tot = [0, 0, 0, 0]
    order = [label for label, _ in spec.components] + ["other"]
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
    lora, full = trainable_counts(model, matched, cfg.lora.r, resolve_modules_to_save(modules, model) + params)
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
                     f"only feed image-position logits, which carry no loss; CogAgent's last cross-tower block is "
                     f"never run): {', '.join(skipped)}")
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
        _, matches, skipped = resolve_targets(cfg.lora.targets, model)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    print(match_report(matches, skipped))
    matched = [n for hit in matches.values() for n in hit]
    from .extra_params import split_modules_to_save

    modules, params = split_modules_to_save(cfg.lora.modules_to_save)
    print(parameter_table(model, matched, cfg.lora.r, resolve_modules_to_save(modules, model) + params))
    print(memory_plan_for(model, cfg, matched, world=world, engine=engine))
    return 0
