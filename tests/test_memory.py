"""Memory plan: counts the real parameter totals and moves the right way with each recipe knob."""

import json
from pathlib import Path

import pytest
import torch

from adapters.targets import linear_module_names, memory_plan_for, resolve_targets
from finetune.config import load_recipe
from finetune.configuration_cogvlm import CogVLMConfig
from finetune.modeling_cogvlm import CogVLMForCausalLM

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "assets" / "reference" / "configs" / "cogvlm2-llama3-chat-19B.config.json"


@pytest.fixture(scope="module")
def cogvlm2():
    with torch.device("meta"):
        return CogVLMForCausalLM(CogVLMConfig(**json.loads(REF.read_text())))


def _plan(model, *overrides):
    cfg = load_recipe(ROOT / "recipes" / "cogvlm2-lora.yaml", list(overrides))
    _, matches, _ = resolve_targets(cfg.lora.targets, [n for n, _ in model.named_modules()],
                                    linear_module_names(model))
    return memory_plan_for(model, cfg, [n for hit in matches.values() for n in hit])


def test_bf16_weights_are_all_parameters_at_two_bytes(cogvlm2):
    plan = _plan(cogvlm2)
    weights = dict((name, gib) for name, gib, _ in plan.rows)["weights: rest (bfloat16)"]
    assert weights == pytest.approx(sum(p.numel() for p in cogvlm2.parameters()) * 2 / 2**30)
    assert "total" in str(plan) and plan.total_gib > weights


def test_knobs_move_the_estimate_the_right_way(cogvlm2):
    base = _plan(cogvlm2).total_gib
    assert _plan(cogvlm2, "quant.mode=nf4").total_gib < base - 15  # ~14B LM params drop from 2 to ~0.52 bytes
    assert _plan(cogvlm2, "train.gradient_checkpointing=false").total_gib > base
    assert _plan(cogvlm2, "train.per_device_train_batch_size=4").total_gib > base
    assert _plan(cogvlm2, "lora.r=64").total_gib > base
    assert _plan(cogvlm2, "train.optim=paged_adamw_8bit").total_gib < base
