"""Recipes: YAML that maps 1:1 onto typed dataclasses, strictly (docs/conventions.md §1).

A recipe is `RunConfig{model, data, lora, quant, train, eval, dpo, output}`. Loading walks the YAML and
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
    num_frames: int | None = _f(None, "video models: frames sampled per video (default 24, the official demo's)")
    fps: float | None = _f(None, "video models, chat template: frames per second of video (default 1)")
    feature_cache: str | None = _f(None, "folder caching each image's frozen vision-tower features across epochs, "
                                         "evaluation and runs (finetune/feature_cache.py); None = recompute")


@dataclass
class LoraSection:
    targets: list[str] = _f(["language_expert_attn", "vision_expert_attn"],
                            "presets (finetune/targets.py) or full-name regexes, matched with re.fullmatch")
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
    skip_nonfinite: bool = _f(True, "skip (and count) optimizer steps with a NaN/inf loss or gradient: the optimizer "
                              "never applies them; false = stop at the first one")
    max_nonfinite_steps: int = _f(10, "stop with an error when more than this many optimizer steps in a row had a "
                                  "NaN/inf loss or gradient (the run diverged); no adapter is saved")
    method: Literal["sft", "dpo"] = _f("sft", "sft = supervised (data rows end with the answer); dpo = preference "
                                     "tuning through TRL (rows carry chosen/rejected, settings in the dpo section)")


@dataclass
class DpoSection:
    beta: float = _f(0.1, "strength of the pull towards the reference (TRL's beta); higher = stay closer")
    loss_type: Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                       "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"] = _f(
        "sigmoid", "TRL's preference loss: sigmoid = DPO, ipo, hinge (SLiC), robust, apo_zero, ...")
    label_smoothing: float = _f(0.0, "conservative DPO / robust: assumed share of flipped labels (TRL's name)")
    precompute_ref_log_probs: bool = _f(False, "score every pair with the reference once before training (one "
                                        "forward per step fewer; the reference is frozen anyway)")
    start_adapter: str | None = _f(None, "adapter folder (e.g. an SFT run's adapter/) to continue; it is also the "
                                   "reference. None = a new adapter on the base, the base is the reference")


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
    dpo: DpoSection = field(default_factory=DpoSection)
    output: OutputSection = field(default_factory=OutputSection)


class ConfigError(ValueError):
    """Every problem found in a recipe, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# ---- loading ----

# Recipes are a few kB. Anything far larger is not a recipe, and reading it whole would waste memory.
MAX_RECIPE_BYTES = 1 << 20

# Shipped recipes, addressable by name (`cogtune train cogvlm2-qlora-24gb`) from any folder: package data
# first (an installed wheel), then the repository's recipes/ folder (a clone or an editable install).
_RECIPE_DIRS = (Path(__file__).resolve().parent / "recipes", Path(__file__).resolve().parent.parent / "recipes")

# Common names people type for the real keys; accepted in overrides, suggested for recipe files.
ALIASES: dict[str, str] = {
    "lr": "train.learning_rate",
    "train.lr": "train.learning_rate",
    "learning_rate": "train.learning_rate",
    "epochs": "train.num_train_epochs",
    "train.epochs": "train.num_train_epochs",
    "num_train_epochs": "train.num_train_epochs",
    "batch_size": "train.per_device_train_batch_size",
    "train.batch_size": "train.per_device_train_batch_size",
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "max_steps": "train.max_steps",
    "steps": "train.max_steps",
    "train.steps": "train.max_steps",
    "grad_accum": "train.gradient_accumulation_steps",
    "train.grad_accum": "train.gradient_accumulation_steps",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
}

# Set by `cogtune VERB` so that `--help` and errors say `cogtune train`, not the script's name.
INVOKED_AS: str | None = None


def _show(value: Any) -> str:
    """A value for an error message: repr, cut short, so a huge value never floods (or fills) memory."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 60, 60, 6, 4, 3
    return r.repr(value)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases: recipes never need `*name`, and nested aliases expand
    exponentially (a 441-byte "billion laughs" file took 2.4 GB)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias '*{event.anchor}' is not allowed in recipes (aliases can expand without "
                "bound); write the value out instead", event.start_mark)
        return super().compose_node(parent, index)


def _key_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    """dotted key -> 1-based line of that key in the YAML file, for `file:line` messages."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines.setdefault(dotted, key_node.start_mark.line + 1)
            _key_lines(value_node, dotted, lines)


