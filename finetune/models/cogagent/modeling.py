"""Clean-room CogAgent: CogVLM1 plus a 1120-px EVA02-CLIP-L cross tower read by cross-attention in every layer.

Written from a description of the official behaviour (docs/architecture.md, "CogAgent" section), reusing the
kit's CogVLM building blocks (expert attention and MLP, RMSNorm, EVA2-CLIP-E tower, position rule, masks). Module
attribute names equal the official checkpoint keys, so official folders load strictly (1831 keys).

Decoder layer order: self-attention -> cross-attention -> MLP, each pre-norm with its own RMSNorm
(`input_layernorm`, `post_cross_attention_layernorm`, `post_attention_layernorm`).

Deliberate differences from the official code (robustness only):
* Cross-attention is full (unmasked) SDPA on every position, softmax in fp32 inside the kernel. The official code
  passes a (B, 1) bool mask, which only broadcasts for batch 1, so its batched prefill fails; for batch 1 the
  result is the same (adding 1.0 to every score does not change a softmax).
* The cross keys/values are computed once at prefill and kept in the KV cache (as extra cache layers
  L..2L-1), so beam search and `num_return_sequences` reorder them with the self-attention cache.
* A row without an image gets zero cross features: the cross branch then adds exactly zero (its linears have no
  bias). The official code cannot run text-only rows at all.
* Packed rows (several conversations in one row) are refused: each would need its own cross image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ...families import VISION_TOKEN_TYPE
from ...targets import TargetSpec
from ..cogvlm.modeling import (
    COGVLM_TARGETS,
    FULL_PRECISION_MODULES,
    CogVLMDecoderLayer,
    CogVLMForCausalLM,
    CogVLMModel,
    CogVLMPreTrainedModel,
    CogVLMRMSNorm,
    EVA2CLIPModel,
    ExpertRouting,
    is_packed,
)
from .configuration import CogAgentConfig

# Both vision towers stay in full precision under bitsandbytes; the decoder's linears (cross-attention included)
# are quantized.
COGAGENT_FULL_PRECISION_MODULES = (*FULL_PRECISION_MODULES, "model.cross_vision")

_LAYER = r"model\.layers\.\d+\."
_CROSS_BLOCK = r"model\.cross_vision\.vit\.model\.blocks\."
# CogVLM's presets plus the cross-attention and the cross tower (its never-run last block is skipped).
COGAGENT_TARGETS = TargetSpec(
    presets={
        **COGVLM_TARGETS.presets,
        "cross_attn": _LAYER + r"cross_attn\.(?:query|key_value|dense)",
        "cross_tower": _CROSS_BLOCK + r"\d+\.(?:attn\.(?:q_proj|k_proj|v_proj|proj)|mlp\.w[123])",
    },
    groups=COGVLM_TARGETS.groups,
    save_presets=COGVLM_TARGETS.save_presets,
    components=[
        ("cross attention", _LAYER + r"cross_attn\..*"),
        ("cross tower (EVA-L, 1120 px)", r"model\.cross_vision\..*"),
        ("vision tower", r"model\.vision\.pos_embed"),  # CogAgent's extra patch-feature embedding
        *COGVLM_TARGETS.components,
    ],
    gradient_free_in_last_layer=COGVLM_TARGETS.gradient_free_in_last_layer,
    never_run_last_block=_CROSS_BLOCK,
)



# ----------------------------------------------------------------------------------------------------------------
# Low-res tower: EVA2-CLIP-E at 224 px plus a learned pos_embed before the adapter
# ----------------------------------------------------------------------------------------------------------------


class CogAgentVisionModel(EVA2CLIPModel):
    """CogVLM1's 224-px tower with CogAgent's extra `pos_embed` (g*g, D) added to the patch features before the
    GLU adapter; the tower, boi/eoi and the feature cache are EVA2CLIPModel's."""

    projection_prefixes = ("linear_proj", "pos_embed")

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__(config)
        vc = config.vision_config
        grid = vc["image_size"] // vc["patch_size"]
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, vc["hidden_size"]))  # 2-D, as in the checkpoint

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_proj(x + self.pos_embed.to(x.dtype)[None])  # (N, g*g, D) -> (N, g*g, H)


