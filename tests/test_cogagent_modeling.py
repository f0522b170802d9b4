"""CogAgent model: official key set and size, cross branch behaviour, batching, cache, checkpointing, loading."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.models.cogagent.configuration import CogAgentConfig, tiny_cogagent_config
from finetune.models.cogagent.modeling import CogAgentForCausalLM, CogAgentModel
from finetune.models.cogvlm.modeling import CogVLMModel
from finetune.tiny import _special_ids
from tests.conftest import REFERENCE

OFFICIAL_CONFIG = REFERENCE / "configs" / "cogagent-chat-hf.config.json"


def tiny(seed: int = 0, **overrides) -> CogAgentForCausalLM:
    torch.manual_seed(seed)
    return CogAgentForCausalLM(tiny_cogagent_config(_special_ids(1), **overrides)).eval()


def row(cfg, text: list[int], image: bool = True) -> tuple[list[int], list[int]]:
    span = cfg.image_tokens if image else 0
    return [cfg.bos_token_id] + [cfg.pad_token_id] * span + text, [0] + [1] * span + [0] * len(text)


def pixels(cfg, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, cs = cfg.vision_config["image_size"], cfg.cross_image_size
    return torch.randn(n, 3, s, s, generator=g), torch.randn(n, 3, cs, cs, generator=g)


def left_pad(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad)
    tt = torch.zeros_like(ids)
    am = torch.zeros_like(ids)
    for b, (i, t) in enumerate(rows):
        ids[b, width - len(i):], tt[b, width - len(i):], am[b, width - len(i):] = torch.tensor(i), torch.tensor(t), 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}


def test_official_config_builds_the_official_key_set_and_size():
    config = CogAgentConfig(**json.loads(OFFICIAL_CONFIG.read_text()))
    assert (config.image_tokens, config.cross_grid, config.cogvlm_version) == (258, 80, 1)
    with torch.device("meta"):
        model = CogAgentForCausalLM(config)
    keys = set(model.state_dict())
    assert len(keys) == 1831
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e9, 3) == 18.291
    vit = "model.cross_vision.vit.model."
    # The 2-D RoPE table is stored once, not per block; block 23, norm and head are present though unused.
    assert {k for k in keys if "rope" in k} == {vit + "rope.freqs_cos", vit + "rope.freqs_sin"}
    assert model.state_dict()[vit + "rope.freqs_cos"].shape == (6400, 64)
    for key, shape in {
        vit + "blocks.23.mlp.w3.weight": (1024, 2730), vit + "pos_embed": (1, 6401, 1024),
        vit + "head.weight": (768, 1024),
        "model.cross_vision.pos_embed": (6400, 1024), "model.vision.pos_embed": (256, 1792),
        "model.layers.31.cross_attn.key_value.weight": (2048, 1024),
        "model.layers.0.cross_attn.query.weight": (1024, 4096),
        "model.layers.0.cross_attn.dense.weight": (4096, 1024), vit + "blocks.0.attn.q_bias": (1024,),
        "model.layers.0.post_cross_attention_layernorm.weight": (4096,),
    }.items():
        assert tuple(model.state_dict()[key].shape) == shape, key
    assert not any(k.endswith("k_proj.bias") or k.endswith("k_bias") for k in keys)  # k has no bias


def test_cross_branch_matters_and_the_last_cross_block_is_skipped():
    model = tiny()
    cfg = model.config
    ids, tt = row(cfg, [5, 6, 7])
    img, cross = pixels(cfg, 1, 0)
    batch = {"input_ids": torch.tensor([ids]), "token_type_ids": torch.tensor([tt]), "images": img}
    with torch.no_grad():
        base = model(**batch, cross_images=cross).logits
        other = model(**batch, cross_images=cross.flip(-1)).logits
        for p in model.model.cross_vision.vit.model.blocks[-1].parameters():
            p.add_(1.0)
        skipped = model(**batch, cross_images=cross).logits
        for p in model.model.cross_vision.vit.model.blocks[0].parameters():
            p.add_(1.0)
        used = model(**batch, cross_images=cross).logits
    assert (base - other).abs().max() > 1e-3  # the high-res image reaches every position
    assert torch.equal(base, skipped)
    assert (base - used).abs().max() > 1e-3


def test_left_padded_batch_equals_each_row_alone():
    model = tiny()
    cfg = model.config
    rows = [row(cfg, [5, 6, 7, 8, 9]), row(cfg, [10, 11]), row(cfg, [12, 13, 14], image=False)]
    img, cross = pixels(cfg, 2, 1)
    batch = left_pad(rows, cfg.pad_token_id)
    with torch.no_grad():
        together = model(**batch, images=img, cross_images=cross).logits
        for b, (ids, tt) in enumerate(rows):
            k = 1 if b < 2 else 0
            alone = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]),
                          images=img[b:b + k] if k else None, cross_images=cross[b:b + k] if k else None).logits
            torch.testing.assert_close(together[b, -len(ids):], alone[0], atol=1e-5, rtol=1e-5)


def test_backbone_runs_cogvlms_forward_so_padding_reaches_no_expert():
    """CogAgent adds only its cross features (`extra_layer_inputs`) to CogVLM's forward, and so inherits its
    routing: padded positions reach neither expert (CogAgent's own forward used to run them through both)."""
    assert CogAgentModel.forward is CogVLMModel.forward
    model = tiny()
    cfg = model.config
    rows = [row(cfg, [5, 6, 7, 8, 9]), row(cfg, [10, 11])]
    img, cross = pixels(cfg, 2, 6)
    batch = left_pad(rows, cfg.pad_token_id)
    seen = []
    layer = model.model.layers[0]
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
             for m in (layer.self_attn.language_expert_query_key_value, layer.mlp.language_mlp.gate_proj,
                       layer.self_attn.vision_expert_query_key_value, layer.mlp.vision_mlp.gate_proj)]
    try:
        with torch.no_grad():
            model(**batch, images=img, cross_images=cross)
    finally:
        for h in hooks:
            h.remove()
    assert sum(seen) == 2 * int(batch["attention_mask"].sum())  # each real token once in QKV, once in the MLP


