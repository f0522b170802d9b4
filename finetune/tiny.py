"""Tiny random CogVLM / CogVLM2 checkpoints in the official folder layout, for tests and the CPU demo.

`cogtune make-tiny --family cogvlm2 --out DIR` writes sharded safetensors + `model.safetensors.index.json`,
config.json, generation_config.json and the offline tiny tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .models.cogvlm.configuration import CogVLMConfig

FAMILY_VERSIONS = {"cogvlm": 1, "cogvlm2": 2, "cogagent": 1, "cogvlm2-video": 2}
# Families that differ from their version's default only by config fields (docs/architecture.md §21).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {"cogvlm2-video": {"architectures": ["CogVLMVideoForCausalLM"]}}

# Largest tiny shard; the tiny models are ~1 MB so this always yields several shards, like the real ones.
TINY_SHARD_SIZE = "300KB"


def _special_ids(version: int) -> dict[str, Any]:
    from .tokenization import build_tiny_tokenizer

    tok = build_tiny_tokenizer(version)
    ids: dict[str, Any] = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
    if version == 2:  # CogVLM2 stops on eos and <|eot_id|> (docs/architecture.md §2)
        ids["eos_token_id"] = [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    else:
        ids["eos_token_id"] = tok.eos_token_id
    return ids


def tiny_config(version: int, **overrides: Any) -> CogVLMConfig:
    """A few-hundred-kB config with every structural feature of the real one (GQA and conv for v2).

    `image_size` may be given as a top-level override (it is a vision field); vision fields can also be
    overridden through `vision_config={...}` (merged into the defaults below).
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 (CogVLM) or 2 (CogVLM2), got {version!r}")
    # 28 px = 2x2 patches for CogVLM; CogVLM2 gets 56 px so its 2x2 conv still leaves a 2x2 grid.
    image_size = overrides.pop("image_size", None) or (56 if version == 2 else 28)
    vision = {
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "patch_size": 14,
        "image_size": image_size,
        "layer_norm_eps": 1e-6,
        "in_channels": 3,
        "hidden_act": "gelu",
        "dropout_prob": 0.0,
    }
    vision.update(overrides.pop("vision_config", None) or {})
    grid = vision["image_size"] // vision["patch_size"]
    if version == 2 and grid % 2:
        raise ValueError(f"CogVLM2 needs an even patch grid for its 2x2 conv; image_size {vision['image_size']} "
                         f"with patch {vision['patch_size']} gives {grid}")
    vision["num_positions"] = grid * grid + 1
    kwargs: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_multi_query_heads": 2 if version == 2 else 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "template_version": "chat",
        "cogvlm_version": version,
        "vision_config": vision,
        "tie_word_embeddings": False,
        "architectures": ["CogVLMForCausalLM"],
    }
    kwargs.update(_special_ids(version))
    kwargs.update(overrides)
    return CogVLMConfig(**kwargs)


def make_tiny(version: int, out_dir: str | Path, seed: int = 0, family: str | None = None, **overrides: Any) -> Path:
    """Write a random tiny checkpoint + tokenizer to `out_dir` in the official layout; returns the folder.

    `family="cogagent"` writes a tiny CogAgent (CogVLM1 tokenizer, 56-px cross images)."""
    import torch
    from transformers import GenerationConfig

    from .models import model_class_for
    from .tokenization import build_tiny_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_class: Any
    if family == "cogagent":
        from .models.cogagent.configuration import tiny_cogagent_config
        from .models.cogagent.modeling import CogAgentForCausalLM

        config, model_class = tiny_cogagent_config(_special_ids(version), **overrides), CogAgentForCausalLM
    else:
        config = tiny_config(version, **overrides)
        model_class = model_class_for(config)  # the family's class (CogVLM2-Video: no vision experts)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(out, max_shard_size=TINY_SHARD_SIZE)
    build_tiny_tokenizer(version).save_pretrained(out)
    from .loading import respect_umask, weight_files

    for shard in weight_files(out):  # safetensors writes its files owner-only (0600) whatever the umask
        respect_umask(shard)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogtune make-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILY_VERSIONS), required=True)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in px: a multiple of 14 (28 for cogvlm, 56 for cogvlm2 by default)")
    args = parser.parse_args(argv)
    try:
        path = make_tiny(FAMILY_VERSIONS[args.family], args.out, seed=args.seed, image_size=args.image_size,
                         family=args.family, **FAMILY_OVERRIDES.get(args.family, {}))
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote tiny {args.family} checkpoint to {path}")
    return 0