# ----------------------------------------------------------------------------------------------------------------
# High-res cross tower: EVA02-CLIP-L (sub-LN, SwiGLU, 2-D interleaved RoPE), block 23 skipped
# ----------------------------------------------------------------------------------------------------------------


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) rotation: each pair (x_2k, x_2k+1) -> (-x_2k+1, x_2k). Not the LLM's half split."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class VisionRotaryEmbedding2D(nn.Module):
    """The cross tower's 2-D RoPE table, registered ONCE (the checkpoint stores it at `...vit.model.rope`).

    Per axis `head_dim / 4` frequencies theta^(-2k/(head_dim/2)), each used for an adjacent pair; fractional grid
    coordinates `arange(g) / g * pt_hw_seq_len` (the table was pre-trained on a 16x16 grid and interpolated).
    The first head_dim/2 dims rotate with the patch row, the last head_dim/2 with its column. (g*g, head_dim).
    """

    def __init__(self, head_dim: int, grid: int, pt_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.grid, self.pt_seq_len, self.theta = head_dim, grid, pt_seq_len, theta
        cos, sin = self.compute()
        self.register_buffer("freqs_cos", cos.to(torch.get_default_dtype()), persistent=True)
        self.register_buffer("freqs_sin", sin.to(torch.get_default_dtype()), persistent=True)

    def compute(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.head_dim // 2  # dims per axis
        base = 1.0 / (self.theta ** (torch.arange(0, half, 2, device=device).float() / half))  # (half/2,)
        t = torch.arange(self.grid, device=device) / self.grid * self.pt_seq_len  # (g,)
        freqs = (t[:, None] * base).repeat_interleave(2, dim=-1)  # (g, half) pairs share a frequency
        g = self.grid
        table = torch.cat((freqs[:, None, :].expand(g, g, half), freqs[None, :, :].expand(g, g, half)), dim=-1)
        table = table.reshape(g * g, self.head_dim)  # row-major over (row, column)
        return table.cos(), table.sin()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.freqs_cos, self.freqs_sin


class EVAAttention(nn.Module):
    """q/k/v projections (q and v biased, k not), 2-D RoPE on patch tokens, SDPA, sub-LN, output proj."""

    def __init__(self, cv: dict[str, Any]) -> None:
        super().__init__()
        d = cv["hidden_size"]
        self.num_heads = cv["num_heads"]
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d))
        self.v_bias = nn.Parameter(torch.zeros(d))
        self.inner_attn_ln = nn.LayerNorm(d, eps=cv["layer_norm_eps"])
        self.proj = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (N, 1+g*g, C)
        # The biases are added on top of the (possibly LoRA-wrapped) projections.
        q = self.q_proj(x) + self.q_bias
        k = self.k_proj(x)
        v = self.v_proj(x) + self.v_bias
        q, k, v = (t.view(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (N, nh, T, hd)
        cos, sin = cos.to(q.device), sin.to(q.device)

        def rope(t: torch.Tensor) -> torch.Tensor:  # cls (index 0) is left as is; result in v's dtype
            patches = t[:, :, 1:]
            patches = patches * cos + rotate_pairs(patches) * sin
            return torch.cat((t[:, :, :1], patches.to(t.dtype)), dim=2).to(v.dtype)

        q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)  # non-causal, scale hd^-0.5 (official: xformers)
        out = out.transpose(1, 2).reshape(b, n, d)  # (N, T, C)
        return self.proj(self.inner_attn_ln(out))


class EVASwiGLU(nn.Module):
    """w3(ffn_ln(silu(w1 x) * w2 x)), every linear biased (naive SwiGLU with sub-LN)."""

    def __init__(self, cv: dict[str, Any]) -> None:
        super().__init__()
        d, i = cv["hidden_size"], cv["intermediate_size"]
        self.w1 = nn.Linear(d, i)
        self.w2 = nn.Linear(d, i)
        self.ffn_ln = nn.LayerNorm(i, eps=cv["layer_norm_eps"])
        self.w3 = nn.Linear(i, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVABlock(GradientCheckpointingLayer):
    """Pre-norm block, no layer scale: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, cv: dict[str, Any]) -> None:
        super().__init__()
        eps = cv["layer_norm_eps"]
        self.norm1 = nn.LayerNorm(cv["hidden_size"], eps=eps)
        self.attn = EVAAttention(cv)
        self.norm2 = nn.LayerNorm(cv["hidden_size"], eps=eps)
        self.mlp = EVASwiGLU(cv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class EVAPatchEmbed(nn.Module):
    def __init__(self, cv: dict[str, Any]) -> None:
        super().__init__()
        p = cv["patch_size"]
        self.proj = nn.Conv2d(3, cv["hidden_size"], kernel_size=p, stride=p, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, g*g, C) row-major


class EVAVisionTransformer(nn.Module):
    """`model.cross_vision.vit.model`: patches + cls + pos_embed, blocks 0..depth-2 (the last is skipped)."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        cv = config.cross_vision_config
        d, grid = cv["hidden_size"], config.cross_grid
        self.patch_embed = EVAPatchEmbed(cv)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.rope = VisionRotaryEmbedding2D(d // cv["num_heads"], grid, cv["pt_hw_seq_len"], cv["rope_theta"])
        self.blocks = nn.ModuleList(EVABlock(cv) for _ in range(cv["num_hidden_layers"]))
        # Present in the checkpoint, unused by CogAgent's forward (it takes every token's hidden state).
        self.norm = nn.LayerNorm(d, eps=cv["layer_norm_eps"])
        self.head = nn.Linear(d, cv["embed_dim"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (N, g*g, C)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed.to(x.dtype)  # (N, 1+g*g, C)
        cos, sin = self.rope()
        for block in self.blocks[:-1]:  # official quirk: the last block is built and stored but never run
            x = block(x, cos, sin)
        return x


class EVALargeEncoder(nn.Module):
    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.model = EVAVisionTransformer(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[:, 1:]  # drop cls -> (N, g*g, C)


class CrossVisionModel(nn.Module):
    """Cross images (N, 3, S', S') -> cross features (N, g'*g', C) = EVA-L hidden states + pos_embed."""

    def __init__(self, config: CogAgentConfig) -> None:
        super().__init__()
        self.vit = EVALargeEncoder(config)
        grid = config.cross_grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, config.cross_vision_config["hidden_size"]))
        self.feature_cache = None  # finetune/feature_cache.py (data.feature_cache): the frozen EVA-L's output

    def encoder_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S', S') -> (N, g'*g', C): the EVA-L tower without cls, before pos_embed."""
        if getattr(self, "tower_released", False):
            raise RuntimeError("a cross image is missing from data.feature_cache and the cross tower's weights were "
                               "released after every image of the run was cached (finetune/feature_cache.py)")
        return self.vit(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cache = self.feature_cache
        x = self.encoder_features(images) if cache is None else cache.lookup(images, self.encoder_features)
        return x + self.pos_embed.to(x.dtype)[None]  # pos_embed runs live (it may train)


# ----------------------------------------------------------------------------------------------------------------
# Decoder: CogVLM layer + cross-attention between self-attention and MLP
# ----------------------------------------------------------------------------------------------------------------


def cross_layer(cache: Cache, index: int) -> DynamicLayer:
    """The cache layer holding cross K/V number `index` (stored after the L self-attention layers)."""
    while len(cache.layers) <= index:
        cache.layers.append(DynamicLayer())
    return cache.layers[index]


class CrossAttention(nn.Module):
    """Decoder stream (B, L, H) attends to cross features (B, P, C): no RoPE, no mask, no expert split."""

    def __init__(self, config: CogAgentConfig, layer_idx: int) -> None:
        super().__init__()
        self.cache_index = config.num_hidden_layers + layer_idx
        self.num_heads = config.num_attention_heads
        self.compute = config.cross_compute_hidden_size
        self.query = nn.Linear(config.hidden_size, self.compute, bias=False)
        self.key_value = nn.Linear(config.cross_hidden_size, 2 * self.compute, bias=False)
        self.dense = nn.Linear(self.compute, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, encoder_outputs: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor | None:
        """None when there are no cross features (text-only batch): the branch then adds nothing."""
        if encoder_outputs is not None:
            b, p, _ = encoder_outputs.shape
            kv = self.key_value(encoder_outputs)  # (B, P, 2*Cc): K first, then V
            k, v = (t.view(b, p, self.num_heads, -1).transpose(1, 2) for t in kv.split(self.compute, dim=-1))
            if cache is not None:  # computed once, reused by every decode step
                cross_layer(cache, self.cache_index).update(k, v)
        else:
            stored = cache.layers[self.cache_index] if cache is not None and len(cache.layers) > self.cache_index \
                else None
            if stored is None or not stored.is_initialized:
                return None
            k, v = stored.keys, stored.values  # (B, nh, P, hc) from prefill
        b, n, _ = hidden_states.shape
        q = self.query(hidden_states).view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hc)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))  # full attention, scale hc^-0.5
        return self.dense(out.transpose(1, 2).reshape(b, n, self.compute))  # (B, L, H)


class CogAgentDecoderLayer(CogVLMDecoderLayer):
    """Self-attention -> cross-attention -> MLP (docs/architecture.md, CogAgent decoder layer)."""

    def __init__(self, config: CogAgentConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.cross_attn = CrossAttention(config, layer_idx)
        self.post_cross_attention_layernorm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_outputs: torch.Tensor | None = None,
        *,
        routing: ExpertRouting,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
        segments: list[list[tuple[int, int, bool]]] | None = None,
    ) -> torch.Tensor:
        # hidden_states and encoder_outputs are positional so gradient checkpointing carries their gradients.
        residual = hidden_states  # (B, L, H)
        hidden_states = residual + self.self_attn(
            self.input_layernorm(hidden_states), routing, rope, attn_mask, is_causal, cache, segments
        )
        cross = self.cross_attn(self.post_cross_attention_layernorm(hidden_states), encoder_outputs, cache)
        if cross is not None:
            hidden_states = hidden_states + cross
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class CogAgentPreTrainedModel(CogVLMPreTrainedModel):
    config_class = CogAgentConfig
    config: CogAgentConfig
    _no_split_modules = ["CogAgentDecoderLayer", "TransformerLayer", "EVABlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, VisionRotaryEmbedding2D):
            cos, sin = module.compute(module.freqs_cos.device)
            init.copy_(module.freqs_cos, cos)
            init.copy_(module.freqs_sin, sin)
        elif isinstance(module, CogAgentVisionModel):
            super()._init_weights(module)  # boi / eoi
            init.normal_(module.pos_embed, mean=0.0, std=std)
        elif isinstance(module, EVAVisionTransformer):
            init.normal_(module.cls_token, mean=0.0, std=std)
            init.normal_(module.pos_embed, mean=0.0, std=std)
        elif isinstance(module, CrossVisionModel):
            init.normal_(module.pos_embed, mean=0.0, std=std)
        elif isinstance(module, EVAAttention):
            init.normal_(module.q_bias, mean=0.0, std=std)
            init.normal_(module.v_bias, mean=0.0, std=std)
        else:
            super()._init_weights(module)


class CogAgentModel(CogAgentPreTrainedModel, CogVLMModel):
    """Backbone: embeddings, 224-px tower, 1120-px cross tower, CogAgent decoder; final-normed hidden states."""

    def __init__(self, config: CogAgentConfig) -> None:
        CogVLMPreTrainedModel.__init__(self, config)  # CogVLMModel.__init__ would build CogVLM layers first
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(CogAgentDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = CogAgentVisionModel(config)
        self.cross_vision = CrossVisionModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    def encode_cross_images(self, cross_images: Any, token_type_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, P, C) cross features, one cross image per row that holds an image span, zeros for the others.

        `cross_images` (N, 3, S', S') are in the order of the rows' image spans, like `images`; None when the batch
        has no image.
        """
        pixels = self._stack_images(cross_images)
        span = self.config.image_tokens
        per_row = ((token_type_ids == VISION_TOKEN_TYPE).sum(dim=1) // span).tolist()  # images per row
        n_images = sum(per_row)
        if pixels is None and n_images == 0:
            return None
        n_cross = 0 if pixels is None else pixels.shape[0]
        if max(per_row) > 1 or n_cross != n_images:
            raise ValueError(
                f"CogAgent takes one image per row and one cross image per image: the rows hold {per_row} image "
                f"spans and {n_cross} cross images were given. Pass `cross_images` (the same pictures at "
                f"{self.config.cross_image_size} px, built by the CogAgent processor) in the order of `images`."
            )
        size = self.config.cross_image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"cross_images are {tuple(pixels.shape[-2:])} px, the config expects {size} x {size}")
        param = self.cross_vision.vit.model.patch_embed.proj.weight
        feats = self.cross_vision(pixels.to(device=param.device, dtype=param.dtype))  # (N, P, C)
        rows = [r for r, k in enumerate(per_row) if k]
        if len(rows) == len(per_row):
            return feats
        out = feats.new_zeros((len(per_row), *feats.shape[1:]))  # text-only rows: zero features, zero effect
        out[torch.tensor(rows, device=feats.device)] = feats
        return out

    def extra_layer_inputs(
        self, token_types: torch.Tensor, attention_mask: torch.Tensor | None, prefill: bool,
        inputs_embeds: torch.Tensor, cross_images: Any = None, **inputs: Any,
    ) -> tuple[torch.Tensor | None]:
        """Each layer's cross features (B, P, C) from `cross_images`, read at prefill only (then the cross K/V sit in
        the cache, and None tells the layers to read them there)."""
        if is_packed(attention_mask):
            raise ValueError("CogAgent does not take packed rows (each conversation needs its own cross image); "
                             "set data.packing: false")
        encoder_outputs = self.encode_cross_images(cross_images, token_types) if prefill else None
        return (None if encoder_outputs is None else encoder_outputs.to(inputs_embeds.dtype),)


class CogAgentForCausalLM(CogAgentPreTrainedModel, CogVLMForCausalLM):
    """CogAgent chat / VQA model: LM head, loss and generation hooks of CogVLM, plus `cross_images`."""

    full_precision_modules = COGAGENT_FULL_PRECISION_MODULES
    target_spec = COGAGENT_TARGETS
    # CogVLM's inputs plus the high-resolution copies of the images; collator, dataset columns, generation and
    # merge probes follow this list.
    model_input_names = (*CogVLMForCausalLM.model_input_names, "cross_images")

    def __init__(self, config: CogAgentConfig) -> None:
        CogVLMPreTrainedModel.__init__(self, config)
        self.model = CogAgentModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: Any = None,
        cross_images: Any = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """`CogVLMForCausalLM.forward` plus `cross_images` (N, 3, S', S'), one per image, in the order of `images`."""
        return super().forward(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, images=images,
            cross_images=cross_images, labels=labels, position_ids=position_ids, cache=cache, use_cache=use_cache,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, *args: Any, cross_images: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """CogVLM's step inputs; `cross_images` only at prefill (after it the cross K/V sit in the cache)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        inputs["cross_images"] = cross_images if inputs.get("images") is not None else None
        return inputs


__all__ = ["CogAgentConfig", "CogAgentModel", "CogAgentForCausalLM", "COGAGENT_FULL_PRECISION_MODULES"]
