"""Load a checkpoint, its tokenizer and (optionally) a 4/8-bit quantization, as a recipe asks.

The one place where `model.*` and `quant.*` recipe sections become `from_pretrained` arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .config import ModelSection, QuantSection


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail with the expected layout when a checkpoint folder is missing pieces."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist. Expected an official-layout folder: "
                                "config.json, model.safetensors.index.json + model-*.safetensors "
                                "(or model.safetensors).")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
        raise FileNotFoundError(f"checkpoint folder {path} lacks {' and '.join(missing)} (found: {found}). "
                                "`cogtune make-tiny --family cogvlm2 --out DIR` writes a tiny example of the layout.")
    return path


def resolve_dtype(name: str) -> torch.dtype:
    """auto -> bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_meta_model(checkpoint_dir: str | Path):
    """The model's module tree with no weights (meta device): for target reports and key checks."""
    import torch

    from .configuration_cogvlm import CogVLMConfig
    from .modeling_cogvlm import CogVLMForCausalLM

    config = CogVLMConfig.from_pretrained(str(checkpoint_dir))
    with torch.device("meta"):
        return CogVLMForCausalLM(config)


def to_bnb_config(quant: QuantSection, compute_dtype: torch.dtype):
    """quant section -> transformers' BitsAndBytesConfig (None when not quantizing).

    Only the language model's linears are quantized: the model class keeps the vision tower, the GLU
    adapter, boi/eoi, embeddings and lm_head in full precision (see `_skip_quantization_modules`).
    """
    if quant.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    from .modeling_cogvlm import CogVLMForCausalLM

    skip = list(getattr(CogVLMForCausalLM, "_skip_quantization_modules", ["vision", "lm_head"]))
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    cdt = compute_dtype if quant.bnb_4bit_compute_dtype == "auto" else getattr(torch, quant.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.mode,
                              bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=cdt, llm_int8_skip_modules=skip)


def load_config_and_tokenizer(model_cfg: ModelSection):
    """(config, tokenizer) without loading weights: cheap checks (family, tokenizer) fail before the big load."""
    from .configuration_cogvlm import CogVLMConfig
    from .tokenization import load_tokenizer

    path = check_checkpoint_dir(model_cfg.checkpoint_dir)
    config = CogVLMConfig.from_pretrained(str(path))
    if model_cfg.family:
        from .families import family_mismatch

        problem = family_mismatch(model_cfg.family, config.cogvlm_version, config.image_tokens, f"{path}/config.json")
        if problem:
            raise ValueError(problem)
    return config, load_tokenizer(path, model_cfg.tokenizer_dir, config)


def load_weights(model_cfg: ModelSection, quant_cfg: QuantSection | None = None, device_map=None):
    """The model with its weights, in the recipe's dtype and (optional) 4/8-bit quantization."""
    from .modeling_cogvlm import CogVLMForCausalLM

    path = check_checkpoint_dir(model_cfg.checkpoint_dir)
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs = {"dtype": dtype}
    bnb = to_bnb_config(quant_cfg, dtype) if quant_cfg is not None else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device_map is not None:
        kwargs["device_map"] = device_map
    return CogVLMForCausalLM.from_pretrained(str(path), **kwargs)


def load_model(model_cfg: ModelSection, quant_cfg: QuantSection | None = None, device_map=None):
    """(model, tokenizer) for a recipe's model/quant sections; the tokenizer is checked first."""
    _, tokenizer = load_config_and_tokenizer(model_cfg)
    return load_weights(model_cfg, quant_cfg, device_map), tokenizer
