"""CogVLM2-Video model: the CogVLM2 decoder and vision tower with `vision_expert=False` (docs/architecture.md §21).

Everything is the CogVLM2 code in finetune/modeling_cogvlm.py; the family differs only in data:

* no `vision_expert_*` / `vision_mlp` modules: every token, frame tokens included, goes through the language
  weights (1029 checkpoint keys, 12.508 B parameters);
* `images` carries one (T, 3, 224, 224) frame tensor per video (or the frames of all videos of a batch
  concatenated, in row order); each frame fills one 66-token VISION span;
* unlike the official code, which encodes only the first sample's video, every row's frames are encoded, so a
  batch of videos (of different frame counts too) gives each row what it gives alone.
"""

from __future__ import annotations

from ...modeling_cogvlm import CogVLMForCausalLM
from .configuration import ARCHITECTURE, CogVLMVideoConfig

# Names a LoRA target may not use on this family, with the reason (finetune.models.cogvlm2_video.targets).
NO_VISION_EXPERT = (
    "CogVLM2-Video has no vision-expert weights: every token, video frames included, goes through the "
    "language_expert_* / language_mlp weights. Target those (the 'language' preset) instead of vision_expert*."
)


class CogVLMVideoForCausalLM(CogVLMForCausalLM):
    """The official `CogVLMVideoForCausalLM` checkpoints, loaded strictly (same keys, no renaming)."""

    config_class = CogVLMVideoConfig

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
