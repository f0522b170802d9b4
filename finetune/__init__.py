"""cogtune: LoRA/QLoRA fine-tuning for CogVLM-family vision-language models.

`CogVLMConfig` and `CogVLMForCausalLM` are imported lazily so that `import finetune` (and the CLI's
`--help`) does not pull in torch/transformers.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

# On CPU, bitsandbytes tries to fetch an optional kernel from the Hub and logs a warning when it cannot
# (always, here: no network). Its pure-torch fallback is what runs and what the tests check.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 still reads `model.is_gradient_checkpointing`, which transformers 5.x renamed and now warns about
# on every PeftModel construction; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

__all__ = ["CogVLMConfig", "CogVLMForCausalLM"]


def __getattr__(name: str) -> Any:
    if name == "CogVLMConfig":
        from .configuration_cogvlm import CogVLMConfig

        return CogVLMConfig
    if name == "CogVLMForCausalLM":
        from .modeling_cogvlm import CogVLMForCausalLM

        return CogVLMForCausalLM
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
