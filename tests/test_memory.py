"""Memory plan: counts the real parameter totals and moves the right way with each recipe knob."""

import json
from pathlib import Path

import pytest
import torch

from finetune.config import load_recipe
from finetune.models.cogvlm.configuration import CogVLMConfig
from finetune.models.cogvlm.modeling import CogVLMForCausalLM
from finetune.targets import memory_plan_for, resolve_targets

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "assets" / "reference" / "configs" / "cogvlm2-llama3-chat-19B.config.json"


@pytest.fixture(scope="module")
def cogvlm2():
    with torch.device("meta"):
        return CogVLMForCausalLM(CogVLMConfig(**json.loads(REF.read_text())))


def _plan(model, *overrides):
    cfg = load_recipe(ROOT / "recipes" / "cogvlm2-lora.yaml", list(overrides))
    _, matches, _ = resolve_targets(cfg.lora.targets, model)
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


def _calibration():
    import importlib.util
    import sys

    if "calibrate_memory" in sys.modules:
        return sys.modules["calibrate_memory"]
    spec = importlib.util.spec_from_file_location("calibrate_memory", ROOT / "bench" / "calibrate_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["calibrate_memory"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("point", range(3), ids=["lora-gc", "lora-no-gc", "qlora-nf4-gc"])
def test_plan_within_20_percent_of_a_measured_cpu_step(point):
    """Real AdamW steps of the kit's model + LoRA (nf4: bitsandbytes) on CPU: the profiler's allocation peak,
    plus the live weights/quant/optimizer state, against plan_memory(on_gpu=False) for the same recipe."""
    cal = _calibration()
    (r,) = cal.calibrate([cal.SMALL[point]])
    assert 0.8 <= r.ratio <= 1.2, cal.table([r])
    # the step's own share (activations, logits, gradients) too, where a wrong activation term shows most
    assert 0.8 <= r.step_ratio <= 1.2, cal.table([r])


def test_sharded_plan_gathers_cogagents_largest_layer():
    """FSDP/ZeRO-3 plans size the gathered unit from the model's own _no_split_modules (what accelerate wraps):
    for CogAgent a decoder layer carries the cross-attention too and is larger than a vision block."""
    from finetune.memory import _largest_unit_bytes
    from finetune.models.cogagent.configuration import tiny_cogagent_config
    from finetune.models.cogagent.modeling import CogAgentForCausalLM

    with torch.device("meta"):
        model = CogAgentForCausalLM(tiny_cogagent_config({"bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 2}))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    unit, _ = _largest_unit_bytes(model, 2, 0.0, set())
    assert unit == layer * 2