def _parse_yaml(text: str) -> tuple[Any, dict[str, int]]:
    """(tree, key lines) of a recipe's text; raises yaml.YAMLError (aliases included)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[str, int] = {}
        _key_lines(node, "", lines)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def shipped_recipes() -> dict[str, Path]:
    """name -> path of every recipe shipped with the kit."""
    found: dict[str, Path] = {}
    for folder in _RECIPE_DIRS:
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                found.setdefault(p.stem, p)
    return found


def resolve_recipe(name: str | Path) -> Path:
    """A recipe file: the path itself when it exists, else a shipped recipe of that name (`.yaml` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError([f"{path}: is a folder, not a recipe file; give a .yaml file or a shipped recipe's name"])
    shipped = shipped_recipes()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name[:-4] if path.name.endswith(".yml") else ""
    key = stem or path.name
    # A bare name, or the documented `recipes/NAME.yaml` typed from another folder.
    if key in shipped and path.parent in (Path("."), Path("recipes")):
        return shipped[key]
    near = difflib.get_close_matches(key, list(shipped), n=1, cutoff=0.6)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    names = ", ".join(shipped) or "none found"
    raise ConfigError([f"{path}: recipe file not found, and not the name of a shipped recipe.{hint} "
                       f"Shipped recipes (use the name from any folder, e.g. `cogtune train tiny-demo`): {names}"])


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


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted leaf key of the recipe schema."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        keys += _all_keys(hints[f.name], dotted) if dataclasses.is_dataclass(hints[f.name]) else [dotted]
    return keys


def _suggest(dotted: str, valid_here: list[str]) -> str:
    """'; did you mean X?' for an unknown key: common aliases, the same name in another section, then spelling."""
    if dotted in ALIASES:
        return f"; did you mean '{ALIASES[dotted]}'?"
    leaf = dotted.rsplit(".", 1)[-1]
    if leaf in ALIASES:
        return f"; did you mean '{ALIASES[leaf]}'?"
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == leaf]
    if len(elsewhere) == 1:
        return f"; did you mean '{elsewhere[0]}'?"
    near = difflib.get_close_matches(dotted, valid_here, n=1, cutoff=0.5)
    if near:
        return f"; did you mean '{near[0]}'?"
    near = difflib.get_close_matches(dotted, _all_keys(), n=1, cutoff=0.6)
    if near:
        return f"; did you mean '{near[0]}'?"
    return f"; valid keys: {', '.join(valid_here)}"


class _Where:
    """Where a dotted key was set: `file:line`, an override on the command line, or the file itself."""

    def __init__(self, source: str, lines: dict[str, int] | None = None) -> None:
        self.source = source
        self.labels: dict[str, str] = {k: f"{source}:{n}" for k, n in (lines or {}).items()}

    def override(self, dotted: str, item: str) -> None:
        label = f"override '{item if len(item) <= 80 else item[:77] + '...'}'"
        parts = dotted.split(".")
        for i in range(1, len(parts)):  # sections the override creates are the override's too
            prefix = ".".join(parts[:i])
            if prefix not in self.labels:
                self.labels[prefix] = label
        self.labels[dotted] = label

    def __call__(self, dotted: str) -> str:
        while dotted:
            if dotted in self.labels:
                return self.labels[dotted]
            dotted = dotted.rpartition(".")[0]
        return self.source


