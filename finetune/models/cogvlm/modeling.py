"""Clean-room CogVLM (v1) and CogVLM2 image models for current transformers.

Written from a description of the official behaviour (docs/architecture.md, cited as "§N"), not from the
official remote code. Module attribute names equal the official checkpoint keys, so official folders load
strictly without renaming. Differences from the official code are performance/robustness only:

* SDPA everywhere (decoder and vision tower); padded batches (packed ones only with a KV cache) use a boolean
  mask built once per forward instead of the official fp32 eager path (equivalent up to bf16 noise, §9.4).
* Expert routing gathers each expert's tokens once per forward (indices shared by all layers) instead of
  re-deriving boolean masks six times per layer (§7).
* transformers 5.x `Cache` objects, gradient checkpointing, packed sequences (segment-id attention masks) whose
  attention runs per segment, so a packed row costs the sum of its segments' squares (`segment_runs`).
* Padding is respected in generation, and left padding does not shift positions (see `default_position_ids`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ...families import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from ...targets import TargetSpec
from ...token_types import build_position_ids, get_expert_mask
from ..linear_cross_entropy import linear_cross_entropy
from .configuration import CogVLMConfig

# Modules that must never be quantized (bitsandbytes) - everything but the decoder's linears.
_LAYER = r"model\.layers\.\d+\."
# LoRA targets of the CogVLM family (docs/conventions.md §5), owned by the model class below.
COGVLM_TARGETS = TargetSpec(
    presets={
        "language_expert_attn": _LAYER + r"self_attn\.language_expert_(?:query_key_value|dense)",
        "vision_expert_attn": _LAYER + r"self_attn\.vision_expert_(?:query_key_value|dense)",
        "language_expert_mlp": _LAYER + r"mlp\.language_mlp\.(?:gate|up|down)_proj",
        "vision_expert_mlp": _LAYER + r"mlp\.vision_mlp\.(?:gate|up|down)_proj",
        "vision_tower": r"model\.vision\.transformer\.layers\.\d+\."
                        r"(?:attention\.(?:query_key_value|dense)|mlp\.fc[12])",
        "glu_adapter": r"model\.vision\.linear_proj\.(?:linear_proj|gate_proj|dense_h_to_4h|dense_4h_to_h)",
    },
    groups={
        "language_expert": ["language_expert_attn", "language_expert_mlp"],
        "vision_expert": ["vision_expert_attn", "vision_expert_mlp"],
        "experts": ["language_expert_attn", "language_expert_mlp", "vision_expert_attn", "vision_expert_mlp"],
    },
    # boi_eoi (bare parameters, not modules) is handled by finetune/extra_params.py.
    save_presets={"glu_adapter": "model.vision.linear_proj", "embed_tokens": "model.embed_tokens",
                  "lm_head": "lm_head"},
    components=[
        ("language expert attn", _LAYER + r"self_attn\.language_expert_(?:query_key_value|dense)"),
        ("language expert mlp", _LAYER + r"mlp\.language_mlp\.(?:gate|up|down)_proj"),
        ("vision expert attn", _LAYER + r"self_attn\.vision_expert_(?:query_key_value|dense)"),
        ("vision expert mlp", _LAYER + r"mlp\.vision_mlp\.(?:gate|up|down)_proj"),
        ("vision tower", r"model\.vision\.(?:transformer|patch_embedding)\..*"),
        ("vision adapter (conv, GLU, boi/eoi)", r"model\.vision\.(?:conv|linear_proj|boi|eoi).*"),
        ("embeddings + lm_head", r"(?:model\.embed_tokens|lm_head)\..*"),
        ("norms", r"model\.(?:layers\.\d+\.\w+_layernorm|norm)\..*"),
    ],
    # The last layer's vision-expert dense and MLP only feed image-position logits, which carry no loss.
    gradient_free_in_last_layer=r"self_attn\.vision_expert_dense|mlp\.vision_mlp\.(?:gate|up|down)_proj",
)
# Kept in full precision under bitsandbytes quantization: the vision tower with its adapter and boi/eoi, and
# the LM head (embeddings are never Linear, so never quantized). Read by loading, merge and the memory plan.
FULL_PRECISION_MODULES = ("model.vision", "lm_head")

# transformers renamed the KV-cache argument and output field `past_key_values` -> `cache` during 5.x and warns
# on every use of the old name. The name this release uses is read off its own output class, so the kit speaks
# each release's API: outputs carry the cache under CACHE_NAME, and generation hands it to `forward` under it.
CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


# ----------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ----------------------------------------------------------------------------------------------------------------


class CogVLMRMSNorm(nn.Module):
    """RMSNorm that multiplies by the weight in fp32 before casting back (§9.2; HF Llama casts first)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(dtype)  # weight promoted to fp32 here (§9.2)


