"""CogVLM2-Video model: official key layout and size, no vision experts, batches of videos, cache, checkpointing,
QLoRA (docs/architecture.md §21)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from finetune.models.cogvlm.configuration import CogVLMConfig
from finetune.models.cogvlm.modeling import CogVLMForCausalLM
from finetune.models.cogvlm2_video.configuration import CogVLMVideoConfig, tiny_video_config
from finetune.models.cogvlm2_video.modeling import CogVLMVideoForCausalLM, refuse_vision_expert_targets
from tests.conftest import REFERENCE


def _meta(config_name: str):
    config = CogVLMConfig.from_json_file(str(REFERENCE / "configs" / config_name))
    with torch.device("meta"):
        return CogVLMVideoForCausalLM(config)


@pytest.mark.parametrize("name", ["cogvlm2-video-llama3-chat.config.json", "cogvlm2-video-llama3-base.config.json",
                                  "cogvlm2-llama3-caption.config.json"])
def test_official_video_layout_keys_and_parameters(name):
    model = _meta(name)
    sd = model.state_dict()
    ref = json.loads((REFERENCE / "cogvlm2-llama3-caption.tensors.json").read_text())
    assert len(sd) == sum(ref["shards"].values()) == 1029
    for key, shape in ref["sample_tensors"].items():
        assert list(sd[key].shape) == shape, key
    assert not [k for k in sd if "vision_expert" in k or "vision_mlp" in k]
    assert sd["model.vision.patch_embedding.position_embedding.weight"].shape == (257, 1792)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - 12.508) < 1e-3, n
    assert model.config.image_tokens == 66 and not model.config.vision_expert
    assert model.config.template_version == "base"


def test_image_checkpoint_config_keeps_vision_experts():
    config = CogVLMConfig.from_json_file(str(REFERENCE / "configs" / "cogvlm2-llama3-chat-19B.config.json"))
    assert config.vision_expert
    with pytest.raises(ValueError, match="vision_expert"):
        CogVLMVideoForCausalLM(tiny_video_config(architectures=["CogVLMForCausalLM"]))


def test_saved_video_config_stays_official(tmp_path):
    """Whatever class saves it, the config says CogVLMVideoForCausalLM and carries no kit-only flag."""
    torch.manual_seed(0)
    CogVLMForCausalLM(tiny_video_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["CogVLMVideoForCausalLM"] and "vision_expert" not in saved
    back = CogVLMVideoForCausalLM.from_pretrained(tmp_path)  # strict
    assert not back.config.vision_expert
    assert isinstance(CogVLMVideoConfig.from_pretrained(tmp_path), CogVLMVideoConfig)


def test_target_presets_refuse_vision_expert_with_reason():
    from finetune.targets import resolve_targets

    model = CogVLMVideoForCausalLM(tiny_video_config())
    _, matches, skipped = resolve_targets(["language_expert", "glu_adapter"], model)
    assert len(matches["language_expert_attn"]) == 2 * 2 and len(matches["language_expert_mlp"]) == 2 * 3
    assert not skipped  # no gradient-free vision-expert modules to leave out
    for name in ("vision_expert_attn", "vision_expert", "experts"):
        with pytest.raises(ValueError, match=f"'{name}': CogVLM2-Video has no vision-expert weights.*language_expert"):
            resolve_targets([name, "language_expert"], model)
    with pytest.raises(ValueError, match="no vision-expert weights"):
        refuse_vision_expert_targets(["vision_expert_query_key_value", "language_expert_dense"])


# ---------------------------------------------------------------------------------------------------------------
# Tiny model: every token through the language weights; batches of videos
# ---------------------------------------------------------------------------------------------------------------


def _tiny(seed: int = 0) -> CogVLMVideoForCausalLM:
    torch.manual_seed(seed)
    model = CogVLMVideoForCausalLM(tiny_video_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _row(config, frames: int, text: list[int], time_tokens: bool) -> tuple[list[int], list[int]]:
    """[BOS] frame spans (each followed by a time-index token in the chat layout) text."""
    span, pad = config.image_tokens, config.pad_token_id
    ids, types = [config.bos_token_id], [0]
    for t in range(frames):
        ids += [pad] * span
        types += [1] * span
        if time_tokens:
            ids.append(10 + t)
            types.append(0)
    return ids + text, types + [0] * len(text)


def _video(config, frames: int, seed: int) -> torch.Tensor:
    s = config.vision_config["image_size"]
    return torch.randn(frames, 3, s, s, generator=torch.Generator().manual_seed(seed))  # (T, 3, S, S)


def _batch(config, rows, time_tokens: bool, side: str = "right"):
    built = [_row(config, f, text, time_tokens) for f, text in rows]
    width = max(len(i) for i, _ in built)
    ids = torch.full((len(rows), width), config.pad_token_id)
    tt, am = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (i, t) in enumerate(built):
        sl = slice(0, len(i)) if side == "right" else slice(width - len(i), width)
        ids[b, sl], tt[b, sl], am[b, sl] = torch.tensor(i), torch.tensor(t), 1
    videos = [[_video(config, f, seed=k)] for k, (f, _) in enumerate(rows)]
    return ids, tt, am, videos


@pytest.mark.parametrize("time_tokens", [True, False], ids=["chat", "base"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_videos_equals_each_alone(time_tokens, side):
    model = _tiny()
    rows = [(3, [40, 41, 42, 43]), (1, [50, 51]), (5, [60, 61, 62])]  # different frame counts and text lengths
    ids, tt, am, videos = _batch(model.config, rows, time_tokens, side)
    with torch.no_grad():
        batched = model(input_ids=ids, token_type_ids=tt, attention_mask=am, images=videos).logits
        for b in range(len(rows)):
            keep = am[b].bool()
            alone = model(input_ids=ids[b:b + 1, keep], token_type_ids=tt[b:b + 1, keep], images=[videos[b]]).logits
            torch.testing.assert_close(batched[b, keep], alone[0], atol=1e-5, rtol=1e-5)
    # The frames of row 1 matter for row 1 only (the official code would encode row 0's video for everyone).
    other = [videos[0], [videos[1][0] + 1.0], videos[2]]
    with torch.no_grad():
        changed = model(input_ids=ids, token_type_ids=tt, attention_mask=am, images=other).logits
    assert torch.equal(changed[0], batched[0]) and torch.equal(changed[2], batched[2])
    assert not torch.allclose(changed[1], batched[1])


def test_every_token_uses_the_language_weights():
    """Same weights, routing by type would differ: a video model must give the same logits for any token types
    that keep the positions and the frames (types only place frames and positions)."""
    model = _tiny()
    ids, tt, _, videos = _batch(model.config, [(2, [40, 41])], time_tokens=True)
    assert not hasattr(model.model.layers[0].self_attn, "vision_expert_query_key_value")
    assert not hasattr(model.model.layers[0].mlp, "vision_mlp")
    with torch.no_grad():
        hooked = []
        h = model.model.layers[0].self_attn.language_expert_query_key_value.register_forward_hook(
            lambda m, i, o: hooked.append(i[0].shape))
        model(input_ids=ids, token_type_ids=tt, images=videos)
        h.remove()
    assert hooked == [torch.Size([1, ids.shape[1], model.config.hidden_size])]  # all tokens, one call


def test_generate_with_cache_equals_no_cache_loop():
    model = _tiny()
    ids, tt, am, videos = _batch(model.config, [(3, [40, 41, 42]), (2, [50])], time_tokens=True, side="left")
    out = model.generate(input_ids=ids, token_type_ids=tt, attention_mask=am, images=videos, max_new_tokens=5,
                         do_sample=False, pad_token_id=model.config.pad_token_id, output_logits=True,
                         return_dict_in_generate=True)
    seq = ids
    types, mask = tt, am
    with torch.no_grad():
        for step in range(5):
            logits = model(input_ids=seq, token_type_ids=types, attention_mask=mask, images=videos,
                           use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=2e-5, rtol=1e-5)
            nxt = out.sequences[:, ids.shape[1] + step]
            assert torch.equal(nxt, logits.argmax(-1))
            seq = torch.cat((seq, nxt[:, None]), 1)
            types = torch.cat((types, torch.zeros_like(nxt[:, None])), 1)
            mask = torch.cat((mask, torch.ones_like(nxt[:, None])), 1)


def test_gradient_checkpointing_same_grads_on_videos():
    plain = _tiny().train()
    ckpt = copy.deepcopy(plain)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    ids, tt, am, videos = _batch(plain.config, [(3, [40, 41, 42]), (2, [50])], time_tokens=True)
    labels = torch.where(tt == 0, ids, -100)
    for m in (plain, ckpt):
        m(input_ids=ids, token_type_ids=tt, attention_mask=am, images=videos, labels=labels).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt.model.vision.patch_embedding.proj.weight.grad.abs().sum() > 0


def test_qlora_on_video_model(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    _tiny().save_pretrained(tmp_path)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = CogVLMVideoForCausalLM.from_pretrained(tmp_path, quantization_config=qc, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.language_expert_query_key_value, bnb.nn.Linear4bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.startswith("model.vision"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "language_expert_query_key_value", "language_expert_dense"]))
    ids, tt, am, videos = _batch(model.config, [(2, [40, 41]), (1, [50, 51, 52])], time_tokens=True)
    out = peft_model(input_ids=ids, token_type_ids=tt, attention_mask=am, images=videos,
                     labels=torch.where(tt == 0, ids, -100))
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_frame_count_mismatch_is_refused():
    model = _tiny()
    ids, tt, _, videos = _batch(model.config, [(3, [40])], time_tokens=True)
    with pytest.raises(ValueError, match="image span mismatch"):
        model(input_ids=ids, token_type_ids=tt, images=[[videos[0][0][:2]]])
