"""Shared fixtures: tiny in-process CogVLM / CogVLM2 models and checkpoints (nothing is downloaded).

Other test modules may append fixtures here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Official config.json files and the CogVLM2 weight map (no weights), copied from the checkpoints' repos.
REFERENCE = Path(__file__).resolve().parent / "assets" / "reference"


def make_inputs(
    config, texts: list[list[int]], n_images: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `[BOS] [image span] text` (one image per row), unpadded; all rows must have the same text length.

    Returns (input_ids, token_type_ids, images (B, 3, S, S)).
    """
    g = torch.Generator().manual_seed(seed)
    span = config.image_tokens
    ids, types = [], []
    for text in texts:
        ids.append([config.bos_token_id] + [config.pad_token_id] * span + list(text))
        types.append([0] + [1] * span + [0] * len(text))
    size = config.vision_config["image_size"]
    images = torch.randn(len(texts) if n_images is None else n_images, 3, size, size, generator=g)
    return torch.tensor(ids), torch.tensor(types), images


def build_tiny_model(version: int, seed: int = 0, **overrides):
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import tiny_config

    torch.manual_seed(seed)
    model = CogVLMForCausalLM(tiny_config(version, **overrides)).eval()
    # Random (non-trivial) values for parameters initialised to constants, so every path is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session", params=[1, 2], ids=["cogvlm", "cogvlm2"])
def version(request) -> int:
    return request.param


@pytest.fixture(scope="session")
def tiny_models() -> dict[int, torch.nn.Module]:
    return {1: build_tiny_model(1), 2: build_tiny_model(2)}


@pytest.fixture()
def tiny_model(tiny_models, version):
    return tiny_models[version]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Official-layout tiny folders written by `make_tiny` (sharded safetensors + index, tokenizer)."""
    from finetune.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny_ckpt")
    return {v: make_tiny(v, root / f"v{v}", seed=0) for v in (1, 2)}
