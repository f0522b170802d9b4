"""Merge, step 1: check that adapters belong to a base (before any weight is loaded), then load both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import extra_params
from finetune.run_folder import AdapterSource, read_json


class AdapterMismatch(ValueError):
    """The adapter was trained on another base than the one given."""


def check_compatible(source: AdapterSource, base_dir: Path, config: Any, modules: dict[str, tuple[int, int]], *,
                     force_base: bool = False, log: Callable[[str], None] = print) -> None:
    """Refuse an adapter whose recorded base or whose weights do not fit this base; every problem at once.

    `modules`: name -> (in_features, out_features) of the base's Linear layers. `force_base`: a base whose
    weight fingerprint differs from the recorded one is used with a warning instead of refused.
    """
    from finetune.loading import base_fingerprint
    from finetune.run_folder import config_hash

    where = source.meta_file or source.adapter_dir
    recorded_base = source.meta.get("base_checkpoint", "?")
    problems = []
    version = source.meta.get("family_version")
    if version is not None and int(version) != int(config.cogvlm_version):
        problems.append(f"family: the adapter was trained on CogVLM{version} ({where}), {base_dir} is "
                        f"CogVLM{config.cogvlm_version}")
    want_hash = source.meta.get("base_config_hash")
    if want_hash and want_hash != config_hash(base_dir):
        problems.append(f"config hash: the adapter's base had config.json hash {want_hash} ({recorded_base}), "
                        f"{base_dir}/config.json hashes to {config_hash(base_dir)} (another checkpoint or an edited "
                        "config)")
    want_fp = source.meta.get("base_fingerprint")
    if want_fp and not problems:  # a config mismatch already says "another checkpoint"
        have_fp = base_fingerprint(base_dir)
        if have_fp != want_fp:
            text = (f"base weights: the adapter was trained on weights with fingerprint {want_fp} ({recorded_base}), "
                    f"{base_dir} has {have_fp}: same config.json, other weights (another seed or fine-tune, or "
                    "the base was changed since training)")
            if force_base:
                log(f"warning: {text}; --force-base given, using it anyway")
            else:
                problems.append(text + ". Pass --force-base to use this base anyway")
    tokens = source.meta.get("image_tokens")
    if tokens is not None and int(tokens) != int(config.image_tokens):
        problems.append(f"image tokens: the adapter was trained with {tokens} tokens per image, the base gives "
                        f"{config.image_tokens}")
    problems += _check_adapter_keys(source.adapter_dir, modules)
    if problems:
        raise AdapterMismatch(
            f"adapter {source.adapter_dir} does not match base {base_dir}:\n  - " + "\n  - ".join(problems)
            + f"\nPass --base with the checkpoint it was trained on (run.json says {recorded_base}).")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_[AB]|lora_embedding_[AB]|"
                       r"lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


def _check_adapter_keys(adapter_dir: Path, modules: dict[str, tuple[int, int]]) -> list[str]:
    """Each LoRA tensor must sit on a base Linear with matching in/out features (target modules match)."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"{weights} is missing (only safetensors adapters are supported)"]
    bad: list[str] = []
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                continue
            name, kind = m.group("module"), m.group("kind")
            if name not in modules:
                bad.append(f"{name} (targeted by the adapter) is not a Linear layer of the base")
                continue
            shape = fh.get_slice(key).get_shape()
            fan_in, fan_out = modules[name]
            if (kind == "lora_A" and shape[-1] != fan_in) or (kind == "lora_B" and shape[0] != fan_out):
                bad.append(f"{key}: shape {tuple(shape)} does not fit the base Linear {name} "
                           f"({fan_in} -> {fan_out})")
    if len(bad) > 5:
        bad = bad[:5] + [f"... and {len(bad) - 5} more target-module mismatches"]
    return bad


