"""DPO through TRL on the kit's model: the trainer's logged loss equals the DPO loss computed by hand, the
pair encoding scores only the final answer, and the recipe path raises held-out preference accuracy."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from data_formats.preference import parse_pair
from finetune.config import LoraSection


def _pairs(tmp_path, n=2):
    Image.new("RGB", (56, 56), (220, 40, 40)).save(tmp_path / "red.png")
    rows = [{"id": f"p{i}", "images": ["red.png"],
             "messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What color is it?"},
                          {"role": "assistant", "content": "red"},
                          {"role": "user", "content": "And now?"}],
             "chosen": ["red", "a red square"][i % 2], "rejected": ["blue and green", "blue"][i % 2]}
            for i in range(n)]
    pairs = []
    for i, row in enumerate(rows):
        pair, problems = parse_pair(row, f"pairs.jsonl:{i + 1}", tmp_path)
        assert pair is not None, problems
        pairs.append(pair)
    return pairs


def _setup(version, tmp_path):
    from finetune.dpo import PreferenceCollator, encode_pairs
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer
    from tests.conftest import build_tiny_model

    model = build_tiny_model(version)
    tok = build_tiny_tokenizer(version)
    model = apply_lora(model, LoraSection(targets=["experts"], r=4, lora_alpha=8, lora_dropout=0.0),
                       gradient_checkpointing=False, log=lambda *_: None)
    processor = CogVLMProcessor.from_config(model.config, tok)
    rows = encode_pairs(_pairs(tmp_path), processor)
    return model, tok, rows, PreferenceCollator(processor)


def test_pair_encoding_scores_only_the_final_answer(tmp_path):
    from finetune.dpo import PreferenceCollator, encode_pair
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.tiny import tiny_config
    from finetune.tokenization import build_tiny_tokenizer

    tok, config = build_tiny_tokenizer(2), tiny_config(2)
    pair = _pairs(tmp_path, 1)[0]
    processor = CogVLMProcessor.from_config(config, tok)
    row = encode_pair(pair, processor)
    for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        scored = [t for t, lab in zip(ids, labels) if lab != -100]
        # the history answer "red" is not scored, only the final answer and its EOS
        assert scored == tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        assert row[f"{side}_token_type_ids"].count(1) == config.image_tokens
    n = len(row["chosen_input_ids"]) - len(tok.encode(pair.chosen, add_special_tokens=False)) - 1
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]  # same prompt tokens
    batch = PreferenceCollator(processor)([row])
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "token_type_ids", "images"}
    assert batch["input_ids"].shape[0] == 2 and batch["images"].shape[0] == 2  # chosen row, then rejected row
    assert batch["completion_mask"][0].sum() == len(tok.encode(pair.chosen, add_special_tokens=False)) + 1


@pytest.mark.parametrize("precompute", [False, True], ids=["on-the-fly-ref", "precomputed-ref"])
def test_trainer_loss_matches_hand_computed_dpo_loss(version, tmp_path, precompute):
    from datasets import Dataset
    from trl import DPOConfig

    from finetune.dpo import CogDPOTrainer, _checkpointing_flag, dpo_sigmoid_loss, sequence_logps

    model, tok, rows, collator = _setup(version, tmp_path)
    beta = 0.5
    # bf16=False: TRL's configs default to bf16 autocast, which on CPU would make the check approximate
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                     learning_rate=1e-9, logging_steps=1, remove_unused_columns=False, use_cpu=True,
                     report_to="none", max_length=None, save_strategy="no", **{_checkpointing_flag(): False},
                     beta=beta, precompute_ref_log_probs=precompute, bf16=False, disable_tqdm=True,
                     lr_scheduler_type="constant")
    # The adapter starts as a non-zero "trained" one, so policy and reference differ. TRL copies it into its
    # frozen "ref" adapter at construction; to score against the base we zero that copy.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    trainer = CogDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator,
                            processing_class=tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ref." in name and "lora_B" in name:
                p.zero_()
    if precompute:  # TRL scored the reference at construction, with the copy: redo it with the zeroed one
        trainer.train_dataset = trainer._precompute_ref_logps(
            trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]), "train2", 2)
    # By hand, from full logits (not TRL's fused head): policy = adapter on, reference = adapter off.
    pc, pr = sequence_logps(model, collator, rows)
    rc, rr = sequence_logps(model, collator, rows, reference=True)
    assert (pc - rc).abs().max() > 0.05  # the check is not a trivial log(2)
    hand = dpo_sigmoid_loss(pc, pr, rc, rr, beta).mean().item()
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(hand, abs=1e-4)
    assert abs(hand - math.log(2)) > 1e-3
    assert logged["logps/chosen"] == pytest.approx(pc.mean().item(), abs=1e-3)
    assert logged["logps/rejected"] == pytest.approx(pr.mean().item(), abs=1e-3)
    assert logged["rewards/chosen"] == pytest.approx(beta * (pc - rc).mean().item(), abs=1e-4)
    assert logged["rewards/margins"] == pytest.approx(beta * ((pc - rc) - (pr - rr)).mean().item(), abs=1e-4)


@pytest.mark.parametrize("quant", ["none", "nf4"], ids=["lora", "qlora"])
def test_recipe_dpo_run_raises_preference_accuracy(tmp_path, quant):
    """`train.method=dpo` end to end on a tiny CogVLM2 (LoRA and QLoRA), held-out pairs. At this small scale the
    preference does not depend on the image (chosen: red/green/blue, rejected: yellow/purple/orange); the
    image-dependent proof (true colour preferred) is `python -m adapters.dpo_demo`."""
    from adapters.dpo_demo import write_pairs
    from finetune.config import load_recipe
    from finetune.recipe import train
    from finetune.tiny import make_tiny

    base = make_tiny(2, tmp_path / "base")
    data = write_pairs(tmp_path / "data", 0, 16, 24, seed=3, image_rule=False)
    cfg = load_recipe("cogvlm2-dpo", [
        f"model.checkpoint_dir={base}", "model.family=null", "model.dtype=float32", f"quant.mode={quant}",
        f"data.train_path={data['train']}", f"data.eval_path={data['eval']}", "data.max_length=64",
        "data.num_workers=0", "lora.targets=[experts,glu_adapter]", "lora.r=8", "lora.lora_alpha=16",
        "lora.lora_dropout=0.0", "train.gradient_checkpointing=false", "train.report_to=[none]",
        "train.max_steps=8", "train.learning_rate=1e-2", "train.per_device_train_batch_size=8",
        "train.gradient_accumulation_steps=1", "train.warmup_steps=0", "train.lr_scheduler_type=constant",
        "train.logging_steps=1", "train.save_steps=1000", "dpo.beta=0.5", f"output.dir={tmp_path / 'run'}"])
    run = train(cfg, log=lambda *_: None)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["method"] == "dpo" and info["quant_mode"] == quant
    before, after = info["preference_accuracy_before"], info["preference_accuracy_after"]
    assert before <= 0.6 and after >= 0.7 and after - before >= 0.2, (before, after)  # chance = 0.5
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "adapter" / "ref").exists()  # TRL's frozen reference copy is not saved
    history = json.loads((run / "log_history.json").read_text())
    assert any("rewards/margins" in h and "logps/chosen" in h for h in history)
