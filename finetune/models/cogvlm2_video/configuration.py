"""`CogVLMVideoConfig`: the CogVLM2 config with the video family's defaults (docs/architecture.md §21.1).

The official video config.json is a CogVLM2 config whose `architectures` is `CogVLMVideoForCausalLM`; that name
alone switches the vision experts off (`vision_expert=False`), so the plain `CogVLMConfig` reads these files
correctly too. This class only fills the video defaults for configs written from scratch (tests, make-tiny).
"""

from __future__ import annotations

from typing import Any

from ..cogvlm.configuration import CogVLMConfig

ARCHITECTURE = "CogVLMVideoForCausalLM"

# One 224-px frame: 16x16 patches -> 2x2 conv -> 8x8 = 64 features, + boi + eoi (the official code hard-codes it).
FRAME_TOKENS = 66


class CogVLMVideoConfig(CogVLMConfig):
    """CogVLM2-Video: no vision-expert weights, `template_version` "base" (as shipped, even for the chat model)."""

    def __init__(self, vision_config: dict[str, Any] | None = None, template_version: str = "base",
                 **kwargs: Any) -> None:
        kwargs.setdefault("architectures", [ARCHITECTURE])
        kwargs.setdefault("vision_expert", False)
        kwargs.setdefault("max_position_embeddings", 2048)
        kwargs.setdefault("eos_token_id", 128001)
        vision = {"image_size": 224, "num_positions": 257, **(vision_config or {})}
        super().__init__(vision_config=vision, template_version=template_version, **kwargs)
        if self.vision_expert:
            raise ValueError("CogVLM2-Video has no vision-expert weights; vision_expert must be False")


def tiny_video_config(**overrides: Any) -> CogVLMConfig:
    """The tiny CogVLM2 test config as a video model (56-px frames: 2x2 features + boi/eoi = 6 tokens a frame)."""
    from ...tiny import tiny_config

    overrides.setdefault("architectures", [ARCHITECTURE])
    return tiny_config(2, **overrides)
