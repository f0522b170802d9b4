"""CogAgent inputs: the CogVLM encoding (CogAgent's own prompt table) plus a high-resolution copy of each picture.

Everything about token ids, labels and the 224-px image is CogVLM's (`finetune.models.cogvlm.processing`); the
collator there switches to CogAgent's prompt table and adds `cross_images` when the config is a CogAgent one.
What is CogAgent's own is the pair of pixel tensors made from one picture, defined here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cogvlm.processing import load_and_transform_image

# Model inputs beyond CogVLM's: one (3, S', S') cross image per image, in the same order as `images`.
EXTRA_INPUT_NAMES = ("cross_images",)


def picture_pair(ref: Any, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (3, S, S), cross image (3, S', S')) from one picture: bicubic resize to each size, CLIP normalisation
    (docs/architecture.md §13); S = vision_config.image_size (224), S' = cross_image_size (1120)."""
    return (load_and_transform_image(ref, int(config.vision_config["image_size"])),
            load_and_transform_image(ref, int(config.cross_image_size)))