class RotaryEmbedding(nn.Module):
    """Holds the checkpoint's persistent `inv_freq` buffer and turns position ids into cos/sin.

    Quirk (§10.2): the position ramp and `t * inv_freq` are computed in the dtype of `inv_freq` (bf16 in a
    bf16 model, so positions > 256 are rounded), cos/sin then cast to the activation dtype.
    """

    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim = dim
        self.base = base
        # Built in fp32, stored in the default dtype: `from_pretrained(dtype=bf16)` then holds a bf16 buffer, as
        # the official bf16 checkpoints do (§10.1), and the checkpoint's values are loaded into it.
        inv_freq = self.compute_inv_freq().to(torch.get_default_dtype())
        self.register_buffer("inv_freq", inv_freq, persistent=True)  # (hd/2,)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        t = position_ids.to(device=inv_freq.device, dtype=inv_freq.dtype)  # (B, L) ramp in inv_freq dtype (§10.2)
        freqs = t[..., None] * inv_freq  # (B, L, hd/2), still in inv_freq dtype
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, hd) half-split layout
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, L, hd) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX half-split rotation: concat(-x2, x1) over the two halves of the head dim (§10.3)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp32_math: bool = False) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, x: (B, heads, L, hd).

    `fp32_math` reproduces CogVLM2's Triton kernel (util.py, §10.4), which upcasts x, cos and sin to
    fp32 and rounds once on store; CogVLM1's de-tritoned torch RotaryEmbedding (§10.4) computes in the
    activation dtype. Identical in fp32; in bf16 this keeps each family bit-close to its official code.
    """
    if fp32_math and x.dtype != torch.float32:
        return (x.float() * cos.float() + rotate_half(x).float() * sin.float()).to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass
class ExpertRouting:
    """Token indices per expert, computed once per forward and reused by every layer (§7).

    Padded positions (attention mask 0) go to neither expert: their QKV, dense and MLP outputs are zeros, so a
    padded batch costs the experts (and their LoRA) only its real tokens. Nothing reads those positions: their
    keys are masked, their logits unlabelled. `inv` is None when every token is a real LANGUAGE token (text-only
    input without padding, decode steps): then the language expert runs on the whole tensor.
    """

    lang_idx: torch.Tensor | None = None  # (N_lang,) flat indices into B*L
    vis_idx: torch.Tensor | None = None  # (N_vis,)
    inv: torch.Tensor | None = None  # (B*L,) position of each token in cat([lang, vis, one zero row])

    @classmethod
    def from_token_types(cls, token_type_ids: torch.Tensor, real: torch.Tensor | None = None) -> ExpertRouting:
        """`real`: (B, L) bool, False at padded positions (None: every position is real)."""
        vision = get_expert_mask(token_type_ids).reshape(-1)  # (B*L,) eoi/padding -> language (§7)
        real = None if real is None else real.reshape(-1).to(vision.device)
        if real is not None:
            vision = vision & real
        vis_idx = vision.nonzero().squeeze(1)  # host sync of routing, once per forward
        all_real = real is None or bool(real.all())
        if vis_idx.numel() == 0 and all_real:
            return cls()
        language = ~vision if all_real else (~vision & real)
        lang_idx = language.nonzero().squeeze(1)
        n_out = lang_idx.numel() + vis_idx.numel()
        inv = torch.full_like(vision, n_out, dtype=torch.long)  # padded positions -> the zero row
        inv[torch.cat((lang_idx, vis_idx))] = torch.arange(n_out, device=vision.device)
        return cls(lang_idx, vis_idx, inv)

    def apply(self, x: torch.Tensor, language: nn.Module, vision: nn.Module) -> torch.Tensor:
        """Run each expert on its own tokens only; x: (B, L, in) -> (B, L, out)."""
        if self.inv is None:
            return language(x)
        b, n = x.shape[:2]
        if self.inv.device != x.device:  # layers split over devices (device_map): move the indices once
            self.lang_idx, self.vis_idx, self.inv = (t.to(x.device) for t in (self.lang_idx, self.vis_idx, self.inv))
        flat = x.reshape(b * n, -1)  # (B*L, in)
        parts = [language(flat.index_select(0, self.lang_idx))]
        if self.vis_idx.numel():
            parts.append(vision(flat.index_select(0, self.vis_idx)))
        parts.append(parts[0].new_zeros(1, parts[0].shape[-1]))  # the output of every padded position
        return torch.cat(parts).index_select(0, self.inv).view(b, n, -1)  # (B, L, out)


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU without bias (§9.1)."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        self.language_mlp = MLP(config)
        if config.vision_expert:
            self.vision_mlp = MLP(config)

    def forward(self, hidden_states: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        return routing.apply(hidden_states, self.language_mlp, getattr(self, "vision_mlp", None))


class VisionExpertAttention(nn.Module):
    """Expert-routed self-attention: fused [Q|K|V] per expert, RoPE, GQA (v2), SDPA (§9.3, §9.4)."""

    def __init__(self, config: CogVLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_multi_query_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_theta)
        self.rope_fp32_math = config.rope_fp32_math  # Triton rotary upcasts (§10.4)
        if config.vision_expert:  # CogVLM2-Video has none (§21); §3: only CogVLM2's vision-expert QKV has a bias.
            self.vision_expert_query_key_value = nn.Linear(h, qkv, bias=config.vision_expert_qkv_bias)
            self.vision_expert_dense = nn.Linear(h, h, bias=False)
        self.language_expert_query_key_value = nn.Linear(h, qkv, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: ExpertRouting,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
        segments: list[list[tuple[int, int, bool]]] | None = None,
    ) -> torch.Tensor:
        b, n, _ = hidden_states.shape  # (B, L, H)
        qkv = routing.apply(hidden_states, self.language_expert_query_key_value,
                            getattr(self, "vision_expert_query_key_value", None))
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)  # [Q | K | V] blocks, head-major (§9.3)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = k.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        v = v.view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, L, hd)
        cos, sin = (t.to(q.device) for t in rope)
        q, k = apply_rotary(q, cos, sin, self.rope_fp32_math), apply_rotary(k, cos, sin, self.rope_fp32_math)
        if cache is not None:  # cache holds K/V after RoPE, before GQA expansion (§9.5)
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, T, hd)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # GQA: query head h uses kv head h // rep, i.e. each kv head repeated consecutively (§9.3)
            t = k.shape[2]
            k = k[:, :, None].expand(b, self.num_kv_heads, rep, t, self.head_dim).reshape(b, self.num_heads, t, -1)
            v = v[:, :, None].expand(b, self.num_kv_heads, rep, t, self.head_dim).reshape(b, self.num_heads, t, -1)
        if segments is not None:
            out = segment_attention(q, k, v, segments)  # (B, nh, L, hd)
        else:
            mask = attn_mask.to(q.device) if attn_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, L, hd)
        out = out.transpose(1, 2).reshape(b, n, q_dim)  # (B, L, H)
        return routing.apply(out, self.language_expert_dense, getattr(self, "vision_expert_dense", None))


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Llama layer with expert-duplicated attention and MLP (§9.1)."""

    def __init__(self, config: CogVLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        routing: ExpertRouting,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None = None,
        segments: list[list[tuple[int, int, bool]]] | None = None,
    ) -> torch.Tensor:
        residual = hidden_states  # (B, L, H)
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), routing, rope, attn_mask, is_causal, cache, segments
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing)


