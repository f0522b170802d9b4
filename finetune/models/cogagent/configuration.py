"""`CogAgentConfig`: the official cogagent `config.json` as shipped, plus the cross tower's shape.

The official files describe the CogVLM1 part (224-px EVA2-CLIP-E, Vicuna-7B decoder) and three cross fields
(`cross_hidden_size`, `cross_compute_hidden_size`, `cross_image_size`). The cross tower's own shape (EVA02-CLIP-L,
width 1024, 24 blocks, 16 heads, SwiGLU 2730) is hard-coded in the official code (docs/architecture.md, CogAgent
section); the kit keeps it in `cross_vision_config` so tiny test models can shrink it. Official files lack
that field and get the official values.
"""

from __future__ import annotations

from typing import Any

from ..cogvlm.configuration import CogVLMConfig

# The official EVA02-CLIP-L/14 cross tower. `intermediate_size` = int(1024 * 2.6667); `embed_dim` is the
# (unused) output head's width; `pt_hw_seq_len` the grid its 2-D RoPE was pre-trained on (224 / 14).
CROSS_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_heads": 16,
    "intermediate_size": 2730,
    "patch_size": 14,
    "embed_dim": 768,
    "pt_hw_seq_len": 16,
    "layer_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}

_COGAGENT_VISION = {"image_size": 224, "num_positions": 257}


class CogAgentConfig(CogVLMConfig):
    """CogAgent configuration; field names are the official ones, plus the kit-level `cross_vision_config`.

    CogAgent is CogVLM1 in every shared field (multi-head attention, RoPE theta 10000, no conv, no QKV bias), so
    `cogvlm_version` is always 1.
    """

    model_type = "cogagent"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        cross_hidden_size: int = 1024,
        cross_compute_hidden_size: int = 1024,
        cross_image_size: int = 1120,
        cross_vision_config: dict[str, Any] | None = None,
        vision_config: dict[str, Any] | None = None,
        bos_token_id: int = 1,
        eos_token_id: int | list[int] = 2,
        pad_token_id: int = 0,
        max_position_embeddings: int = 2048,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("cogvlm_version", None)
        kwargs.pop("prompt_table", None)
        self.cross_hidden_size = cross_hidden_size
        self.cross_compute_hidden_size = cross_compute_hidden_size
        self.cross_image_size = cross_image_size
        self.cross_vision_config = {**CROSS_VISION_DEFAULTS, **(cross_vision_config or {})}
        super().__init__(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            vision_config={**_COGAGENT_VISION, **(vision_config or {})},
            cogvlm_version=1,
            prompt_table="cogagent",  # CogAgent's own template table (docs/architecture.md §14)
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            max_position_embeddings=max_position_embeddings,
            **kwargs,
        )
        problems = []
        if self.cross_vision_config["hidden_size"] != cross_hidden_size:
            problems.append(f"cross_hidden_size {cross_hidden_size} != cross_vision_config.hidden_size "
                            f"{self.cross_vision_config['hidden_size']} (the cross tower's width feeds key_value)")
        if cross_compute_hidden_size % self.num_attention_heads:
            problems.append(f"cross_compute_hidden_size {cross_compute_hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if cross_image_size % self.cross_vision_config["patch_size"]:
            problems.append(f"cross_image_size {cross_image_size} is not a multiple of the cross patch size "
                            f"{self.cross_vision_config['patch_size']}")
        if problems:
            raise ValueError("CogAgent config: " + "; ".join(problems))

    @property
    def cross_grid(self) -> int:
        """Patches per side of the cross image (80 at 1120 px)."""
        return self.cross_image_size // self.cross_vision_config["patch_size"]


def tiny_cogagent_config(special_ids: dict[str, Any], **overrides: Any) -> CogAgentConfig:
    """A tiny CogAgent with every structural feature of the real one: 28-px low-res image (2x2 patches, span 6),
    56-px cross image (4x4 patches), a 3-block cross tower of which the last is skipped, 2-D RoPE, sub-LN."""
    image_size = overrides.pop("image_size", None) or 28
    cross_image_size = overrides.pop("cross_image_size", None) or 56
    vision = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2, "patch_size": 14,
              "image_size": image_size, "layer_norm_eps": 1e-6, "in_channels": 3, "hidden_act": "gelu",
              "dropout_prob": 0.0}
    vision.update(overrides.pop("vision_config", None) or {})
    grid = vision["image_size"] // vision["patch_size"]
    vision["num_positions"] = grid * grid + 1
    cross = {"hidden_size": 32, "num_hidden_layers": 3, "num_heads": 2, "intermediate_size": 48, "patch_size": 14,
             "embed_dim": 24}
    cross.update(overrides.pop("cross_vision_config", None) or {})
    kwargs: dict[str, Any] = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "template_version": "chat",
        "cross_hidden_size": cross["hidden_size"], "cross_compute_hidden_size": 32,
        "cross_image_size": cross_image_size, "cross_vision_config": cross, "vision_config": vision,
        "tie_word_embeddings": False, "architectures": ["CogAgentForCausalLM"],
    }
    kwargs.update(special_ids)
    kwargs.update(overrides)
    return CogAgentConfig(**kwargs)


def cross_memory_rows(config: CogAgentConfig, lora_targets: list[str], batch: int, act_bytes: int,
                      checkpointing: bool) -> list[tuple[str, float, str]]:
    """Memory-plan rows (name, GiB, basis) for CogAgent's cross branch; shapes only.

    The cross K/V of every decoder layer (B x P x 2 Cc) are saved for backward (all layers, or one recomputed
    with checkpointing); the cross tower keeps its blocks' activations only when LoRA trains it.
    """
    gib = 1024**3
    cv = config.cross_vision_config
    p = config.cross_grid**2
    kv_layer = batch * p * 2 * config.cross_compute_hidden_size * act_bytes
    n_kv = 1 if checkpointing else config.num_hidden_layers
    rows = [("activations: cross K/V (CogAgent)", n_kv * kv_layer / gib,
             f"{n_kv} layer(s) x {batch}x{p} cross tokens x 2x{config.cross_compute_hidden_size}")]
    block = batch * (p + 1) * (6 * cv["hidden_size"] + 3 * cv["intermediate_size"]) * act_bytes
    if "cross_tower" in lora_targets:
        kept = 1 if checkpointing else cv["num_hidden_layers"] - 1
        rows.append(("activations: cross tower (CogAgent)", kept * block / gib,
                     "one block (checkpointing)" if checkpointing else "all run blocks kept (LoRA in the tower)"))
    else:
        rows.append(("activations: cross tower (CogAgent)", block / gib, "frozen: one block live, forward only"))
    return rows
