"""The recipe's `lora` section -> a peft LoraConfig on resolved targets, applied to the model.

peft does the LoRA work (DoRA, rsLoRA, PiSSA/OLoRA init, k-bit preparation, saving); this module
only translates names and prints what was matched, so a run never trains modules it did not mean to.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import extra_params
from .targets import match_report, parameter_table, resolve_modules_to_save, resolve_targets

if TYPE_CHECKING:
    from finetune.config import LoraSection


def to_peft_config(lora: LoraSection, model) -> tuple[object, dict[str, list[str]], list[str]]:
    """(peft.LoraConfig, target -> matched names, skipped names) for this model. Zero matches raise ValueError."""
    from peft import LoraConfig

    pattern, matches, skipped = resolve_targets(lora.targets, model)
    modules, _ = extra_params.split_modules_to_save(lora.modules_to_save)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=pattern,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_lora_weights,
        modules_to_save=resolve_modules_to_save(modules, model) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return config, matches, skipped


def apply_lora(model, lora: LoraSection, gradient_checkpointing: bool = True, log=print):
    """Wrap the model with LoRA adapters on the recipe's targets; print the match report and table.

    For a k-bit model, peft's `prepare_model_for_kbit_training` casts the non-quantized layers that
    need it and enables input gradients so checkpointed layers still backpropagate into LoRA.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    config, matches, skipped = to_peft_config(lora, model)
    log("LoRA targets:\n" + match_report(matches, skipped))
    matched = [n for hit in matches.values() for n in hit]
    modules, params = extra_params.split_modules_to_save(lora.modules_to_save)
    log(parameter_table(model, matched, lora.r, resolve_modules_to_save(modules, model) + params))
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts and freezing only: peft would enable checkpointing under transformers' deprecated name, so the
        # kit does that itself below, as for an unquantized model.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft reads `model.is_gradient_checkpointing`, a property transformers 5.x renamed; not the kit's call.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, config)
    extra_params.enable(model, params)  # boi/eoi: bare parameters, trained directly (see extra_params.py)
    return model