# ----------------------------------------------------------------------------------------------------------------
# Vision tower (EVA2-CLIP-E, §5)
# ----------------------------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        d, p = vc["hidden_size"], vc["patch_size"]
        self.proj = nn.Conv2d(vc["in_channels"], d, kernel_size=p, stride=p, bias=True)
        self.cls_embedding = nn.Parameter(torch.zeros(1, d))  # 2-D (1, D) as in the checkpoint (§3)
        self.position_embedding = nn.Embedding(vc["num_positions"], d)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (N, g*g, D) row-major patches
        cls = self.cls_embedding.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat((cls, x), dim=1)  # (N, g*g+1, D)
        # whole table added (§5.1), read through the embedding's own forward: under ZeRO-3 a module's weight is
        # gathered only while that module runs (reading `.weight` here would see an empty partition)
        table = self.position_embedding(torch.arange(self.position_embedding.num_embeddings, device=x.device))
        return x + table.to(x.dtype)[None]


class VisionAttention(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        d = vc["hidden_size"]
        self.num_heads = vc["num_heads"]
        self.head_dim = d // self.num_heads
        self.query_key_value = nn.Linear(d, 3 * d, bias=True)
        self.dense = nn.Linear(d, d, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape  # (N, T, D)
        qkv = self.query_key_value(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, heads, T, hd) each
        # §5.3: official uses xformers (B, L, H, D); SDPA on (B, H, L, D) is the correct equivalent.
        out = F.scaled_dot_product_attention(q, k, v)  # non-causal, no mask, scale hd^-0.5
        return self.dense(out.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"], bias=True)
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU (§5.2)


class TransformerLayer(GradientCheckpointingLayer):
    """Quirk (§5.2): LayerNorm on each branch's *output*; the branch input is the raw residual stream."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        d, eps = vc["hidden_size"], vc["layer_norm_eps"]
        self.input_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention = VisionAttention(vc)
        self.mlp = VisionMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class Transformer(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(vc) for _ in range(vc["num_hidden_layers"]))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class GLU(nn.Module):
    """Adapter vision -> LLM width; no biases; LayerNorm with PyTorch's default eps 1e-5 (§5.5)."""

    def __init__(self, config: CogVLMConfig, in_features: int) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.linear_proj = nn.Linear(in_features, h, bias=False)
        self.norm1 = nn.LayerNorm(h)  # eps 1e-5, not the vision eps
        self.dense_h_to_4h = nn.Linear(h, i, bias=False)
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.dense_4h_to_h = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))  # (N, P, H)
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """Images (N, 3, S, S) -> (N, image_tokens, H) including boi/eoi (§5)."""

    # Parameter-name prefixes of `project` (after the tower): they run live when data.feature_cache holds the tower.
    projection_prefixes: tuple[str, ...] = ("linear_proj",)

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__()
        vc = config.vision_config
        d = vc["hidden_size"]
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        self.linear_proj = GLU(config, in_features=d)
        if config.vision_downsample_conv:  # 2x2 stride-2 downsampling, CogVLM2 only (§5.4)
            self.conv = nn.Conv2d(d, d, kernel_size=2, stride=2, bias=True)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.vision_config = dict(vc)
        self.feature_cache = None  # finetune/feature_cache.py (data.feature_cache), set after LoRA is applied

    def tower_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, D): the ViT without its cls token, after the optional 2x2 conv."""
        if getattr(self, "tower_released", False):
            raise RuntimeError("an image is missing from data.feature_cache and the vision tower's weights were "
                               "released after every image of the run was cached (finetune/feature_cache.py)")
        x = self.patch_embedding(images)  # (N, g*g+1, D)
        x = self.transformer(x)
        x = x[:, 1:]  # drop cls -> (N, g*g, D)
        if hasattr(self, "conv"):
            n, p, d = x.shape
            g = int(p**0.5)
            x = x.view(n, g, g, d).permute(0, 3, 1, 2)  # (N, D, g, g)
            x = self.conv(x).flatten(2).transpose(1, 2)  # (N, (g/2)^2, D) row-major
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tower features (N, P, D) -> (N, P, H): the GLU adapter into the language model's width."""
        return self.linear_proj(x)

    def glu_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, P, H): tower, then `project`."""
        return self.project(self.tower_features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cache = self.feature_cache
        if cache is None:
            x = self.glu_features(images)
        elif cache.stage == "glu":
            x = cache.lookup(images, self.glu_features)
        else:  # the GLU adapter trains: only the tower's output is cached
            x = self.project(cache.lookup(images, self.tower_features))
        # x: (N, P, H)
        boi = self.boi.to(x.dtype).expand(x.shape[0], -1, -1)
        eoi = self.eoi.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((boi, x, eoi), dim=1)  # (N, P+2, H)


# ----------------------------------------------------------------------------------------------------------------
# Masks and positions
# ----------------------------------------------------------------------------------------------------------------


def is_packed(attention_mask: torch.Tensor | None) -> bool:
    """Segment-id masks hold values > 1 (CONTRACTS.md); 0/1 masks are ordinary padding masks."""
    return attention_mask is not None and attention_mask.dtype != torch.bool and bool((attention_mask > 1).any())


def default_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) positions by the official rule (§8), per segment for packed masks.

    Deliberate deviation (§8.1): the official rule gives BOS of a left-padded row position 1,
    shifting the whole row by +1 compared with the same row unpadded. We subtract each row's (segment's)
    first real position so that a left-padded batch produces the same positions - and hence the same
    outputs - as each row alone. Unpadded and right-padded rows are unchanged.
    """
    if is_packed(attention_mask):
        out = torch.zeros_like(token_type_ids)
        seg = attention_mask.tolist()
        for b, row in enumerate(seg):
            start = 0
            while start < len(row):
                end = start
                while end < len(row) and row[end] == row[start]:
                    end += 1
                if row[start] != 0:
                    out[b, start:end] = build_position_ids(token_type_ids[b : b + 1, start:end])[0]
                start = end
        return out
    pos = build_position_ids(token_type_ids, attention_mask)  # (B, L)
    if attention_mask is None:
        return pos
    first = (attention_mask != 0).int().argmax(dim=1, keepdim=True)  # (B, 1) first real token
    return (pos - pos.gather(1, first)).clamp_min(0)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Return (SDPA mask, is_causal); the mask is (B, 1, L, T) bool, True = may attend.

    No padding (or right padding only) and no past -> plain causal SDPA (no mask tensor). Otherwise one boolean
    mask built once per forward and shared by all layers: causal (offset by the cache length) & key not padding
    & same segment.
    Each query may always attend itself so padding rows stay finite (their outputs are never used).
    """
    total = past_len + q_len
    packed = is_packed(attention_mask)
    if attention_mask is not None and not packed:
        if past_len == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # No padding, or right padding only (every training batch): a real query's causal past holds no
            # padding, so plain causal SDPA gives the same outputs at real positions with no mask tensor (GPUs then
            # run the flash kernel, which takes none; padded queries see earlier keys only, stay finite, unused).
            return None, q_len > 1
        if past_len > 0 and bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None:
        if past_len == 0:
            return None, q_len > 1
        if q_len == 1:
            return None, False
        attention_mask = torch.ones(1, total, dtype=torch.long, device=device)
    am = attention_mask.to(device)  # (B, T)
    q_pos = torch.arange(past_len, total, device=device)  # (L,)
    k_pos = torch.arange(total, device=device)  # (T,)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & (am != 0)[:, None, :]  # (B, L, T)
    if packed:
        allowed = allowed & (am[:, past_len:, None] == am[:, None, :])
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None], False  # (B, 1, L, T)


def segment_runs(attention_mask: torch.Tensor | None) -> list[list[tuple[int, int, bool]]] | None:
    """Per row, the maximal runs of one segment id as (start, end, real); None unless the mask is packed.

    `real` is False for padding (id 0). Runs cover the whole row in order. Derived from the segment ids the
    collator writes (CONTRACTS.md), with one host sync per forward; every layer reuses the result.
    """
    if not is_packed(attention_mask):
        return None
    runs: list[list[tuple[int, int, bool]]] = []
    for row in attention_mask.tolist():
        cuts = [0] + [i for i in range(1, len(row)) if row[i] != row[i - 1]] + [len(row)]
        runs.append([(a, e, row[a] != 0) for a, e in zip(cuts[:-1], cuts[1:])])
    return runs


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[list[tuple[int, int, bool]]]
) -> torch.Tensor:
    """Causal attention inside each packed segment; q, k, v (B, nh, L, hd) -> (B, nh, L, hd).

    One causal SDPA call per segment, so a packed row costs the sum of its segments' squares instead of
    the L x L of a block-diagonal mask. A padding run attends only to itself (its output is its own value,
    as under the mask it replaces; never used, but finite so gradients stay finite).

    Chosen by measurement on CPU (docs/benchmarks.md, "Packing that computes only the blocks"): FlexAttention
    has no CPU backward (and compiling it needs a C++ toolchain), nested-tensor SDPA refuses is_causal, and
    torch's varlen_attn is a CUDA flash kernel. On a GPU the same segments map one-to-one onto
    cu_seqlens for flash-attn's `flash_attn_varlen_func` / torch's `varlen_attn`, or a compiled FlexAttention
    block mask, which would also remove this loop's per-segment kernel launches.
    """
    rows = []
    for r, runs in enumerate(segments):
        pieces = [
            F.scaled_dot_product_attention(q[r : r + 1, :, a:e], k[r : r + 1, :, a:e], v[r : r + 1, :, a:e],
                                           is_causal=True)
            if real else v[r : r + 1, :, a:e]
            for a, e, real in runs
        ]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    config: CogVLMConfig
    base_model_prefix = "model"  # checkpoint keys start with "model." for the backbone (§3)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "TransformerLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, PatchEmbedding):
            init.normal_(module.cls_embedding, mean=0.0, std=std)
        elif isinstance(module, EVA2CLIPModel):
            init.normal_(module.boi, mean=0.0, std=std)
            init.normal_(module.eoi, mean=0.0, std=std)
        else:
            super()._init_weights(module)


class CogVLMModel(CogVLMPreTrainedModel):
    """Backbone: embeddings + vision tower + expert decoder; output the final-normed hidden states."""

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = CogVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, image_tokens, H), run in the pixel dtype (§5.8)."""
        return self.vision(images)

    @staticmethod
    def _stack_images(images: Any) -> torch.Tensor | None:
        if images is None:
            return None
        if isinstance(images, torch.Tensor):
            return images if images.numel() > 0 else None
        flat = [img for sample in images for img in (sample if isinstance(sample, (list, tuple)) else [sample])]
        # A video is a (T, 3, S, S) tensor: its frames are images in order (§21).
        return torch.cat([img if img.dim() == 4 else img[None] for img in flat]) if flat else None

    def _embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, images: Any) -> torch.Tensor:
        inputs_embeds = self.embed_tokens(input_ids)  # (B, L, H)
        vision_pos = token_type_ids == VISION_TOKEN_TYPE  # (B, L)
        n_vision = int(vision_pos.sum())
        pixels = self._stack_images(images)
        n_images = 0 if pixels is None else pixels.shape[0]
        if n_images == 0 and n_vision == 0:
            return inputs_embeds
        per_image = self.config.image_tokens
        if n_vision != n_images * per_image:
            raise ValueError(
                f"image span mismatch: token_type_ids mark {n_vision} vision positions, but {n_images} image(s) "
                f"give {n_images * per_image} features ({per_image} per image = (S/P)^2 [/4 for CogVLM2] + boi + "
                f"eoi). Every image needs exactly {per_image} consecutive VISION-typed positions."
            )
        param = self.vision.patch_embedding.proj.weight
        # The tower runs in the pixel dtype (§5.8); pixels of another dtype than the tower's weights (e.g. fp32
        # pixels from a collator, bf16 model) are cast to the weights' dtype instead of failing in the conv.
        feats = self.encode_images(pixels.to(device=param.device, dtype=param.dtype))  # (N, P+2, H)
        if feats.shape[1] != per_image:
            raise ValueError(
                f"image span mismatch: the vision tower produced {feats.shape[1]} features per image, the config "
                f"expects {per_image}; are the images {self.config.vision_config['image_size']} px?"
            )
        feats = feats.reshape(-1, feats.shape[-1]).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        # Row-major (batch-major) order, as the official index_put (§6).
        return inputs_embeds.masked_scatter(vision_pos[..., None], feats)

    def extra_layer_inputs(
        self, token_types: torch.Tensor, attention_mask: torch.Tensor | None, prefill: bool,
        inputs_embeds: torch.Tensor, **inputs: Any,
    ) -> tuple[torch.Tensor | None, ...]:
        """The one place a family adds a per-forward input to every decoder layer: none for CogVLM.

        Computed once per forward, after the embedding; each layer gets them positionally after the hidden states
        (so gradient checkpointing carries their gradients). `token_types` (B, L) of the new tokens; `prefill`:
        this forward embeds the prompt itself (no cache, no `inputs_embeds`), so it reads the images and the
        family's own inputs (`inputs`: the forward's extra keywords, e.g. CogAgent's `cross_images`).
        """
        return ()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: Any = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Decoder forward. Positions always follow the token types (§8.3), see `resolve_position_ids`.

        With a non-empty `cache`, `token_type_ids` (and `attention_mask`) may cover the whole sequence, past and
        new tokens; only the last L inputs are run. `past_key_values` is the pre-5.x name of `cache`.
        """
        cache = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        n = ref.shape[1]
        new_types, position_ids = resolve_position_ids(token_type_ids, attention_mask, position_ids, ref, past_len)

        prefill = inputs_embeds is None and past_len == 0
        if inputs_embeds is None:
            if past_len == 0:
                inputs_embeds = self._embed(input_ids, new_types, images)  # images only at prefill (§6)
            else:
                inputs_embeds = self.embed_tokens(input_ids)
        extra = self.extra_layer_inputs(
            new_types.to(inputs_embeds.device), attention_mask, prefill, inputs_embeds, **kwargs
        )

        real = attention_mask[:, -n:] != 0 if attention_mask is not None and attention_mask.dim() == 2 else None
        types = new_types.to(inputs_embeds.device)
        if not self.config.vision_expert:  # every real token, image ones included, uses the language weights (§21)
            types = torch.full_like(types, LANGUAGE_TOKEN_TYPE)
        routing = ExpertRouting.from_token_types(types, real)
        # All layers share the same inv_freq values; compute cos/sin once per forward from layer 0's buffer.
        rope = self.layers[0].self_attn.rotary_emb(position_ids, inputs_embeds.dtype)
        # Packed rows at prefill/training attend per segment (no L x L mask); with a cache, the mask path.
        segments = segment_runs(attention_mask) if past_len == 0 else None
        if segments is not None:
            attn_mask, is_causal = None, False
        else:
            attn_mask, is_causal = build_attention_mask(attention_mask, n, past_len, inputs_embeds.device)

        hidden_states = inputs_embeds  # (B, L, H)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, *extra, routing=routing, rope=rope, attn_mask=attn_mask, is_causal=is_causal,
                cache=cache, segments=segments,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache if use_cache else None})


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache under either name (`cache` since transformers 5.x renamed it, `past_key_values` before)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` (or as its older name `past_key_values`), not both")
    return cache if cache is not None else past_key_values


def resolve_position_ids(
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs: torch.Tensor,
    past_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token types of the L new tokens, their position ids), both (B, L); `inputs` (B, L, ...) the new tokens.

    CogVLM positions are a function of the token types (every patch of an image shares one id, §8),
    so they are derived here whenever the types of the whole sequence are known: always at prefill, and with a
    cache when `token_type_ids` covers past + new tokens (what `generate` passes). Explicit `position_ids`
    that contradict them on a real (unmasked) token are refused, so positions from a generic source (e.g.
    transformers' `0..L-1`) can never silently change the output. Only when a cache is used and just the new
    tokens' types are given must the caller supply the positions. New tokens after a cache are LANGUAGE:
    images are embedded at prefill only.
    """
    b, n = inputs.shape[:2]
    total = past_len + n
    full = None  # (B, past + L) token types of the whole sequence, when known
    if token_type_ids is None:
        new = torch.full((b, n), LANGUAGE_TOKEN_TYPE, dtype=torch.long, device=inputs.device)
        if past_len == 0:
            full = new
    elif token_type_ids.shape[-1] == total:
        full, new = token_type_ids, token_type_ids[:, total - n :]
    elif token_type_ids.shape[-1] == n:
        new = token_type_ids
    else:
        raise ValueError(
            f"token_type_ids has {token_type_ids.shape[-1]} columns, but the input holds {n} new tokens after "
            f"{past_len} cached ones; pass the types of the new tokens ({n}) or of the whole sequence ({total})"
        )
    if past_len > 0 and bool((new == VISION_TOKEN_TYPE).any()):
        raise ValueError(
            "token_type_ids mark VISION tokens after a non-empty cache: images are embedded at prefill only; new "
            "tokens must be LANGUAGE. Start without a cache to add an image."
        )
    if full is None:
        if position_ids is None:
            raise ValueError(
                f"cannot derive position ids for {n} new tokens after {past_len} cached ones from their token types "
                f"alone (an image span shares one position, docs/architecture.md §8): pass token_type_ids and "
                f"attention_mask for the whole sequence ({total} columns), as generate() does, or pass position_ids"
            )
        return new, position_ids
    mask = attention_mask
    if mask is not None and mask.shape[-1] != total:
        raise ValueError(f"attention_mask has {mask.shape[-1]} columns, expected {total} (cached + new tokens)")
    if mask is not None:
        mask = mask.to(full.device)
    derived = default_position_ids(full, mask)[:, total - n :]  # (B, L)
    if position_ids is not None:
        check_position_ids(position_ids, derived, None if mask is None else mask[:, total - n :])
    return new, derived


