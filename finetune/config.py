"""Recipes: YAML that maps 1:1 onto typed dataclasses, strictly (style guide §9.1–9.4).

A recipe is `RunConfig{model, data, lora, quant, train, eval, output}`. Loading walks the YAML and
the dataclasses together: an unknown key is an error naming its dotted path and the nearest valid
key; a wrong type is an error naming the expected type. Every problem is collected before raising.
`key=value` overrides use the same dotted names and go through the same checks. Defaults live only
here. Names under `lora`/`quant`/`train` are peft's, bitsandbytes' and transformers' own names.

This module never imports torch, so `cogtune config/check --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" is the dataclasses metadata name
    """A field with its documentation; the doc is printed by `cogtune config` as a YAML comment."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelSection:
    checkpoint_dir: str = _f("", "folder of an official-layout checkpoint (config.json + safetensors)")
    tokenizer_dir: str | None = _f(None, "tokenizer folder when the checkpoint has none (CogVLM1: Vicuna-7B v1.5)")
    family: str | None = _f(None, "family preset name (finetune/families.py); checked against config.json if set")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "weights/compute dtype; auto = bfloat16 on GPUs that have it, float32 on CPU")


@dataclass
class DataSection:
    train_path: str = _f("", "cogtune JSONL (see data_formats/README.md; `cogtune convert` makes one)")
    eval_path: str | None = _f(None, "held-out JSONL for eval loss and generation eval")
    image_root: str | None = _f(None, "folder relative image paths are resolved against (default: the JSONL's folder)")
    template_version: str | None = _f(None, "prompt template (base/chat/vqa; CogAgent chat_old); None = config.json's")
    max_length: int = _f(2048, "tokens per row, image span included; longer rows drop oldest turns, then the row")
    last_turn_only: bool = _f(False, "loss on the last assistant turn only (default: every assistant turn)")
    packing: bool = _f(False, "pack several rows into one sequence (padding-free, block-diagonal attention)")
    allow_multi_image: bool = _f(False, "let a row carry several <image> spans (beyond what official models saw)")
    skip_invalid: bool = _f(False, "skip rows that fail validation (counted and reported) instead of stopping")
    allow_outside_images: bool = _f(False, "accept image paths outside the data root (JSONL folder or image_root)")
    streaming: bool = _f(False, "read the training file lazily (huge files); needs train.max_steps > 0")
    num_workers: int = _f(2, "DataLoader workers that decode and resize images")


@dataclass
class LoraSection:
    targets: list[str] = _f(["language_expert_attn", "vision_expert_attn"],
                            "presets (adapters/targets.py) or full-name regexes, matched with re.fullmatch")
    r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA")
    use_rslora: bool = _f(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    init_lora_weights: bool | Literal["gaussian", "pissa", "olora"] = _f(
        True, "true (B = 0), gaussian, pissa or olora initialisation")
    modules_to_save: list[str] = _f(
        [], "train fully and save: presets glu_adapter, boi_eoi, embed_tokens, lm_head, or module names")
    loraplus_lr_ratio: float | None = _f(None, "LoRA+: learning rate of B = ratio x that of A (e.g. 16)")


@dataclass
class QuantSection:
    mode: Literal["none", "nf4", "fp4", "int8"] = _f("none", "quantize the language-model linears (QLoRA)")
    bnb_4bit_use_double_quant: bool = _f(True, "quantize the 4-bit scales too (saves ~0.4 bit/param)")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "compute dtype of 4-bit matmuls; auto = model.dtype")


@dataclass
class TrainSection:
    learning_rate: float = _f(2e-4, "peak learning rate")
    num_train_epochs: float = _f(1.0, "epochs (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps; -1 = use num_train_epochs")
    per_device_train_batch_size: int = _f(1, "rows (or packed sequences) per device per micro-step")
    gradient_accumulation_steps: int = _f(8, "micro-steps per optimizer step")
    warmup_steps: float = _f(0.03, "linear warm-up: steps, or a fraction of all steps when < 1")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f("cosine", "schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    optim: Literal["adamw_torch", "paged_adamw_8bit", "adamw_8bit"] = _f("adamw_torch", "optimizer")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward (decoder and vision layers)")
    seed: int = _f(42, "random seed")
    logging_steps: int = _f(10, "log every N optimizer steps")
    save_steps: int = _f(200, "checkpoint every N optimizer steps")
    save_total_limit: int = _f(3, "keep at most N checkpoints")
    report_to: list[str] = _f(["tensorboard"], "loggers: tensorboard, wandb, none ...")
    resume: str | None = _f(None, "'auto' = latest checkpoint in output.dir, or a checkpoint folder")
    skip_nonfinite: bool = _f(True, "skip (and count) micro-batches whose loss is NaN/inf instead of stepping")
    max_nonfinite_steps: int = _f(10, "stop with an error once this many micro-batches in a row had a NaN/inf loss "
                                  "(the run diverged); no adapter is saved")


