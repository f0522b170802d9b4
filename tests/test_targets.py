"""LoRA target presets: anchored matches per preset, no leaf-name spill-over, nearest-name errors."""

import re

import pytest
import torch

from finetune.models.cogvlm.modeling import CogVLMForCausalLM
from finetune.targets import parameter_table, resolve_targets
from finetune.tiny import tiny_config

PRESETS = CogVLMForCausalLM.target_spec.presets  # the model class owns its presets
SAVE_PRESETS = CogVLMForCausalLM.target_spec.save_presets


@pytest.fixture(scope="module", params=[1, 2], ids=["cogvlm", "cogvlm2"])
def meta_model(request):
    with torch.device("meta"):
        return CogVLMForCausalLM(tiny_config(request.param))


def _resolve(model, targets):
    pattern, matches, _ = resolve_targets(targets, model)
    return pattern, matches


@pytest.mark.parametrize(
    "preset, per_layer, prefix",
    [
        ("language_expert_attn", 2, r"model\.layers\.\d+\.self_attn\.language_expert_"),
        ("vision_expert_attn", 2, r"model\.layers\.\d+\.self_attn\.vision_expert_"),
        ("language_expert_mlp", 3, r"model\.layers\.\d+\.mlp\.language_mlp\."),
        ("vision_expert_mlp", 3, r"model\.layers\.\d+\.mlp\.vision_mlp\."),
    ],
)
def test_expert_presets_match_only_their_expert(meta_model, preset, per_layer, prefix):
    _, matches = _resolve(meta_model, [preset])
    hit = matches[preset]
    # the last layer's vision-expert dense and MLP get no gradient and are skipped (see gradient_free)
    dead = {"vision_expert_attn": 1, "vision_expert_mlp": 3}.get(preset, 0)
    assert len(hit) == per_layer * meta_model.config.num_hidden_layers - dead
    assert all(re.match(prefix, n) for n in hit)
    assert not any(n.startswith("model.vision.") for n in hit)


def test_vision_tower_and_glu_presets(meta_model):
    _, matches = _resolve(meta_model, ["vision_tower", "glu_adapter"])
    assert len(matches["vision_tower"]) == 4 * meta_model.config.vision_config["num_hidden_layers"]
    assert sorted(n.rsplit(".", 1)[1] for n in matches["glu_adapter"]) == [
        "dense_4h_to_h", "dense_h_to_4h", "gate_proj", "linear_proj"]


def test_groups_expand_and_combined_regex_is_what_peft_sees(meta_model):
    pattern, matches = _resolve(meta_model, ["experts"])
    assert list(matches) == ["language_expert_attn", "language_expert_mlp", "vision_expert_attn",
                             "vision_expert_mlp"]
    names = [n for n, _ in meta_model.named_modules()]
    via_pattern = {n for n in names if re.fullmatch(pattern, n)}
    assert via_pattern == {n for hit in matches.values() for n in hit}
    # The leaf-name trap: `gate_proj` also names the GLU's gate, which the expert presets must not touch.
    assert "model.vision.linear_proj.gate_proj" not in via_pattern


def test_zero_matches_lists_nearest_module_names(meta_model):
    with pytest.raises(ValueError) as err:
        _resolve(meta_model, ["gate_proj"])
    msg = str(err.value)
    assert "matches no module" in msg and "mlp.language_mlp.gate_proj" in msg and "language_expert_attn" in msg


def test_bad_regex_is_reported(meta_model):
    with pytest.raises(ValueError, match="neither a preset"):
        _resolve(meta_model, ["model.layers.(["])


def test_parameter_table_counts_lora_params(meta_model):
    _, matches = _resolve(meta_model, ["language_expert_attn"])
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for n, m in meta_model.named_modules()
                   if n in matches["language_expert_attn"])
    table = parameter_table(meta_model, matches["language_expert_attn"], r, [SAVE_PRESETS["lm_head"]])
    total_line = [line for line in table.splitlines() if line.startswith("total")][0]
    assert f"{expected:,}" in total_line
    assert f"{meta_model.lm_head.weight.numel():,}" in total_line  # lm_head fully trained


def test_presets_are_anchored():
    for name, pattern in PRESETS.items():
        assert pattern.startswith(("model\\.layers\\.", "model\\.vision\\.")), name


def test_gradient_free_modules_really_get_no_gradient():
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    torch.manual_seed(0)
    model = CogVLMForCausalLM(tiny_config(2))
    dead = resolve_targets(["vision_expert"], model)[2]
    assert sorted(n.rsplit(".", 1)[1] for n in dead) == ["down_proj", "gate_proj", "up_proj", "vision_expert_dense"]
    n_img, s = model.config.image_tokens, model.config.vision_config["image_size"]
    ids = torch.randint(3, 100, (1, 1 + n_img + 6))
    tt = torch.zeros_like(ids)
    tt[0, 1:1 + n_img] = 1
    labels = ids.clone()
    labels[0, : 1 + n_img] = -100
    model(input_ids=ids, token_type_ids=tt, images=torch.randn(1, 3, s, s), labels=labels).loss.backward()
    modules = dict(model.named_modules())
    for n in dead:
        assert torch.count_nonzero(modules[n].weight.grad) == 0, n
    live = modules[dead[0].replace(f"layers.{model.config.num_hidden_layers - 1}.", "layers.0.")]
    assert torch.count_nonzero(live.weight.grad) > 0