def check_position_ids(given: torch.Tensor, derived: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise if `given` differs from the positions the token types imply on any real token."""
    given = given.to(derived.device)
    if given.dim() != 2 or given.shape[-1] != derived.shape[-1] or given.shape[0] not in (1, derived.shape[0]):
        raise ValueError(f"position_ids of shape {tuple(given.shape)} do not fit the input {tuple(derived.shape)}")
    given = given.expand_as(derived)
    bad = given != derived
    if mask is not None:
        bad &= mask != 0
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"position_ids contradict token_type_ids: row {row}, column {col} is {int(given[row, col])}"
            f" but CogVLM's rule gives {int(derived[row, col])} (every patch of an image shares one position, see "
            f"docs/architecture.md §8). Omit position_ids: the model derives them from the token types and mask."
        )


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free `nn.Linear` whose weight is an ordinary tensor (not wrapped by peft, not a sharded DTensor)."""
    weight = getattr(module, "weight", None)
    return type(module) is nn.Linear and module.bias is None and type(weight) in (nn.Parameter, torch.Tensor)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    """CogVLM / CogVLM2 image chat model with LM head, loss and generation hooks."""

    # The inputs a batch carries, declared once: the collator's output keys, the dataset's columns, generation's
    # inputs and the merge probes all read this (labels are the loss target, not an input).
    model_input_names: tuple[str, ...] = ("input_ids", "token_type_ids", "attention_mask", "position_ids", "images")
    _tied_weights_keys: dict[str, str] = {}
    # What the kit reads off the class instead of hard-coding module names elsewhere (docs/adding-a-family.md).
    target_spec: TargetSpec = COGVLM_TARGETS
    full_precision_modules: tuple[str, ...] = FULL_PRECISION_MODULES

    def __init__(self, config: CogVLMConfig) -> None:
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # not tied (§11)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    # --- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, strict: bool = True, **kwargs: Any):
        """`PreTrainedModel.from_pretrained` with two guarantees.

        * bitsandbytes quantizes only the decoder's linears: the vision tower, adapter, boi/eoi and lm_head
          are added to `llm_int8_skip_modules` (embeddings are never Linear, so never quantized).
        * strict: missing or unexpected checkpoint keys raise (transformers only logs them); `strict=False`
          restores the lenient behaviour.
        """
        qc = kwargs.get("quantization_config")
        if qc is not None and hasattr(qc, "llm_int8_skip_modules"):
            qc = copy.deepcopy(qc)
            qc.llm_int8_skip_modules = sorted(set(qc.llm_int8_skip_modules or []) | set(cls.full_precision_modules))
            kwargs["quantization_config"] = qc
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if strict and any(bad.values()):
            details = "; ".join(f"{k}: {v[:8]}{' ...' if len(v) > 8 else ''} ({len(v)})" for k, v in bad.items() if v)
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path} does not match {cls.__name__} exactly: {details}. "
                "Is it a CogVLM/CogVLM2 image checkpoint with a matching config.json? strict=False loads anyway."
            )
        return (model, info) if want_info else model

    # --- forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        images: Any = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        loss_only: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Official signature (§6, §11), plus kit extensions documented in docs/CONTRACTS.md.

        `loss_only` (default: True when training with labels): run lm_head only where a label exists and
        return `logits=None`. Image and prompt positions, most of a CogVLM sequence, carry no label, so
        this skips a (B, L, V) fp32 tensor and its gradient (~3.6 GB at CogVLM2's 2306-token image span).
        `cache` is the KV cache (`past_key_values`, its name before transformers renamed it, is accepted too);
        the output carries it under the name the installed transformers uses (`CACHE_NAME`).
        """
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None and not self.training
        outputs = self.model(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            images=images,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            **kwargs,  # family-specific inputs (CogAgent's cross_images)
        )
        hidden_states = outputs.last_hidden_state  # (B, L, H)
        cache = {CACHE_NAME: getattr(outputs, CACHE_NAME)}
        if loss_only is None:
            loss_only = self.training
        if labels is not None and loss_only:
            shift_labels = labels[:, 1:].to(hidden_states.device)  # causal shift (§11)
            keep = shift_labels != -100  # (B, L-1)
            picked = hidden_states[:, :-1][keep]  # (N_labels, H)
            if _plain_linear(self.lm_head):  # chunked over the vocabulary, no (N, V) gradient
                loss = linear_cross_entropy(picked, self.lm_head.weight, shift_labels[keep])
            else:  # a wrapped head (LoRA on lm_head, sharded weight): through its own forward
                loss = F.cross_entropy(self.lm_head(picked).float(), shift_labels[keep], reduction="sum")
            denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
            if isinstance(denom, torch.Tensor):
                denom = denom.to(loss.device)
            return CausalLMOutputWithPast(loss=loss / denom, logits=None, **cache)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states).float()  # (B, L, V) always fp32 (§11)

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # causal shift (§11)
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            if num_items_in_batch is not None:  # token-weighted across gradient accumulation
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                if isinstance(num_items_in_batch, torch.Tensor):
                    num_items_in_batch = num_items_in_batch.to(loss.device)
                loss = loss / num_items_in_batch
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache)

    # --- generation hooks ----------------------------------------------------------------------------------

    def _prepare_attention_mask_for_generation(
        self, inputs_tensor: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """All ones when the caller passed no mask: image placeholders use the pad id (§6), so the
        default "infer from pad tokens" rule would mask the image. Pass `attention_mask` for padded batches."""
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]) -> None:
        """No generic positions (transformers >= 5.x would make `0..L-1`): the model derives CogVLM's own."""
        return None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        images: Any = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Inputs of one generation step, the same on every transformers release the kit supports.

        The model gets the new tokens, the token types and attention mask of the WHOLE sequence and the cache, so
        it derives the positions itself (`resolve_position_ids`): whatever positions the installed `generate`
        would make are never used. `position_ids` a caller passed to `generate` are checked against the token
        types at prefill and refused if they differ. Images go in at prefill only; new tokens are LANGUAGE
        (`_update_model_kwargs_for_generation`).
        """
        if inputs_embeds is not None:
            raise ValueError("CogVLM generation takes input_ids + token_type_ids (+ images), not inputs_embeds")
        cache = _one_cache(cache, past_key_values)
        past_len = cache.get_seq_length() if cache is not None else 0
        if token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, LANGUAGE_TOKEN_TYPE)
        total = token_type_ids.shape[1]  # generate keeps the types of the whole sequence (prompt + generated)
        n = total - past_len
        if n <= 0 or n > input_ids.shape[1] or (next_sequence_length is not None and next_sequence_length != n):
            raise ValueError(
                f"generation step: {input_ids.shape[1]} input ids, token_type_ids for {total} tokens, {past_len} "
                f"cached; token_type_ids must cover the whole sequence (prompt + generated tokens)"
            )
        if position_ids is not None and past_len == 0:  # a caller's explicit positions: check them once
            k = position_ids.shape[-1]
            mask = attention_mask[:, :k] if attention_mask is not None else None
            check_position_ids(position_ids, default_position_ids(token_type_ids[:, :k], mask), mask)
        model_inputs: dict[str, Any] = {
            "input_ids": input_ids[:, -n:],
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            CACHE_NAME: cache,
            "images": images if past_len == 0 else None,  # images only at prefill (§6)
        }
        for key, value in kwargs.items():
            if key not in model_inputs and key not in ("labels", "cache_position", "is_first_iteration"):
                model_inputs[key] = value
        return model_inputs

    def _update_model_kwargs_for_generation(
        self, outputs: Any, model_kwargs: dict[str, Any], is_encoder_decoder: bool = False, num_new_tokens: int = 1
    ) -> dict[str, Any]:
        """Like the default, but new tokens are typed LANGUAGE (§17), not a copy of the last type."""
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if token_type_ids is not None:
            new = token_type_ids.new_full((token_type_ids.shape[0], num_new_tokens), LANGUAGE_TOKEN_TYPE)
            model_kwargs["token_type_ids"] = torch.cat((token_type_ids, new), dim=-1)
        return model_kwargs


__all__ = ["CogVLMPreTrainedModel", "CogVLMModel", "CogVLMForCausalLM"]