def _build(cls: type, data: Any, path: str, problems: list[str], where: _Where) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where(path)}: '{path or '<top>'}' must be a mapping of keys, got {type(data).__name__} "
                        f"{_show(data)}")
        return cls()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            valid = [f"{path}.{k}" if path else k for k in fields]
            problems.append(f"{where(dotted)}: unknown key '{_show(dotted)[1:-1]}'{_suggest(str(dotted), valid)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems, where)
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            problems.append(f"{where(dotted)}: '{dotted}' is {_show(value)}; expected {_type_name(tp)}")
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


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_output: bool = False) -> RunConfig:
    """Read a recipe (a YAML file, or a shipped recipe's name), apply `key=value` overrides, validate it all.

    check_output: also require that output.dir can be written (for verbs that write there: train).
    """
    path = resolve_recipe(path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ConfigError([f"{path}: {size:,} bytes is not a recipe (recipes are a few kB; the limit is "
                           f"{MAX_RECIPE_BYTES:,}); check the file name"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8"]) from None
    try:
        tree, lines = _parse_yaml(text)
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a recipe (recipes are section.key: value)"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(err, 'problem', None) or err}"]) from None
    where = _Where(str(path), lines)
    if tree is None:
        tree = {}
    problems: list[str] = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override '{_show(item)[1:-1]}': expected key=value, e.g. train.learning_rate=1e-4")
            continue
        key, raw = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        try:
            value = yaml.load(raw, Loader=_RecipeLoader) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        if not isinstance(tree, dict):
            break  # reported by _build
        _set_dotted(tree, key, value)
        where.override(key, item)
    cfg = _build(RunConfig, tree, "", problems, where)
    problems += _check_values(cfg, where)
    if check_output and cfg.output.dir:
        problems += check_output_dir(cfg, where("output.dir"))
    if problems:
        raise ConfigError(problems)
    return cfg


def _check_values(cfg: RunConfig, where: _Where | str) -> list[str]:
    """Ranges and cross-field checks that types alone cannot express; one line per problem, with the fix."""
    import math

    if isinstance(where, str):
        where = _Where(where)
    p: list[str] = []

    def bad(key: str, what: str) -> None:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        p.append(f"{where(key)}: '{key}' is {_show(value)}; {what}")

    m, d, lo, t, e, o = cfg.model, cfg.data, cfg.lora, cfg.train, cfg.eval, cfg.output
    if not m.checkpoint_dir:
        p.append(f"{where('model.checkpoint_dir')}: 'model.checkpoint_dir' is empty; give the folder of an "
                 "official-layout checkpoint, e.g. model.checkpoint_dir=/models/cogvlm2-llama3-chat-19B")
    if m.family is not None:
        from .families import FAMILIES

        if m.family not in FAMILIES:
            near = difflib.get_close_matches(m.family, list(FAMILIES), n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'? " if near else ""
            bad("model.family", f"not a known family; {hint}use one of {', '.join(FAMILIES)}, or null to skip the "
                "check against config.json")
    if not d.train_path:
        p.append(f"{where('data.train_path')}: 'data.train_path' is empty; give a cogtune JSONL file, "
                 "e.g. data.train_path=data/train.jsonl")
    if d.max_length < 8:
        bad("data.max_length", "too small to hold a prompt; use the longest row's tokens (`cogtune validate` "
            "prints them), e.g. 2048")
    if d.num_workers < 0:
        bad("data.num_workers", "must be >= 0 (0 = load images in the main process)")
    if d.num_frames is not None and d.num_frames < 1:
        bad("data.num_frames", "must be >= 1 frames per video (null = 24, the official demo's)")
    if d.fps is not None and not d.fps > 0:
        bad("data.fps", "must be > 0 frames per second of video (null = 1, the official chat demo's)")
    if d.streaming and t.max_steps <= 0:
        p.append(f"{where('data.streaming')}: 'data.streaming' needs 'train.max_steps' > 0 (a stream has no known "
                 "length); set train.max_steps=N")
    if lo.r <= 0:
        bad("lora.r", "expected a positive rank such as 16")
    if lo.lora_alpha <= 0:
        bad("lora.lora_alpha", "must be > 0 (the LoRA update is scaled by lora_alpha / r); usually 2 x lora.r")
    if not 0.0 <= lo.lora_dropout < 1.0:
        bad("lora.lora_dropout", "must be in [0, 1), e.g. 0.05 (0 = no dropout)")
    if not lo.targets:
        p.append(f"{where('lora.targets')}: 'lora.targets' is empty; name presets such as language_expert_attn")
    if lo.loraplus_lr_ratio is not None and not (math.isfinite(lo.loraplus_lr_ratio) and lo.loraplus_lr_ratio > 0):
        bad("lora.loraplus_lr_ratio", "must be > 0 (e.g. 16), or null for plain LoRA")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        bad("train.learning_rate", "must be a finite number > 0, e.g. 2e-4")
    if t.max_steps == 0 or t.max_steps < -1:
        bad("train.max_steps", "must be > 0, or -1 to train for train.num_train_epochs")
    if t.max_steps <= 0 and not (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0):
        bad("train.num_train_epochs", "must be > 0 (e.g. 1 or 2) when train.max_steps is -1; 0 epochs would save "
            "an untrained adapter")
    if t.per_device_train_batch_size < 1:
        bad("train.per_device_train_batch_size", "must be >= 1")
    if t.gradient_accumulation_steps < 1:
        bad("train.gradient_accumulation_steps", "must be >= 1 (1 = no accumulation)")
    if not (math.isfinite(t.warmup_steps) and t.warmup_steps >= 0) or (
            t.warmup_steps >= 1 and t.warmup_steps != int(t.warmup_steps)):
        bad("train.warmup_steps", "must be a fraction of all steps in [0, 1), or a whole number of steps, e.g. 0.03")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        bad("train.weight_decay", "must be >= 0 (0 = none)")
    if not (math.isfinite(t.max_grad_norm) and t.max_grad_norm >= 0):
        bad("train.max_grad_norm", "must be >= 0 (e.g. 1.0; 0 = no clipping)")
    if not 0 <= t.seed < 2**32:
        bad("train.seed", "must be in [0, 2**32)")
    for key in ("logging_steps", "save_steps", "save_total_limit"):
        if getattr(t, key) < 1:
            bad(f"train.{key}", "must be >= 1" + (" (0 would keep no checkpoint to resume from)"
                                                  if key == "save_total_limit" else ""))
    if not t.report_to:
        p.append(f"{where('train.report_to')}: 'train.report_to' is empty; use [none] to log nowhere, "
                 "or [tensorboard]")
    if t.resume not in (None, "auto") and not Path(t.resume).exists():
        bad("train.resume", "no such checkpoint folder; give a checkpoint-N folder, or 'auto'")
    if t.max_nonfinite_steps < 0:
        bad("train.max_nonfinite_steps", "must be >= 0 (0 = stop at the first non-finite step)")
    if e.eval_steps < 0:
        bad("eval.eval_steps", "must be >= 0 (0 = evaluate only at the end)")
    if e.generation_rows < 0:
        bad("eval.generation_rows", "must be >= 0 (0 = no generation eval)")
    if e.max_new_tokens < 1:
        bad("eval.max_new_tokens", "must be >= 1")
    if e.log_predictions < 0:
        bad("eval.log_predictions", "must be >= 0")
    if not (math.isfinite(cfg.dpo.beta) and cfg.dpo.beta > 0):
        bad("dpo.beta", "must be a finite number > 0, e.g. 0.1")
    if not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        bad("dpo.label_smoothing", "must be in [0, 0.5) (0 = plain DPO)")
    if cfg.dpo.start_adapter is not None and not Path(cfg.dpo.start_adapter).is_dir():
        bad("dpo.start_adapter", "no such adapter folder; give an SFT run's adapter/ folder, or null")
    if t.method == "dpo" and cfg.data.feature_cache:
        bad("data.feature_cache", "preference tuning does not use the feature cache yet (the vision tower runs "
            "live in DPO); remove data.feature_cache or set it to null for train.method=dpo")
    if not o.dir:
        p.append(f"{where('output.dir')}: 'output.dir' is empty; give the run folder, e.g. output.dir=out/my-run")
    return p


def check_output_dir(cfg: RunConfig, source: str = "output.dir") -> list[str]:
    """Problems with output.dir that would otherwise surface as a traceback after the model has loaded:
    a file in its place (or above it), or a folder that cannot be written."""
    out = Path(cfg.output.dir)
    fix = "choose another output.dir, e.g. output.dir=out/my-run"
    if out.exists() and not out.is_dir():
        return [f"{source}: 'output.dir' {str(out)!r} is a file, not a folder; {fix}"]
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return [f"{source}: 'output.dir' {str(out)!r} cannot be created: {str(probe)!r} is a file; {fix}"]
    if probe.exists() and not _can_write_in(probe):
        return [f"{source}: 'output.dir' {str(out)!r} is not writable (cannot create files in {str(probe)!r}); {fix}"]
    return []


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be created in folder: permissions, read-only mounts and root all answered by trying."""
    import os
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".cogtune-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


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


def parse_recipe_args(argv: list[str], prog: str, description: str, resume_flag: bool = False,
                      check_output: bool | None = None) -> tuple[argparse.Namespace, RunConfig]:
    """Shared argv handling for verbs that take `RECIPE [key=value ...]`; prints errors and exits 2.

    check_output (default: resume_flag, i.e. the training verb) also requires a writable output.dir.
    """
    if INVOKED_AS:  # `cogtune train --help` says so, not `train.py`
        prog = INVOKED_AS
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="a recipe file, or a shipped recipe's name (" + ", ".join(shipped_recipes())
                        + ")")
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
        cfg = load_recipe(args.recipe, overrides, check_output=resume_flag if check_output is None else check_output)
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
