"""CogVLM2-Video model: the CogVLM2 decoder and vision tower with `vision_expert=False` (docs/architecture.md §21).

Everything is the CogVLM2 code in finetune/models/cogvlm/modeling.py; the family differs only in data:

* no `vision_expert_*` / `vision_mlp` modules: every token, frame tokens included, goes through the language
  weights (1029 checkpoint keys, 12.508 B parameters);
* `images` carries one (T, 3, 224, 224) frame tensor per video (or the frames of all videos of a batch
  concatenated, in row order); each frame fills one 66-token VISION span;
* unlike the official code, which encodes only the first sample's video, every row's frames are encoded, so a
  batch of videos (of different frame counts too) gives each row what it gives alone.
"""

from __future__ import annotations

from ...targets import TargetSpec
from ..cogvlm.modeling import COGVLM_TARGETS, CogVLMForCausalLM
from .configuration import ARCHITECTURE, CogVLMVideoConfig

NO_VISION_EXPERT = (
    "CogVLM2-Video has no vision-expert weights: every token, video frames included, goes through the "
    "language_expert_* / language_mlp weights (docs/architecture.md §21). Target language_expert (and "
    "glu_adapter) instead of vision_expert*."
)
# The CogVLM presets minus everything of the vision expert, which this family does not have; those names (and
# the `experts` group, which includes them) are refused with the reason instead of "matches no module".
_REFUSED = ("vision_expert_attn", "vision_expert_mlp", "vision_expert", "experts")
VIDEO_TARGETS = TargetSpec(
    presets={k: v for k, v in COGVLM_TARGETS.presets.items() if k not in _REFUSED},
    groups={k: v for k, v in COGVLM_TARGETS.groups.items() if k not in _REFUSED},
    save_presets=dict(COGVLM_TARGETS.save_presets),
    components=[(label, pattern) for label, pattern in COGVLM_TARGETS.components if "vision expert" not in label],
    gradient_free_in_last_layer="",  # every module of the last layer feeds the text positions
    refused={name: NO_VISION_EXPERT for name in _REFUSED},
)


class CogVLMVideoForCausalLM(CogVLMForCausalLM):
    """The official `CogVLMVideoForCausalLM` checkpoints, loaded strictly (same keys, no renaming)."""

    config_class = CogVLMVideoConfig
    target_spec = VIDEO_TARGETS

    def __init__(self, config: CogVLMVideoConfig) -> None:
        if config.vision_expert:
            raise ValueError(f"{ARCHITECTURE} needs a config with vision_expert=False (architectures "
                             f"{config.architectures}); load video checkpoints with CogVLMVideoConfig")
        super().__init__(config)


def refuse_vision_expert_targets(names: list[str] | tuple[str, ...]) -> None:
    """ValueError naming the vision-expert target names asked of a CogVLM2-Video model, and why they cannot work."""
    bad = [n for n in names if "vision_expert" in n or "vision_mlp" in n]
    if bad:
        raise ValueError(f"LoRA targets {bad}: {NO_VISION_EXPERT}")


__all__ = ["CogVLMVideoForCausalLM", "refuse_vision_expert_targets", "NO_VISION_EXPERT"]