@dataclass
class EvalSection:
    eval_steps: int = _f(0, "evaluate every N steps; 0 = only at the end")
    generation_rows: int = _f(16, "held-out rows scored by generation (exact match / IoU@0.5)")
    max_new_tokens: int = _f(32, "generation length for generation eval")
    log_predictions: int = _f(4, "predictions printed and saved at each generation eval")


@dataclass
class OutputSection:
    dir: str = _f("out/run", "run folder: adapter/, checkpoints, recipe.resolved.yaml, run.json, plots")
    overwrite: bool = _f(False, "allow writing into a non-empty run folder without resume")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    quant: QuantSection = field(default_factory=QuantSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)


class ConfigError(ValueError):
    """Every problem found in a recipe, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ---- loading ----

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) for value checked against a field type; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_tp,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, v = _coerce(item, item_tp)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _build(cls: type, data: Any, path: str, problems: list[str], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{source}: '{path or '<top>'}' must be a mapping, got {type(data).__name__}")
        return cls()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = [f"{path}.{k}" if path else k for k in fields]
            near = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
            problems.append(f"{source}: unknown key '{dotted}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems, source)
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            problems.append(f"{source}: '{dotted}' is {value!r}; expected {_type_name(tp)}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a recipe YAML, apply `key=value` overrides, and validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: recipe file not found"])
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
    problems: list[str] = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value, e.g. train.learning_rate=1e-4")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    cfg = _build(RunConfig, tree, "", problems, str(path))
    problems += _check_values(cfg, str(path))
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_values(cfg: RunConfig, source: str) -> list[str]:
    """Cross-field checks that types alone cannot express."""
    p = []
    if not cfg.model.checkpoint_dir:
        p.append(f"{source}: 'model.checkpoint_dir' is empty; give the folder of an official-layout checkpoint")
    if not cfg.data.train_path:
        p.append(f"{source}: 'data.train_path' is empty; give a cogtune JSONL file")
    if cfg.lora.r <= 0:
        p.append(f"{source}: 'lora.r' is {cfg.lora.r}; expected a positive rank such as 16")
    if not cfg.lora.targets:
        p.append(f"{source}: 'lora.targets' is empty; name presets such as language_expert_attn")
    if cfg.train.max_nonfinite_steps < 0:
        p.append(f"{source}: 'train.max_nonfinite_steps' is {cfg.train.max_nonfinite_steps}; expected 0 or more")
    if cfg.train.learning_rate <= 0:
        p.append(f"{source}: 'train.learning_rate' must be > 0")
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        p.append(f"{source}: 'data.streaming' needs 'train.max_steps' > 0 (a stream has no known length)")
    if cfg.data.max_length < 8:
        p.append(f"{source}: 'data.max_length' is {cfg.data.max_length}; too small to hold a prompt")
    if cfg.train.resume not in (None, "auto") and not Path(cfg.train.resume).exists():
        p.append(f"{source}: 'train.resume' is {cfg.train.resume!r}: no such checkpoint folder (or use 'auto')")
    return p


# ---- printing ----

def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig, with_docs: bool = False) -> str:
    """The resolved recipe as YAML; with_docs adds each field's help as a trailing comment."""
    if not with_docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"{sec.name}:")
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            val = yaml.safe_dump(getattr(section, f.name), default_flow_style=True).strip()
            if val.endswith("\n...") or val.endswith("..."):
                val = val.replace("\n...", "").rstrip(".").strip() or "null"
            lines.append(f"  {f.name}: {val}  # {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def parse_recipe_args(argv: list[str], prog: str, description: str,
                      resume_flag: bool = False) -> tuple[argparse.Namespace, RunConfig]:
    """Shared argv handling for verbs that take `RECIPE [key=value ...]`; prints errors and exits 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="recipes/<name>.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. lora.r=32")
    if resume_flag:
        parser.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                            help="same as train.resume=...: 'auto' continues the latest checkpoint in output.dir")
        parser.add_argument("--skip-invalid", action="store_true",
                            help="same as data.skip_invalid=true: skip (and count) rows that fail validation")
    args = parser.parse_intermixed_args(argv)  # flags may sit anywhere among the overrides
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    if getattr(args, "skip_invalid", False):
        overrides.append("data.skip_invalid=true")
    try:
        cfg = load_recipe(args.recipe, overrides)
    except ConfigError as err:
        print(f"recipe has {len(err.problems)} problem(s):", file=sys.stderr)
        for line in err.problems:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


def main(argv: list[str]) -> int:
    """`cogtune config RECIPE [k=v ...]`: the resolved recipe with every field documented."""
    _, cfg = parse_recipe_args(argv, "cogtune config", "print a recipe fully resolved, with field docs")
    print(to_yaml(cfg, with_docs=True), end="")
    return 0
