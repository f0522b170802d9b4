"""Model families: one folder each (`finetune/models/<family>/`), and the one table from a checkpoint to its family.

A checkpoint's `config.json` names its class in `architectures[0]` (the official files do; so do the folders
the kit writes). That name picks the family; the family gives its configuration, model and processor classes.
A plain table, no registry (docs/conventions.md §2): adding a family is a folder plus one entry here
(docs/adding-a-family.md). Classes are named as `module:attribute` strings and imported on first use, so that
reading the table never imports torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """Where a family's classes live (`package.module:Class`)."""

    name: str
    config_class: str
    model_class: str
    processor_class: str


FAMILIES: dict[str, Family] = {
    "cogvlm": Family("cogvlm", "finetune.models.cogvlm.configuration:CogVLMConfig",
                     "finetune.models.cogvlm.modeling:CogVLMForCausalLM",
                     "finetune.models.cogvlm.processing:CogVLMProcessor"),
    "cogagent": Family("cogagent", "finetune.models.cogagent.configuration:CogAgentConfig",
                       "finetune.models.cogagent.modeling:CogAgentForCausalLM",
                       "finetune.models.cogagent.processing:CogAgentProcessor"),
    "cogvlm2_video": Family("cogvlm2_video", "finetune.models.cogvlm2_video.configuration:CogVLMVideoConfig",
                            "finetune.models.cogvlm2_video.modeling:CogVLMVideoForCausalLM",
                            "finetune.models.cogvlm2_video.processing:CogVLMVideoProcessor"),
}
# config.json `architectures[0]` -> family name
ARCHITECTURES: dict[str, str] = {
    "CogVLMForCausalLM": "cogvlm",
    "CogAgentForCausalLM": "cogagent",
    "CogVLMVideoForCausalLM": "cogvlm2_video",
}
DEFAULT_FAMILY = "cogvlm"  # config.json without `architectures` (hand-written tiny configs): CogVLM / CogVLM2


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def family_of(config: dict[str, Any] | Any, where: str = "config.json") -> Family:
    """The family of a config (a config.json dict or a config object); unknown architectures are refused."""
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    if not archs:
        return FAMILIES[DEFAULT_FAMILY]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} is not a family this kit supports "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}); see docs/adding-a-family.md")
    return FAMILIES[ARCHITECTURES[arch]]


def config_class(family: Family) -> type:
    return _load(family.config_class)


def model_class(family: Family) -> type:
    return _load(family.model_class)


def processor_class(family: Family) -> type:
    return _load(family.processor_class)


def load_config(checkpoint_dir: str | Path) -> Any:
    """The config object of a checkpoint folder, of its family's class (no weights read)."""
    path = Path(checkpoint_dir)
    raw = json.loads((path / "config.json").read_text())
    return config_class(family_of(raw, f"{path}/config.json")).from_pretrained(str(path), local_files_only=True)


def processor_class_for(config: Any) -> type:
    """The processor class of a config object (or config.json dict)."""
    return processor_class(family_of(config))


def model_class_for(config: Any) -> type:
    """The model class of a config object."""
    return model_class(family_of(config))