def test_packed_rows_are_refused():
    model = tiny()
    cfg = model.config
    batch = left_pad([row(cfg, [5, 6], image=False), row(cfg, [7, 8], image=False)], cfg.pad_token_id)
    batch["attention_mask"][0, 1:] = 2  # two segments in row 0
    with pytest.raises(ValueError, match="data.packing: false"):
        model(**batch)


def test_cached_generation_matches_full_forward_for_a_padded_batch():
    model = tiny()
    cfg = model.config
    rows = [row(cfg, [5, 6, 7, 8]), row(cfg, [9])]
    img, cross = pixels(cfg, 2, 2)
    batch = left_pad(rows, cfg.pad_token_id)
    out = model.generate(**batch, images=img, cross_images=cross, max_new_tokens=5, do_sample=False,
                         pad_token_id=cfg.pad_token_id, eos_token_id=None)
    ids, tt, am = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(5):  # greedy by hand, no cache: the cross K/V are recomputed every step
            logits = model(input_ids=ids, token_type_ids=tt, attention_mask=am, images=img, cross_images=cross,
                           use_cache=False).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            ids, tt, am = (torch.cat((x, y), 1) for x, y in ((ids, nxt), (tt, 0 * nxt), (am, 1 + 0 * nxt)))
    assert torch.equal(out, ids)


def test_cross_keys_values_are_computed_once_and_kept_in_the_cache():
    model = tiny()
    cfg = model.config
    ids, tt = row(cfg, [5, 6])
    img, cross = pixels(cfg, 1, 3)
    calls = []
    hook = model.model.cross_vision.register_forward_hook(lambda *a: calls.append(1))
    model.generate(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]), images=img, cross_images=cross,
                   max_new_tokens=4, do_sample=False, eos_token_id=None)
    hook.remove()
    assert calls == [1]


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg_model = tiny()
    cfg = cfg_model.config
    ids, tt = row(cfg, [5, 6, 7, 8])
    img, cross = pixels(cfg, 1, 4)
    batch = {"input_ids": torch.tensor([ids]), "token_type_ids": torch.tensor([tt]), "images": img,
             "cross_images": cross, "labels": torch.tensor([ids])}
    grads = []
    for checkpointing in (False, True):
        model = tiny()
        model.train()
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("cross_vision.vit.model.blocks.0" in n for n in grads[0])  # the cross tower is trained through
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_save_and_strict_reload(tmp_path):
    model = tiny(seed=3)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CogAgentForCausalLM"] and config["cross_image_size"] == 56
    again = CogAgentForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    state = {k: v for k, v in model.state_dict().items() if "rope" not in k}
    with pytest.raises(RuntimeError, match="freqs_cos"):
        CogAgentForCausalLM(model.config).load_state_dict(state, strict=True)


def test_one_cross_image_per_image_is_required():
    model = tiny()
    cfg = model.config
    ids, tt = row(cfg, [5])
    img, _ = pixels(cfg, 1, 5)
    with pytest.raises(ValueError, match="cross_images"):
        model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]), images=img)
