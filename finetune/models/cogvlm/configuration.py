"""`CogVLMConfig`: reads the official CogVLM / CogVLM2 `config.json` files exactly as shipped.

The official files carry no `model_type`, and CogVLM2's key/value head count is absent from its
config.json (it came from the official config class default, docs/architecture.md §2). CogVLM1 files have no
KV-head field either but are plain multi-head attention. The two are told apart by the vocabulary:
CogVLM2 uses the Llama-3 tokenizer (128256 ids), CogVLM1 Vicuna's (32000). Tiny checkpoints written
by `cogtune make-tiny` state `cogvlm_version` and `num_multi_query_heads` explicitly.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

_VISION_DEFAULTS: dict[str, Any] = {
    "dropout_prob": 0.0,
    "hidden_act": "gelu",
    "in_channels": 3,
    "num_hidden_layers": 63,
    "hidden_size": 1792,
    "patch_size": 14,
    "num_heads": 16,
    "intermediate_size": 15360,
    "layer_norm_eps": 1e-06,
    "num_positions": 9217,
    "image_size": 1344,
}

# A vocabulary this large means the Llama-3 tokenizer, i.e. a CogVLM2 checkpoint.
_LLAMA3_VOCAB_MIN = 100_000


class CogVLMConfig(PretrainedConfig):
    """Configuration of CogVLM (v1) and CogVLM2 image models; field names are the official ones.

    Kit-level fields (absent from official files, derived when missing):
      cogvlm_version: 1 or 2, the generation. It is read once, here, to derive the named flags below; the
        model and processing code read the flags, never the version.
      num_multi_query_heads: key/value heads (8 for CogVLM2, = num_attention_heads for CogVLM1).
      rope_theta: 10000 (CogVLM1, hard-coded upstream) or 500000 (CogVLM2, hard-coded upstream).

    Named architecture flags (docs/architecture.md §5.4, §9.3, §10.4, §14), each derived from the generation
    unless given:
      vision_downsample_conv: a 2x2 stride-2 conv after the vision tower quarters the patches (CogVLM2).
      vision_expert_qkv_bias: the vision expert's fused QKV has a bias (CogVLM2).
      rope_fp32_math: rotary embedding computed in fp32 and rounded once, as the Triton kernel does (CogVLM2).
      prompt_table: the template table of the family's official code ("cogvlm"; CogAgent has its own).
    """

    model_type = "cogvlm"

    def __init__(
        self,
        vocab_size: int = 128256,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_multi_query_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        template_version: str = "chat",
        vision_config: dict[str, Any] | None = None,
        cogvlm_version: int | None = None,
        rope_theta: float | None = None,
        vision_downsample_conv: bool | None = None,
        vision_expert_qkv_bias: bool | None = None,
        rope_fp32_math: bool | None = None,
        prompt_table: str = "cogvlm",
        use_cache: bool = True,
        bos_token_id: int = 128000,
        eos_token_id: int | list[int] = 128001,
        pad_token_id: int = 128002,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.template_version = template_version
        self.vision_config = {**_VISION_DEFAULTS, **(vision_config or {})}
        if cogvlm_version is None:
            cogvlm_version = 2 if (num_multi_query_heads is not None or vocab_size >= _LLAMA3_VOCAB_MIN) else 1
        if cogvlm_version not in (1, 2):
            raise ValueError(f"cogvlm_version must be 1 or 2, got {cogvlm_version!r}")
        self.cogvlm_version = cogvlm_version
        if num_multi_query_heads is None:
            num_multi_query_heads = 8 if cogvlm_version == 2 else num_attention_heads
        self.num_multi_query_heads = num_multi_query_heads
        if rope_theta is None:
            rope_theta = 500000.0 if cogvlm_version == 2 else 10000.0
        self.rope_theta = rope_theta
        v2 = cogvlm_version == 2
        self.vision_downsample_conv = v2 if vision_downsample_conv is None else bool(vision_downsample_conv)
        self.vision_expert_qkv_bias = v2 if vision_expert_qkv_bias is None else bool(vision_expert_qkv_bias)
        self.rope_fp32_math = v2 if rope_fp32_math is None else bool(rope_fp32_math)
        self.prompt_table = prompt_table
        self.use_cache = use_cache
        if "torch_dtype" in kwargs:  # the official files' name for what transformers 5 calls `dtype`
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_diff_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes. transformers 5 writes `dtype`; the official files (and the official
        code on old transformers) use `torch_dtype`, so both are written."""
        out = super().to_diff_dict()
        if out.get("dtype") is not None:
            out.setdefault("torch_dtype", str(out["dtype"]).replace("torch.", ""))
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_tokens(self) -> int:
        """Length of one image's VISION span (patches after the optional 2x2 conv, plus boi and eoi)."""
        from ...families import image_token_count

        vc = self.vision_config
        return image_token_count(vc["image_size"], vc["patch_size"], self.vision_downsample_conv)
