"""Model tests: official key layout, numerics vs a naive reference, routing, positions, masks, cache, loading."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.models.cogvlm.configuration import CogVLMConfig
from finetune.models.cogvlm.modeling import (
    CogVLMForCausalLM,
    ExpertRouting,
    build_attention_mask,
    default_position_ids,
)
from finetune.token_types import build_position_ids, get_expert_mask
from tests.conftest import REFERENCE, build_tiny_model, make_inputs

# ---------------------------------------------------------------------------------------------------------------
# Official layout (meta device: no memory, no weights)
# ---------------------------------------------------------------------------------------------------------------


def _meta_model(config_name: str) -> CogVLMForCausalLM:
    config = CogVLMConfig.from_json_file(str(REFERENCE / "configs" / config_name))
    with torch.device("meta"):
        return CogVLMForCausalLM(config)


def test_cogvlm2_state_dict_matches_official_weight_map():
    model = _meta_model("cogvlm2-llama3-chat-19B.config.json")
    index = json.loads((REFERENCE / "cogvlm2-llama3-chat-19B.model.safetensors.index.json").read_text())
    official = set(index["weight_map"])
    ours = dict(model.state_dict())
    assert len(official) == 1221
    assert set(ours) == official, (sorted(set(ours) - official)[:5], sorted(official - set(ours))[:5])
    shapes = {  # docs/architecture.md §3
        "model.embed_tokens.weight": (128256, 4096),
        "lm_head.weight": (128256, 4096),
        "model.layers.0.self_attn.language_expert_query_key_value.weight": (6144, 4096),
        "model.layers.0.self_attn.vision_expert_query_key_value.weight": (6144, 4096),
        "model.layers.0.self_attn.vision_expert_query_key_value.bias": (6144,),
        "model.layers.31.self_attn.rotary_emb.inv_freq": (64,),
        "model.layers.0.mlp.vision_mlp.gate_proj.weight": (14336, 4096),
        "model.layers.0.mlp.language_mlp.down_proj.weight": (4096, 14336),
        "model.vision.patch_embedding.proj.weight": (1792, 3, 14, 14),
        "model.vision.patch_embedding.cls_embedding": (1, 1792),
        "model.vision.patch_embedding.position_embedding.weight": (9217, 1792),
        "model.vision.transformer.layers.62.attention.query_key_value.weight": (5376, 1792),
        "model.vision.transformer.layers.62.mlp.fc1.weight": (15360, 1792),
        "model.vision.conv.weight": (1792, 1792, 2, 2),
        "model.vision.linear_proj.linear_proj.weight": (4096, 1792),
        "model.vision.linear_proj.dense_h_to_4h.weight": (14336, 4096),
        "model.vision.linear_proj.dense_4h_to_h.weight": (4096, 14336),
        "model.vision.boi": (1, 1, 4096),
    }
    for key, shape in shapes.items():
        assert tuple(ours[key].shape) == shape, key
    assert model.config.image_tokens == 2306
    assert "model.layers.0.self_attn.language_expert_query_key_value.bias" not in ours


@pytest.mark.parametrize(
    ("config_name", "billions", "n_keys"),
    [("cogvlm-chat-hf.config.json", 17.640, 1187), ("cogvlm2-llama3-chat-19B.config.json", 19.503, 1221)],
)
def test_parameter_counts(config_name, billions, n_keys):
    model = _meta_model(config_name)
    n = sum(p.numel() for p in model.parameters())  # inv_freq buffers are not parameters (docs/architecture.md §3)
    assert abs(n / 1e9 - billions) < 1e-3, n
    assert len(model.state_dict()) == n_keys  # docs/architecture.md §3 (inv_freq buffers included)


# ---------------------------------------------------------------------------------------------------------------
# Golden token-type rules
# ---------------------------------------------------------------------------------------------------------------

# BOS, boi, 3 patches, eoi, 2 text, 2 pads (types: pads are LANGUAGE)
GOLD_TYPES = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
GOLD_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])


def test_golden_expert_mask():
    expected = [[False, True, True, True, True, False, False, False, False, False]]  # eoi (index 5) -> language
    assert get_expert_mask(GOLD_TYPES).tolist() == expected
    routing = ExpertRouting.from_token_types(GOLD_TYPES)
    assert routing.vis_idx.tolist() == [1, 2, 3, 4]
    assert routing.lang_idx.tolist() == [0, 5, 6, 7, 8, 9]
    # text only / decode step: no gather at all
    assert ExpertRouting.from_token_types(torch.zeros(2, 1, dtype=torch.long)).inv is None


def test_golden_position_ids():
    # BOS=0, boi=1, patches share 2, eoi=3, text 4, 5; padding does not advance (docs/architecture.md §8)
    assert build_position_ids(GOLD_TYPES, GOLD_MASK).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5, 5, 5]]
    assert default_position_ids(GOLD_TYPES, GOLD_MASK).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5, 5, 5]]
    # Left padding: official rule shifts the row by +1; default_position_ids removes the shift.
    left_types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0]])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    assert build_position_ids(left_types, left_mask).tolist() == [[0, 0, 1, 2, 3, 3, 4, 5]]
    assert default_position_ids(left_types, left_mask).tolist() == [[0, 0, 0, 1, 2, 2, 3, 4]]
    # Packed: positions restart per segment, padding (segment 0) gets 0.
    packed_types = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0]])
    packed_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    assert default_position_ids(packed_types, packed_mask).tolist() == [[0, 1, 2, 2, 3, 4, 0, 1, 2, 3, 4, 0]]
    # text only: plain 0..L-1
    assert default_position_ids(torch.zeros(1, 5, dtype=torch.long)).tolist() == [[0, 1, 2, 3, 4]]


def test_attention_mask_shapes():
    assert build_attention_mask(None, 5, 0, torch.device("cpu")) == (None, True)
    assert build_attention_mask(torch.ones(2, 6), 1, 5, torch.device("cpu")) == (None, False)
    mask, causal = build_attention_mask(torch.tensor([[1, 1, 2, 2, 0]]), 5, 0, torch.device("cpu"))
    assert not causal and mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],  # padding query attends only itself (finite, unused)
    ]
    # Right padding only (training batches): plain causal SDPA, no mask tensor; left padding keeps the mask.
    right = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert build_attention_mask(right, 4, 0, torch.device("cpu")) == (None, True)
    mask, causal = build_attention_mask(right.flip(1), 4, 0, torch.device("cpu"))
    assert not causal and mask[1, 0, 3].int().tolist() == [0, 0, 1, 1]
    assert build_attention_mask(right, 1, 3, torch.device("cpu"))[0] is not None  # decoding with a cache


def test_right_padded_causal_path_equals_the_masked_path(tiny_model, monkeypatch):
    """Outputs at real positions of a right-padded batch are the same with the mask tensor and without it."""
    import finetune.models.cogvlm.modeling as modeling

    model = tiny_model.eval()
    ids, types, images = make_inputs(model.config, [list(range(5, 15)), list(range(20, 30))])
    am = torch.ones_like(ids)
    am[1, -4:] = 0  # row 1 right-padded
    masks = []  # what each decoder SDPA call received
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: masks.append(attn_mask is not None and
                                                                          q.shape[-2] == ids.shape[1])
                        or sdpa(q, k, v, attn_mask=attn_mask, **kw))
    fast = model(input_ids=ids, token_type_ids=types, images=images, attention_mask=am, use_cache=False).logits
    assert masks and not any(masks)  # no mask tensor on the shortcut

    def general_mask(attention_mask, q_len, past_len, device):  # the boolean mask the shortcut replaces
        pos = torch.arange(q_len)
        allowed = (pos[None, :] <= pos[:, None])[None] & attention_mask.bool()[:, None, :]
        return (allowed | torch.eye(q_len, dtype=torch.bool)[None])[:, None], False

    monkeypatch.setattr(modeling, "build_attention_mask", general_mask)
    masks.clear()
    slow = model(input_ids=ids, token_type_ids=types, images=images, attention_mask=am, use_cache=False).logits
    assert sum(masks) == model.config.num_hidden_layers  # every decoder layer ran with the mask tensor
    keep = am.bool()
    torch.testing.assert_close(fast[keep], slow[keep], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Naive reference forward written from docs/architecture.md (loops, dense experts + where, manual fp32 softmax)
# ---------------------------------------------------------------------------------------------------------------


def _ref_positions(types: list[int]) -> list[int]:
    n = len(types)
    t = list(types)
    for i in range(n):  # boi / eoi re-typed LANGUAGE (docs/architecture.md §8)
        if types[i] == 1 and (i == 0 or types[i - 1] != 1 or i == n - 1 or types[i + 1] != 1):
            t[i] = 0
    pos, cur = [0], 0
    for i in range(1, n):
        if t[i] == 0 or (t[i] == 1 and t[i - 1] == 0):
            cur += 1
        pos.append(cur)
    return pos


def _ref_vision(sd: dict, cfg: CogVLMConfig, image: torch.Tensor) -> torch.Tensor:
    vc = cfg.vision_config
    p, heads = vc["patch_size"], vc["num_heads"]
    pre = "model.vision."
    g = image.shape[-1] // p
    patches = []
    for r in range(g):
        for c in range(g):
            tile = image[:, r * p : (r + 1) * p, c * p : (c + 1) * p]
            w = sd[pre + "patch_embedding.proj.weight"]
            patches.append((w * tile).sum(dim=(1, 2, 3)) + sd[pre + "patch_embedding.proj.bias"])
    x = torch.stack([sd[pre + "patch_embedding.cls_embedding"][0]] + patches)
    x = x + sd[pre + "patch_embedding.position_embedding.weight"]
    d = x.shape[-1]
    hd = d // heads
    for j in range(vc["num_hidden_layers"]):
        lp = f"{pre}transformer.layers.{j}."
        qkv = x @ sd[lp + "attention.query_key_value.weight"].T + sd[lp + "attention.query_key_value.bias"]
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        outs = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            s = (q[:, sl] @ k[:, sl].T) * hd**-0.5
            outs.append(torch.softmax(s, dim=-1) @ v[:, sl])
        att = torch.cat(outs, dim=-1) @ sd[lp + "attention.dense.weight"].T + sd[lp + "attention.dense.bias"]
        def ln(y, n, lp=lp):
            return F.layer_norm(y, (d,), sd[lp + n + ".weight"], sd[lp + n + ".bias"], vc["layer_norm_eps"])

        x = x + ln(att, "input_layernorm")
        mlp = F.gelu(x @ sd[lp + "mlp.fc1.weight"].T + sd[lp + "mlp.fc1.bias"]) @ sd[lp + "mlp.fc2.weight"].T
        x = x + ln(mlp + sd[lp + "mlp.fc2.bias"], "post_attention_layernorm")
    x = x[1:]
    if cfg.cogvlm_version == 2:
        grid = x.view(g, g, d)
        w, b = sd[pre + "conv.weight"], sd[pre + "conv.bias"]
        out = []
        for r in range(g // 2):
            for c in range(g // 2):
                acc = b.clone()
                for dr in range(2):
                    for dc in range(2):
                        acc = acc + w[:, :, dr, dc] @ grid[2 * r + dr, 2 * c + dc]
                out.append(acc)
        x = torch.stack(out)
    gp = pre + "linear_proj."
    y = x @ sd[gp + "linear_proj.weight"].T
    y = F.gelu(F.layer_norm(y, (y.shape[-1],), sd[gp + "norm1.weight"], sd[gp + "norm1.bias"], 1e-5))
    y = (F.silu(y @ sd[gp + "gate_proj.weight"].T) * (y @ sd[gp + "dense_h_to_4h.weight"].T)) @ sd[
        gp + "dense_4h_to_h.weight"
    ].T
    return torch.cat([sd[pre + "boi"][0], y, sd[pre + "eoi"][0]])


def _ref_forward(model: CogVLMForCausalLM, ids: list[int], types: list[int], image: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    n = len(ids)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_multi_query_heads, cfg.head_dim
    h = sd["model.embed_tokens.weight"][torch.tensor(ids)].clone()
    feats = _ref_vision(sd, cfg, image)
    vis_rows = [i for i in range(n) if types[i] == 1]
    for row, i in enumerate(vis_rows):
        h[i] = feats[row]
    pos = _ref_positions(types)
    vis_expert = torch.tensor([types[i] == 1 and i + 1 < n and types[i + 1] == 1 for i in range(n)])[:, None]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rope(x, inv_freq):  # x (n, hd): explicit half-split rotation per position (docs/architecture.md §10.3)
        out = torch.empty_like(x)
        half = hd // 2
        for t in range(n):
            for i in range(half):
                a = pos[t] * inv_freq[i]
                c, s = math.cos(a), math.sin(a)
                out[t, i] = x[t, i] * c - x[t, i + half] * s
                out[t, i + half] = x[t, i + half] * c + x[t, i] * s
        return out

    for layer in range(cfg.num_hidden_layers):
        lp = f"model.layers.{layer}."
        x = rms(h, sd[lp + "input_layernorm.weight"])
        qkv_l = x @ sd[lp + "self_attn.language_expert_query_key_value.weight"].T
        qkv_v = x @ sd[lp + "self_attn.vision_expert_query_key_value.weight"].T
        if cfg.cogvlm_version == 2:
            qkv_v = qkv_v + sd[lp + "self_attn.vision_expert_query_key_value.bias"]
        qkv = torch.where(vis_expert, qkv_v, qkv_l)
        inv_freq = sd[lp + "self_attn.rotary_emb.inv_freq"].tolist()
        q_all, k_all, v_all = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        heads = []
        for head in range(nh):
            kvh = head // (nh // nkv)  # GQA: consecutive repeat
            q = rope(q_all[:, head * hd : (head + 1) * hd], inv_freq)
            k = rope(k_all[:, kvh * hd : (kvh + 1) * hd], inv_freq)
            v = v_all[:, kvh * hd : (kvh + 1) * hd]
            scores = (q / math.sqrt(hd)) @ k.T
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(torch.softmax(scores.float(), dim=-1) @ v)
        att = torch.cat(heads, dim=-1)
        dense = torch.where(
            vis_expert,
            att @ sd[lp + "self_attn.vision_expert_dense.weight"].T,
            att @ sd[lp + "self_attn.language_expert_dense.weight"].T,
        )
        h = h + dense
        x = rms(h, sd[lp + "post_attention_layernorm.weight"])

        def mlp(kind, x=x, lp=lp):
            m = f"{lp}mlp.{kind}_mlp."
            return (F.silu(x @ sd[m + "gate_proj.weight"].T) * (x @ sd[m + "up_proj.weight"].T)) @ sd[
                m + "down_proj.weight"
            ].T

        h = h + torch.where(vis_expert, mlp("vision"), mlp("language"))
    h = rms(h, sd["model.norm.weight"])
    return h @ sd["lm_head.weight"].T


def test_logits_match_naive_reference(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7, 8, 9]], seed=3)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, token_type_ids=types, images=images).logits[0]
        ref = _ref_forward(tiny_model, ids[0].tolist(), types[0].tolist(), images[0])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


def test_rope_ramp_in_inv_freq_dtype():
    """docs/architecture.md §10.2: in a bf16 model positions are rounded in bf16 (257 -> 256, 259 -> 260)."""
    from finetune.models.cogvlm.modeling import RotaryEmbedding

    rot = RotaryEmbedding(8, 10000.0).to(torch.bfloat16)
    cos, _ = rot(torch.tensor([[256, 257, 258, 259, 260]]), torch.float32)
    assert torch.equal(cos[0, 0, 0], cos[0, 0, 1]) and torch.equal(cos[0, 0, 3], cos[0, 0, 4])
    assert not torch.equal(cos[0, 0, 1], cos[0, 0, 2])
    rot32 = RotaryEmbedding(8, 10000.0)
    cos32, _ = rot32(torch.tensor([[256, 257]]), torch.float32)
    assert not torch.equal(cos32[0, 0, 0], cos32[0, 0, 1])


# ---------------------------------------------------------------------------------------------------------------
# Routing, images
# ---------------------------------------------------------------------------------------------------------------


def test_eoi_and_padding_use_language_expert(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 0, 0]])
    types[0, -2:] = 0  # the two trailing "pads" are LANGUAGE
    mlp = tiny_model.model.layers[0].mlp
    x = torch.randn(1, ids.shape[1], cfg.hidden_size)
    routing = ExpertRouting.from_token_types(types)
    with torch.no_grad():
        before = mlp(x, routing)
        perturbed = copy.deepcopy(mlp)
        for p in perturbed.vision_mlp.parameters():
            p.add_(1.0)
        after = perturbed(x, routing)
    changed = (before - after).abs().amax(-1)[0] > 0
    span = cfg.image_tokens
    expected = [False] + [True] * (span - 1) + [False] + [False] * 4  # BOS, boi+patches, eoi, text, pads
    assert changed.tolist() == expected

    # Whole model: perturbing every vision-expert weight leaves BOS logits untouched (causal, language expert).
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        base = model(input_ids=ids, token_type_ids=types, images=images).logits
        for name, p in model.named_parameters():
            if "vision_expert" in name or "vision_mlp" in name:
                p.add_(0.5)
        new = model(input_ids=ids, token_type_ids=types, images=images).logits
    assert torch.equal(base[0, 0], new[0, 0])
    assert not torch.allclose(base[0, 1], new[0, 1])


def test_list_of_lists_images_equal_tensor(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        a = tiny_model(input_ids=ids, token_type_ids=types, images=images).logits
        b = tiny_model(input_ids=ids, token_type_ids=types, images=[[images[0]], [images[1]]]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_image_span_mismatch_error(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7]])
    types[0, 1] = 0  # one VISION position short
    with pytest.raises(ValueError, match="image span mismatch: token_type_ids mark"):
        tiny_model(input_ids=ids, token_type_ids=types, images=images)
    with pytest.raises(ValueError, match="image span mismatch"):
        tiny_model(input_ids=ids, token_type_ids=make_inputs(cfg, [[5, 6, 7]])[1], images=None)


# ---------------------------------------------------------------------------------------------------------------
# Batching: padding and packing
# ---------------------------------------------------------------------------------------------------------------


def _single(model, ids, types, image):
    with torch.no_grad():
        return model(input_ids=ids[None], token_type_ids=types[None], images=image[None]).logits[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_rows(tiny_model, side):
    cfg = tiny_model.config
    long_ids, long_types, images = make_inputs(cfg, [[5, 6, 7, 8, 9]] * 2, seed=1)
    short_ids, short_types = long_ids[1, :-3], long_types[1, :-3]
    pad = 3
    pad_ids = torch.full((pad,), cfg.pad_token_id)
    zeros = torch.zeros(pad, dtype=torch.long)
    if side == "right":
        row2 = (torch.cat([short_ids, pad_ids]), torch.cat([short_types, zeros]), torch.cat([torch.ones_like(
            short_ids), zeros]))
        valid = slice(0, short_ids.numel())
    else:
        row2 = (torch.cat([pad_ids, short_ids]), torch.cat([zeros, short_types]), torch.cat([zeros, torch.ones_like(
            short_ids)]))
        valid = slice(pad, None)
    ids = torch.stack([long_ids[0], row2[0]])
    types = torch.stack([long_types[0], row2[1]])
    mask = torch.stack([torch.ones_like(long_ids[0]), row2[2]])
    with torch.no_grad():
        batch = tiny_model(input_ids=ids, token_type_ids=types, attention_mask=mask, images=images).logits
    torch.testing.assert_close(batch[0], _single(tiny_model, long_ids[0], long_types[0], images[0]), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(batch[1, valid], _single(tiny_model, short_ids, short_types, images[1]), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text-only"])
def test_padded_positions_reach_no_expert(tiny_model, with_image):
    """The experts (and any LoRA inside them) see real tokens only; a padded batch pays for its real tokens."""
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7, 8, 9]] * 2, seed=2)
    if not with_image:
        ids, types, images = ids[:, -5:], torch.zeros_like(types[:, -5:]), None
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on row 1
    ids[1, -3:] = cfg.pad_token_id
    types[1, -3:] = 0
    rows = []
    layer = tiny_model.model.layers[0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
             for m in (layer.self_attn.language_expert_query_key_value, layer.mlp.language_mlp.gate_proj,
                       layer.self_attn.vision_expert_query_key_value, layer.mlp.vision_mlp.gate_proj)]
    try:
        with torch.no_grad():
            out = tiny_model(input_ids=ids, token_type_ids=types, attention_mask=mask, images=images).logits
    finally:
        for h in hooks:
            h.remove()
    assert sum(rows) == 2 * int(mask.sum())  # each real token once in the attention QKV and once in the MLP
    single = tiny_model(input_ids=ids[1:, :-3], token_type_ids=types[1:, :-3],
                        images=None if images is None else images[1:]).logits
    torch.testing.assert_close(out[1, :-3], single[0].detach(), atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_rows(tiny_model):
    cfg = tiny_model.config
    ids_a, types_a, img_a = make_inputs(cfg, [[5, 6, 7]], seed=4)
    ids_b, types_b, img_b = make_inputs(cfg, [[8, 9, 10, 11, 12]], seed=5)
    la, lb = ids_a.shape[1], ids_b.shape[1]
    ids = torch.cat([ids_a[0], ids_b[0], torch.tensor([cfg.pad_token_id] * 2)])[None]
    types = torch.cat([types_a[0], types_b[0], torch.zeros(2, dtype=torch.long)])[None]
    mask = torch.tensor([[1] * la + [2] * lb + [0, 0]])
    labels = ids.clone()
    with torch.no_grad():
        out = tiny_model(input_ids=ids, token_type_ids=types, attention_mask=mask, images=torch.cat([img_a, img_b]),
                         labels=labels)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[0, :la], _single(tiny_model, ids_a[0], types_a[0], img_a[0]), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(out.logits[0, la : la + lb], _single(tiny_model, ids_b[0], types_b[0], img_b[0]),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Loss and training
# ---------------------------------------------------------------------------------------------------------------


def test_loss_mean_and_num_items(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7, 8], [9, 10, 11, 12]])
    labels = ids.clone()
    labels[:, : 1 + cfg.image_tokens] = -100
    with torch.no_grad():
        out = tiny_model(input_ids=ids, token_type_ids=types, images=images, labels=labels)
        n_items = int((labels[:, 1:] != -100).sum())
        summed = tiny_model(input_ids=ids, token_type_ids=types, images=images, labels=labels,
                            num_items_in_batch=torch.tensor(2 * n_items)).loss
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(summed, manual / 2)


def test_gradient_checkpointing_grads_equal(version):
    plain = build_tiny_model(version).train()
    ckpt = copy.deepcopy(plain)
    # The name of transformers >= 5.x (the old one warns); the oldest supported 5.x has only the old one.
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    assert all(layer.gradient_checkpointing for layer in ckpt.model.vision.transformer.layers)
    ids, types, images = make_inputs(plain.config, [[5, 6, 7, 8]] * 2)
    for m in (plain, ckpt):
        m(input_ids=ids, token_type_ids=types, images=images, labels=ids).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt.model.vision.patch_embedding.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


def _generate(model, **kw):
    kw.setdefault("max_new_tokens", 6)
    return model.generate(do_sample=False, pad_token_id=model.config.pad_token_id, **kw)


def test_greedy_cache_equals_no_cache(tiny_model):
    ids, types, images = make_inputs(tiny_model.config, [[5, 6, 7]])
    with_cache = _generate(tiny_model, input_ids=ids, token_type_ids=types, images=images, use_cache=True)
    without = _generate(tiny_model, input_ids=ids, token_type_ids=types, images=images, use_cache=False)
    assert with_cache.shape[1] == ids.shape[1] + 6
    assert torch.equal(with_cache, without)


def test_left_padded_batch_generation_equals_single(tiny_model):
    cfg = tiny_model.config
    ids, types, images = make_inputs(cfg, [[5, 6, 7, 8, 9]] * 2, seed=2)
    short_ids, short_types = ids[1, :-2], types[1, :-2]
    pad = 2
    b_ids = torch.stack([ids[0], torch.cat([torch.full((pad,), cfg.pad_token_id), short_ids])])
    b_types = torch.stack([types[0], torch.cat([torch.zeros(pad, dtype=torch.long), short_types])])
    b_mask = torch.ones_like(b_ids)
    b_mask[1, :pad] = 0
    batch = _generate(tiny_model, input_ids=b_ids, token_type_ids=b_types, attention_mask=b_mask, images=images)
    one = _generate(tiny_model, input_ids=ids[:1], token_type_ids=types[:1], images=images[:1])
    two = _generate(tiny_model, input_ids=short_ids[None], token_type_ids=short_types[None], images=images[1:])
    assert torch.equal(batch[0, ids.shape[1] :], one[0, ids.shape[1] :])
    assert torch.equal(batch[1, ids.shape[1] :], two[0, short_ids.numel() :])


def test_positions_follow_token_types_whatever_is_passed(tiny_model):
    """Positions are derived from the token types; positions that contradict them are refused, not used."""
    from finetune.models.cogvlm.modeling import CACHE_NAME

    ids, types, images = make_inputs(tiny_model.config, [[5, 6, 7]])
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, token_type_ids=types, images=images, use_cache=False).logits
        same = tiny_model(input_ids=ids, token_type_ids=types, images=images, use_cache=False,
                          position_ids=default_position_ids(types)).logits
        torch.testing.assert_close(same, ref, rtol=0, atol=0)
        plain = torch.arange(ids.shape[1])[None]  # transformers' generic 0..L-1: wrong across the image
        with pytest.raises(ValueError, match=r"position_ids contradict token_type_ids: row 0, column \d+ is \d+ but"):
            tiny_model(input_ids=ids, token_type_ids=types, images=images, position_ids=plain)

        # With a cache: token types of the whole sequence -> the new token's position is derived.
        prefix = tiny_model(input_ids=ids[:, :-1], token_type_ids=types[:, :-1], images=images, use_cache=True)
        cache = getattr(prefix, CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
        # Only the new token's type and no positions: they cannot be derived -> a clear error.
        with pytest.raises(ValueError, match="cannot derive position ids"):
            tiny_model(input_ids=ids[:, -1:], token_type_ids=types[:, -1:], **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match="images are embedded at prefill only"):
            tiny_model(input_ids=ids[:, -1:], token_type_ids=torch.ones_like(types), **{CACHE_NAME: cache})
        with pytest.raises(ValueError, match="not both"):
            tiny_model(input_ids=ids[:, -1:], token_type_ids=types, cache=cache, past_key_values=copy.copy(cache))
        assert cache.get_seq_length() == ids.shape[1] - 1  # refused calls leave the cache alone
        step = tiny_model(input_ids=ids[:, -1:], token_type_ids=types, **{CACHE_NAME: cache}).logits
        torch.testing.assert_close(step[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: layout, round trip, strictness, dtype, 4-bit
# ---------------------------------------------------------------------------------------------------------------


def test_make_tiny_layout_and_special_ids(tiny_checkpoints, version):
    from finetune.tokenization import build_tiny_tokenizer

    folder = tiny_checkpoints[version]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert any(k.endswith("rotary_emb.inv_freq") for k in index["weight_map"])
    config = json.loads((folder / "config.json").read_text())
    tok = build_tiny_tokenizer(version)
    assert config["vocab_size"] == len(tok)
    assert config["bos_token_id"] == tok.bos_token_id and config["pad_token_id"] == tok.pad_token_id
    eos = config["eos_token_id"]
    assert (eos[0] if isinstance(eos, list) else eos) == tok.eos_token_id
    assert (folder / "generation_config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_make_tiny_cli(tmp_path):
    from finetune.tiny import main

    assert main(["--family", "cogvlm2", "--out", str(tmp_path / "t"), "--seed", "1"]) == 0
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()


def test_save_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="200KB")
    loaded = CogVLMForCausalLM.from_pretrained(tmp_path).eval()
    ids, types, images = make_inputs(tiny_model.config, [[5, 6, 7]])
    with torch.no_grad():
        a = tiny_model(input_ids=ids, token_type_ids=types, images=images).logits
        b = loaded(input_ids=ids, token_type_ids=types, images=images).logits
    assert torch.equal(a, b)
    assert set(loaded.state_dict()) == set(tiny_model.state_dict())


def test_strict_loading_reports_missing_and_unexpected(tiny_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints[2], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = "model.vision.boi"
    shard = folder / index["weight_map"][victim]
    tensors = load_file(shard)
    tensors["model.vision.not_a_weight"] = tensors.pop(victim)
    save_file(tensors, shard, metadata={"format": "pt"})
    del index["weight_map"][victim]
    index["weight_map"]["model.vision.not_a_weight"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing_keys: \['model.vision.boi'\].*unexpected_keys"):
        CogVLMForCausalLM.from_pretrained(folder)
    model, info = CogVLMForCausalLM.from_pretrained(folder, strict=False, output_loading_info=True)
    assert "model.vision.boi" in info["missing_keys"]


def test_load_bf16(tiny_models, version, tmp_path):
    # Official checkpoints are bf16, inv_freq too; the buffer keeps the stored values (docs/architecture.md §10.1).
    copy.deepcopy(tiny_models[version]).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="200KB")
    model = CogVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    inv_freq = model.model.layers[0].self_attn.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.bfloat16
    assert torch.equal(inv_freq, tiny_models[version].model.layers[0].self_attn.rotary_emb.inv_freq.bfloat16())
    ids, types, images = make_inputs(model.config, [[5, 6, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, images=images.bfloat16())
        fp32_pixels = model(input_ids=ids, token_type_ids=types, images=images)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert torch.equal(out.logits, fp32_pixels.logits)


def test_qlora_4bit_quantizes_only_language_linears(tiny_checkpoints):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = CogVLMForCausalLM.from_pretrained(tiny_checkpoints[2], quantization_config=qc, device_map="cpu")
    assert qc.llm_int8_skip_modules is None  # the caller's object is not modified
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.language_expert_query_key_value, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.vision_mlp.down_proj, bnb.nn.Linear4bit)
    for name, module in model.named_modules():
        if name.startswith("model.vision") or name == "lm_head":
            assert not isinstance(module, bnb.nn.Linear4bit), name
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.vision.boi.dtype == torch.float32

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["language_expert_query_key_value", "vision_expert_dense"])
    )
    ids, types, images = make_inputs(model.config, [[5, 6, 7]] * 2)
    out = peft_model(input_ids=ids, token_type_ids=types, images=images, labels=ids)
    out.loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)


def test_import_finetune_is_lazy():
    import subprocess
    import sys

    code = "import sys, finetune; assert 'torch' not in sys.modules; print(finetune.CogVLMForCausalLM.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CogVLMForCausalLM"


@pytest.mark.parametrize("num_items", [None, 7])
def test_loss_only_path_equals_full_logits_loss(num_items):
    """Training runs lm_head only on labelled positions; loss and gradients must not change."""
    from finetune.tiny import tiny_config

    torch.manual_seed(0)
    model = CogVLMForCausalLM(tiny_config(2))
    n_img, s = model.config.image_tokens, model.config.vision_config["image_size"]
    ids = torch.randint(3, 100, (2, 1 + n_img + 8))
    tt = torch.zeros_like(ids)
    tt[:, 1:1 + n_img] = 1
    labels = ids.clone()
    labels[:, : 1 + n_img + 3] = -100
    labels[1, -2:] = -100
    images = torch.randn(2, 3, s, s)
    grads = []
    for loss_only in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, token_type_ids=tt, images=images, labels=labels, loss_only=loss_only,
                    num_items_in_batch=num_items)
        out.loss.backward()
        assert (out.logits is None) == loss_only
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    for n, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][n], atol=1e-6), n
    model.train()
    assert model(input_ids=ids, token_type_ids=tt, images=images, labels=labels).logits is None
