"""CogAgent inputs: CogVLM's encoding with CogAgent's prompt table, plus a high-resolution copy of every picture.

Token ids, labels, the 224-px image span and truncation are CogVLM's (`finetune.models.cogvlm.processing`). What is
CogAgent's own: each image of a row is also given to the cross tower at `cross_image_size` (1120 px), from the same
picture (bicubic resize, CLIP normalisation, docs/architecture.md §13), as the model input `cross_images`
(N, 3, S', S'), one per image, in the order of `images` (docs/architecture.md §20.1). Users write nothing new: one
image per row, as for CogVLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..cogvlm.processing import CogVLMProcessor, EncodedExample, load_and_transform_image

CROSS_INPUT = "cross_images"


class CogAgentProcessor(CogVLMProcessor):
    """CogVLMProcessor plus the setting `cross_image_size` and the per-example input `cross_images`."""

    SETTINGS = (*CogVLMProcessor.SETTINGS, "cross_image_size")

    def __init__(self, tokenizer: Any, *, cross_image_size: int, **settings: Any) -> None:
        super().__init__(tokenizer, **settings)
        self.cross_image_size = int(cross_image_size)

    @classmethod
    def model_class(cls) -> type:
        from .modeling import CogAgentForCausalLM

        return CogAgentForCausalLM

    @classmethod
    def config_class(cls) -> type:
        from .configuration import CogAgentConfig

        return CogAgentConfig

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, **settings: Any) -> CogAgentProcessor:
        if settings.get("cross_image_size") is None:
            settings["cross_image_size"] = int(config.cross_image_size)
        return super().from_config(config, tokenizer, **settings)

    def encode(self, conversation: Any, add_generation_prompt: bool = False) -> EncodedExample:
        """CogVLM's encoding; the cross images are the same picture refs as the images (transformed later)."""
        example = super().encode(conversation, add_generation_prompt)
        example.extra[CROSS_INPUT] = list(example.images)
        return example

    def transform_cross_image(self, ref: Any) -> torch.Tensor:
        """(3, S', S') float32 for one image ref at cross_image_size; a tensor passes through."""
        return ref if isinstance(ref, torch.Tensor) else load_and_transform_image(ref, self.cross_image_size)

    def load_images(self, row: dict[str, Any]) -> dict[str, Any]:
        """Both sizes decoded in the DataLoader worker: `images` (3, S, S) and `cross_images` (3, S', S')."""
        refs = list(row.get(CROSS_INPUT) or row.get("images") or [])
        row = super().load_images(row)
        row[CROSS_INPUT] = [self.transform_cross_image(ref) for ref in refs]
        return row

    def batch_input(self, name: str, values: Sequence[Any]) -> torch.Tensor | None:
        """`cross_images`: every example's cross images, stacked (N, 3, S', S'), or None without images."""
        if name == CROSS_INPUT:
            cross = [self.transform_cross_image(ref) for refs in values for ref in refs]
            return torch.stack(cross) if cross else None
        return super().batch_input(name, values)


def picture_pair(ref: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (3, S, S), cross image (3, S', S')) from one picture, S = vision_config.image_size (224),
    S' = cross_image_size (1120)."""
    return (load_and_transform_image(ref, int(config.vision_config["image_size"])),
            load_and_transform_image(ref, int(config.cross_image_size)))