def check_adapters(adapters: list[tuple[str, AdapterSource]], base_dir: Path, *, force_base: bool = False,
                   log: Callable[[str], None] = print) -> None:
    """check_compatible for each adapter against the base's module tree on the meta device (no weights read)."""
    from finetune.loading import build_meta_model

    meta = build_meta_model(base_dir)
    shapes = linear_shapes(meta)
    for _, src in adapters:
        check_compatible(src, base_dir, meta.config, shapes, force_base=force_base, log=log)


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every Linear (quantized Linears included)."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = (mod.in_features, mod.out_features)
    return out


def stored_dtype(checkpoint_dir: Path) -> str:
    """The dtype the checkpoint was saved in (config.json torch_dtype / dtype), bfloat16 when unrecorded."""
    cfg = read_json(checkpoint_dir / "config.json")
    value = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return value if value in ("float32", "float16", "bfloat16") else "bfloat16"


def load_base(base_dir: Path, dtype: str, quantization_config: Any = None) -> Any:
    """The base model, unquantized unless `quantization_config` is given, in eval mode."""
    import torch

    from finetune.loading import check_checkpoint_dir
    from finetune.models import load_config, model_class_for

    base_dir = check_checkpoint_dir(base_dir)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return model_class_for(load_config(base_dir)).from_pretrained(str(base_dir), **kwargs).eval()


def attach_adapters(model: Any, adapters: list[tuple[str, AdapterSource]], base_dir: Path) -> Any:
    """Load each adapter under its name on one base (check them first: `check_adapters`); the first is active."""
    from peft import PeftModel

    name, first = adapters[0]
    model = PeftModel.from_pretrained(model, str(first.adapter_dir), adapter_name=name, is_trainable=False)
    for name, src in adapters[1:]:
        model.load_adapter(str(src.adapter_dir), adapter_name=name, is_trainable=False)
    # Bare parameters trained beside LoRA (boi/eoi, finetune/extra_params.py): kept per adapter, swapped on use.
    model.cogtune_extra_params = {n: extra_params.read(src.adapter_dir) for n, src in adapters}
    model.cogtune_base_params = {}
    use_adapter(model, adapters[0][0])
    return model.eval()


def use_adapter(model: Any, name: str) -> None:
    """Activate adapter `name`: peft's set_adapter plus that adapter's bare parameters (base values otherwise)."""
    model.set_adapter(name)
    extra_params.apply(model, model.cogtune_base_params)  # back to the base's own values
    model.cogtune_base_params = extra_params.apply(model, model.cogtune_extra_params.get(name, {}))


def load_tokenizer_for(source: AdapterSource | None, base_dir: Path, config: Any,
                       tokenizer_dir: str | Path | None = None) -> Any:
    """`tokenizer_dir` when given, else the adapter's saved tokenizer (the trainer stores it there), else the
    run's tokenizer_dir, else the base's."""
    from finetune.tokenization import _has_tokenizer, load_tokenizer

    if tokenizer_dir is not None:
        return load_tokenizer(base_dir, tokenizer_dir, config)
    if source is not None and _has_tokenizer(source.adapter_dir):
        return load_tokenizer(base_dir, source.adapter_dir, config)
    tokenizer_dir = source.meta.get("tokenizer_dir") if source is not None else None
    return load_tokenizer(base_dir, tokenizer_dir, config)


def load_processor_for(source: AdapterSource | None, base_dir: Path, config: Any,
                       tokenizer_dir: str | Path | None = None) -> Any:
    """The processor the adapter was trained with: its tokenizer (`load_tokenizer_for`), the settings saved
    beside it (processor_config.json), and the run's template (run.json / cogtune.json), else the base's."""
    from finetune.models import processor_class_for
    from finetune.run_folder import template_for

    processor_class = processor_class_for(config)  # the family's (CogAgent adds cross_image_size)
    tokenizer = load_tokenizer_for(source, base_dir, config, tokenizer_dir)
    saved = processor_class.read_settings(source.adapter_dir) if source is not None else {}
    settings = {**saved, "template_version": template_for(source, config)}
    return processor_class.from_config(config, tokenizer, **settings)
