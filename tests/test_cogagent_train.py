"""Tiny CogAgent end to end: collator inputs, LoRA training (loss drops), verified merge, batched generation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from adapters import merge as merge_mod
from adapters import merge_verify
from adapters.demo import RECIPE, write_task
from data_formats.schema import Conversation, Message
from finetune.config import load_recipe
from finetune.models.cogvlm.processing import CogVLMCollator, load_and_transform_image
from finetune.targets import gradient_free, resolve_targets, spec_of
from finetune.tiny import make_tiny


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogagent")
    base = make_tiny(1, root / "base", seed=1, family="cogagent")
    train_path, eval_path = write_task(root / "data", n_train=16, n_eval=4, seed=1)
    return base, train_path, eval_path


def test_make_tiny_cogagent_writes_a_loadable_official_layout(task):
    from finetune.loading import build_meta_model
    from finetune.models import load_config, model_class_for

    config = json.loads((task[0] / "config.json").read_text())
    assert config["architectures"] == ["CogAgentForCausalLM"] and config["cross_image_size"] == 56
    assert model_class_for(load_config(task[0])).__name__ == "CogAgentForCausalLM"
    assert type(build_meta_model(task[0])).__name__ == "CogAgentForCausalLM"


def test_collator_makes_both_images_from_one_picture_with_the_cogagent_prompt(task):
    from finetune.models import load_config, processor_class_for
    from finetune.tokenization import load_tokenizer

    config = load_config(task[0])
    tok = load_tokenizer(task[0], None, config)
    processor = processor_class_for(config).from_config(config, tok)
    assert type(processor).__name__ == "CogAgentProcessor" and processor.cross_image_size == 56
    picture = task[1].parent / "images" / "train_0000.png"
    conv = Conversation("r", [str(picture)], [Message("user", "<image>Where?"), Message("assistant", "here")])
    batch = CogVLMCollator(processor)([conv, conv])
    assert batch["images"].shape == (2, 3, 28, 28) and batch["cross_images"].shape == (2, 3, 56, 56)
    from finetune.models.cogagent.processing import picture_pair

    low, high = picture_pair(picture, config)
    assert low.shape == (3, 28, 28) and high.shape == (3, 56, 56)
    torch.testing.assert_close(batch["cross_images"][0], high)
    torch.testing.assert_close(batch["images"][0], low)
    torch.testing.assert_close(high, load_and_transform_image(picture, 56))
    text = tok.decode(batch["input_ids"][0][batch["token_type_ids"][0] == 0])
    assert "[INST] Where? [/INST]" in text  # CogAgent's own chat template, not CogVLM's "Question: ... Answer:"


def test_cross_presets_match_and_skip_the_never_run_block(task):
    from finetune.loading import build_meta_model

    meta = build_meta_model(task[0])
    names = [n for n, _ in meta.named_modules()]
    _, matches, skipped = resolve_targets(["cross_attn", "cross_tower"], meta)
    assert len(matches["cross_attn"]) == 2 * 3  # query, key_value, dense in each of the 2 layers
    assert len(matches["cross_tower"]) == 2 * 7  # q/k/v/proj + w1/w2/w3 in the 2 blocks that run
    assert all(".blocks.2." in n for n in skipped) and len(skipped) == 7
    assert "cross_attn" in spec_of(meta).presets and set(skipped) <= set(gradient_free(names, spec_of(meta)))


class _Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def test_lora_trains_merges_verified_and_generates_in_batches(task, tmp_path, monkeypatch):
    from finetune.generation import generate_answers
    from finetune.models import load_config, model_class_for
    from finetune.recipe import train

    base, train_path, eval_path = task
    cfg = load_recipe(RECIPE, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
                               f"data.eval_path={eval_path}", f"output.dir={tmp_path / 'run'}", "train.max_steps=12",
                               "train.per_device_train_batch_size=4", "train.logging_steps=1",
                               "train.report_to=[none]", "eval.generation_rows=0", "train.gradient_checkpointing=true",
                               "lora.targets=[experts,cross_attn,cross_tower]", "data.max_length=48"])
    losses = _Losses()
    out = train(cfg, log=lambda *_: None, callbacks=[losses])
    assert len(losses.losses) == 12
    assert sum(losses.losses[-3:]) / 3 < 0.85 * sum(losses.losses[:3]) / 3, losses.losses  # ~6.2 -> ~4.8

    monkeypatch.setattr(merge_mod, "verify_in_fresh_process", lambda f, p, d, q, log: {
        **merge_verify.verify_folder(f, p, d), "reload_seconds": 0.0})
    logs: list[str] = []
    merged = tmp_path / "merged"
    rep = merge_mod.merge_adapter(out, merged, log=logs.append)
    assert rep.stats["max_abs_diff"] < 1e-4 < rep.adapter_effect
    assert "verification passed" in "\n".join(logs)
    assert set(json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"]) == \
        merge_mod.checkpoint_keys(base)

    from finetune.models import processor_class_for
    from finetune.validate import check_file

    model = model_class_for(load_config(merged)).from_pretrained(str(merged)).eval()  # strict
    processor = processor_class_for(model.config).from_pretrained(merged)
    assert type(processor).__name__ == "CogAgentProcessor"
    convs, _ = check_file(eval_path, image_root=None, max_images=1, check_images=True, allow_outside_images=False)
    together = generate_answers(model, processor, convs, max_new_tokens=3, batch_size=4)
    alone = [generate_answers(model, processor, [c], max_new_tokens=3, batch_size=1)[0] for c in convs]
    assert together == alone and all(isinstance(a, str) for a in together)


def test_qlora_quantizes_decoder_linears_and_keeps_both_towers_full_precision(task):
    from finetune.config import ModelSection, QuantSection
    from finetune.loading import load_weights

    model = load_weights(ModelSection(checkpoint_dir=str(task[0]), dtype="float32"),
                         QuantSection(mode="nf4", bnb_4bit_compute_dtype="float32"))
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["model.layers.0.cross_attn.key_value"] == "Linear4bit"
    assert kinds["model.layers.1.self_attn.vision_expert_query_key_value"] == "Linear4bit"
    tower = [k for n, k in kinds.items() if n.startswith(("model.cross_vision.", "model.vision.")) and "Linear" in k]
    assert tower and set(tower) == {"Linear"}
    assert kinds["lm_head"] == "Linear"


def test_shipped_recipe_targets_and_memory_plan_on_the_official_config(tmp_path):
    import shutil

    from finetune.loading import build_meta_model
    from finetune.targets import memory_plan_for
    from tests.conftest import REFERENCE

    shutil.copy(REFERENCE / "configs" / "cogagent-chat-hf.config.json", tmp_path / "config.json")
    cfg = load_recipe("recipes/cogagent-lora.yaml", [f"model.checkpoint_dir={tmp_path}"])
    meta = build_meta_model(tmp_path)
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    assert len(matches["cross_attn"]) == 96  # query, key_value, dense x 32 layers
    plan = str(memory_plan_for(meta, cfg, [n for hit in matches.values() for n in hit]))
    assert "cross K/V (CogAgent)" in plan and "cross tower (CogAgent)" in plan and "18.29B" in plan
    from finetune.targets import parameter_table

    rows = {line[:40].strip(): line for line in parameter_table(meta, [], 16).splitlines()}
    assert "other" not in rows  # every parameter has a component
    assert "335,544,320" in rows["cross attention"] and "316,950,208" in rows["cross tower (EVA-L, 1120 px)"]


def test_validate_counts_tokens_with_the_cogagent_template(task):
    from finetune.validate import check_file, resolve_model, token_report

    info = resolve_model(str(task[0]), None, None)
    assert info.processor.prompt_table == "cogagent" and info.image_tokens == 6
    convs, _ = check_file(task[2], image_root=None, max_images=1, check_images=False, allow_outside_images=False)
    lines, problems = token_report(convs, info, None, 1)
    batch = CogVLMCollator(info.processor)(convs)
    longest = int(batch["attention_mask"].sum(dim=1).max())
    assert not problems and f"max {longest}" in "\n".join(lines)
