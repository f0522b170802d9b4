"""DPO through TRL on the kit's model: the trainer's logged loss equals the DPO loss computed by hand, the
pair encoding scores only the final answer, the recipe path raises held-out preference accuracy (LoRA and
QLoRA), and a DPO run gets what an SFT run has: memory plan, curves, resume, non-finite guard, check, merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from data_formats.preference import parse_pair
from finetune.config import LoraSection

from .test_recipe import _StopAt
from .test_run_folder import PoisonWeights, _Logs


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


def _setup(version, tmp_path, family="cogvlm"):
    from finetune.dpo import PreferenceCollator, encode_pairs
    from finetune.lora import apply_lora
    from finetune.models import processor_class_for
    from finetune.tokenization import build_tiny_tokenizer
    from tests.conftest import build_tiny_model

    if family == "cogagent":  # CogVLM1 tokenizer; the cross tower reads `cross_images`
        from finetune.models.cogagent.configuration import tiny_cogagent_config
        from finetune.models.cogagent.modeling import CogAgentForCausalLM
        from finetune.tiny import _special_ids

        torch.manual_seed(0)
        model = CogAgentForCausalLM(tiny_cogagent_config(_special_ids(1))).eval()
    else:
        model = build_tiny_model(version)
    tok = build_tiny_tokenizer(version)
    targets = ["experts", "cross_attn"] if family == "cogagent" else ["experts"]
    model = apply_lora(model, LoraSection(targets=targets, r=4, lora_alpha=8, lora_dropout=0.0),
                       gradient_checkpointing=False, log=lambda *_: None)
    processor = processor_class_for(model.config).from_config(model.config, tok)
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
    _check_logged_loss(*_setup(version, tmp_path), tmp_path, precompute)


def test_cogagent_dpo_carries_cross_images_and_logs_the_hand_computed_loss(tmp_path):
    """CogAgent's pairs carry `cross_images` (one per image, both sides) to TRL's forward and to the hand check."""
    model, tok, rows, collator = _setup(1, tmp_path, family="cogagent")
    assert rows[0]["chosen_cross_images"] == rows[0]["rejected_cross_images"] == rows[0]["image_refs"]
    batch = collator(rows)
    assert batch["cross_images"].shape == (4, 3, 56, 56)  # 2 pairs x (chosen, rejected), one picture each
    calls = []
    hook = model.get_base_model().model.cross_vision.register_forward_hook(lambda *a: calls.append(1))
    _check_logged_loss(model, tok, rows, collator, tmp_path, precompute=False)
    hook.remove()
    assert calls  # the cross tower ran: the cross branch is part of the scored policy and reference


def _check_logged_loss(model, tok, rows, collator, tmp_path, precompute):
    from datasets import Dataset
    from trl import DPOConfig

    from finetune.dpo import CogDPOTrainer, _checkpointing_flag, dpo_sigmoid_loss, sequence_logps

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


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory):
    """A tiny CogVLM2 checkpoint and preference files. At this small scale the preference does not depend on the
    image (chosen: red/green/blue, rejected: yellow/purple/orange); the image-dependent proof (true colour
    preferred) is `python -m adapters.dpo_demo`."""
    from adapters.dpo_demo import write_pairs
    from finetune.tiny import make_tiny

    root = tmp_path_factory.mktemp("dpo")
    return make_tiny(2, root / "base"), write_pairs(root / "data", 0, 16, 24, seed=3, image_rule=False)


def _dpo_cfg(dpo_data, out, *extra):
    from finetune.config import load_recipe

    base, data = dpo_data
    return load_recipe("cogvlm2-dpo", [
        f"model.checkpoint_dir={base}", "model.family=null", "model.dtype=float32",
        f"data.train_path={data['train']}", f"data.eval_path={data['eval']}", "data.max_length=64",
        "data.num_workers=0", "lora.targets=[experts,glu_adapter]", "lora.r=8", "lora.lora_alpha=16",
        "lora.lora_dropout=0.0", "train.gradient_checkpointing=false", "train.report_to=[none]",
        "train.max_steps=8", "train.learning_rate=1e-2", "train.per_device_train_batch_size=8",
        "train.gradient_accumulation_steps=1", "train.warmup_steps=0", "train.lr_scheduler_type=constant",
        "train.logging_steps=1", "train.save_steps=1000", "dpo.beta=0.5", f"output.dir={out}", *extra])


@pytest.fixture(scope="module")
def lora_run(dpo_data, tmp_path_factory):
    from finetune.recipe import train

    return train(_dpo_cfg(dpo_data, tmp_path_factory.mktemp("lora") / "run"), log=lambda *_: None)


@pytest.mark.parametrize("quant", ["none", "nf4"], ids=["lora", "qlora"])
def test_recipe_dpo_run_raises_preference_accuracy(dpo_data, lora_run, tmp_path, quant):
    """`train.method=dpo` end to end on a tiny CogVLM2 (LoRA and QLoRA nf4 on CPU), held-out pairs; the run folder
    holds what an SFT run's does (plan.txt, curves.png, run.json) plus TRL's curves in log_history.json."""
    from finetune.recipe import train

    run = lora_run if quant == "none" else train(_dpo_cfg(dpo_data, tmp_path / "run", f"quant.mode={quant}"),
                                                 log=lambda *_: None)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["method"] == "dpo" and info["quant_mode"] == quant
    before, after = info["preference_accuracy_before"], info["preference_accuracy_after"]
    assert before <= 0.6 and after >= 0.7 and after - before >= 0.2, (before, after)  # chance = 0.5
    assert info["skipped_nonfinite"] == 0 and info["train_loss"] < math.log(2)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "adapter" / "ref").exists()  # TRL's frozen reference copy is not saved
    assert not (run / "README.md").exists()  # TRL's model card is not written into the run folder
    history = json.loads((run / "log_history.json").read_text())
    assert any("rewards/margins" in h and "logps/chosen" in h for h in history)
    plan = (run / "plan.txt").read_text()
    assert "8 pair(s) = 16 rows (chosen + rejected)" in plan and "reference forward (no grad)" in plan
    assert "LoRA targets:" in plan  # the match report, as for SFT
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dpo_curves_show_margins_logps_and_accuracy(lora_run, tmp_path):
    from finetune.plots import plot_dpo_curves

    history = json.loads((lora_run / "log_history.json").read_text())
    drawn = plot_dpo_curves(history, tmp_path / "c.png", before=0.4, after=0.8)
    assert {"loss", "rewards/margins", "logps/chosen", "logps/rejected", "rewards/accuracies",
            "held-out preference accuracy"} <= set(drawn)
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert plot_dpo_curves([], tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_dpo_memory_plan_counts_chosen_and_rejected(dpo_data, lora_run):
    """The policy forward runs chosen and rejected rows together: twice SFT's activations for the same batch; the
    reference adds one no-grad layer (or nothing when precomputed) and, continuing an adapter, its frozen copy."""
    from finetune.dpo import dpo_memory_plan
    from finetune.loading import build_meta_model
    from finetune.memory import GIB, plan_memory

    cfg = _dpo_cfg(dpo_data, "unused")
    sft = {name: gib for name, gib, _ in plan_memory(build_meta_model(cfg.model.checkpoint_dir), cfg, 0, 0,
                                                      "float32", on_gpu=False).rows}
    dpo = {name: gib for name, gib, _ in dpo_memory_plan(cfg, on_gpu=False).rows}
    assert dpo["activations: decoder"] == pytest.approx(2 * sft["activations: decoder"])
    layers = json.loads((Path(cfg.model.checkpoint_dir) / "config.json").read_text())["num_hidden_layers"]
    # one layer of the doubled batch, live during the no-grad reference forward
    assert dpo["reference forward (no grad)"] == pytest.approx(2 * sft["activations: decoder"] / layers)
    pre = {name: gib for name, gib, _ in dpo_memory_plan(_dpo_cfg(dpo_data, "unused", "dpo.precompute_ref_log_probs="
                                                                  "true"), on_gpu=False).rows}
    assert pre["reference forward"] == 0.0
    cont = {name: gib for name, gib, _ in dpo_memory_plan(
        _dpo_cfg(dpo_data, "unused", f"dpo.start_adapter={lora_run / 'adapter'}"), on_gpu=False).rows}
    from safetensors.torch import load_file

    numel = sum(t.numel() for t in load_file(lora_run / "adapter" / "adapter_model.safetensors").values())
    assert cont["reference adapter (frozen copy)"] == pytest.approx(numel * 4 / GIB)


def test_dpo_stop_and_resume_equals_uninterrupted(dpo_data, lora_run, tmp_path):
    """Continuing an adapter (TRL's frozen "ref" copy in play): stopped at step 2 and resumed with --resume auto,
    the adapter equals an uninterrupted run's, and the checkpoint carries the kit's manifest."""
    from safetensors.torch import load_file

    from finetune.recipe import train
    from finetune.run_folder import MANIFEST

    common = ("train.max_steps=4", "train.save_steps=2", "data.eval_path=null", "train.learning_rate=2e-3",
              f"dpo.start_adapter={lora_run / 'adapter'}")
    full = train(_dpo_cfg(dpo_data, tmp_path / "full", *common), log=lambda *_: None)
    part = tmp_path / "part"
    train(_dpo_cfg(dpo_data, part, *common), log=lambda *_: None, callbacks=[_StopAt(2)])
    assert (part / "checkpoint-2" / MANIFEST).is_file()
    logs: list[str] = []
    resumed = train(_dpo_cfg(dpo_data, part, *common, "train.resume=auto"), log=logs.append)
    assert any("resume:" in line and "checkpoint-2" in line for line in logs)
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    start = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() == start.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert json.loads((resumed / "run.json").read_text())["global_step"] == 4


def test_diverged_dpo_run_fails_without_saving_an_adapter(dpo_data, tmp_path):
    from finetune.recipe import train
    from finetune.trainer import DivergedError

    out, logs = tmp_path / "run", _Logs()
    with pytest.raises(DivergedError, match=r"diverged.*non-finite DPO loss.*max_nonfinite_steps=2.*learning_rate"):
        train(_dpo_cfg(dpo_data, out, "train.learning_rate=1e30", "train.max_steps=20", "train.max_nonfinite_steps=2",
                       "data.eval_path=null"), log=lambda *_: None, callbacks=[logs])
    assert not (out / "adapter").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "diverged" in run["error"]
    # skipped micro-batches leave no NaN in the curves, and are not logged as a loss
    values = [v for h in logs.history for k, v in h.items() if isinstance(v, float) and k != "grad_norm"]
    assert values and all(math.isfinite(v) for v in values)
    assert any(h.get("skipped_nonfinite_in_interval") for h in logs.history)


def test_dpo_nonfinite_weights_are_never_saved(dpo_data, tmp_path):
    from finetune.recipe import train
    from finetune.trainer import DivergedError

    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="hold NaN/inf"):
        train(_dpo_cfg(dpo_data, out, "train.max_steps=2", "data.eval_path=null"), log=lambda *_: None,
              callbacks=[PoisonWeights(2)])
    assert not (out / "adapter").exists()


def test_dpo_shares_the_step_guard_and_never_applies_a_nonfinite_step(dpo_data, tmp_path):
    """With skipping off, the first non-finite DPO step stops the run before the optimizer applies it."""
    from finetune.recipe import train
    from finetune.trainer import DivergedError

    out, weights = tmp_path / "run", _Weights()
    with pytest.raises(DivergedError, match=r"diverged at step 2: .*non-finite DPO loss.*skip_nonfinite=false"):
        train(_dpo_cfg(dpo_data, out, "train.learning_rate=1e30", "train.max_steps=4", "train.skip_nonfinite=false",
                       "train.warmup_steps=0", "data.eval_path=null"), log=lambda *_: None, callbacks=[weights])
    assert not (out / "adapter").exists()
    assert weights.after_steps == 1 and all(torch.isfinite(w).all() for w in weights.now())  # only step 1 applied


class _Weights(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.after_steps = model, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.after_steps = state.global_step

    def now(self):
        return [p.detach() for p in self.model.parameters() if p.requires_grad]


def test_check_runs_a_dpo_overfit_and_requires_the_loss_to_drop(dpo_data, tmp_path, capsys, monkeypatch):
    import functools

    from finetune import check

    monkeypatch.setattr(check, "overfit_check", functools.partial(check.overfit_check, steps=5))
    base, data = dpo_data
    argv = ["cogvlm2-dpo", f"model.checkpoint_dir={base}", "model.family=null", "model.dtype=float32",
            f"data.train_path={data['train']}", "data.max_length=64", "data.num_workers=0",
            "lora.targets=[experts,glu_adapter]", "lora.r=8", "lora.lora_alpha=16", "lora.lora_dropout=0.0",
            "train.gradient_checkpointing=false", "dpo.beta=0.5", f"output.dir={tmp_path / 'unused'}"]
    assert check.main(argv + ["train.learning_rate=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "overfit 8 preference pairs (DPO): loss 0.6931 -> " in out and "(dropped)" in out and "check: ok" in out
    assert check.main(argv + ["train.learning_rate=1e-9"]) == 1
    captured = capsys.readouterr()
    assert "(did NOT drop)" in captured.out and "the DPO loss did not drop on 8 pairs" in captured.err
    assert not (tmp_path / "unused").exists()  # the check trains in a temporary folder


def test_dpo_adapter_merges_and_verifies(lora_run, tmp_path, capsys, monkeypatch):
    """`cogtune merge` on a DPO run: its verification passes, and the merged model scores pairs as base + adapter."""
    from peft import PeftModel

    from adapters import merge as merge_mod
    from adapters import merge_verify
    from adapters.merge import main as merge_main
    from data_formats.preference import read_pairs
    from finetune.dpo_data import PreferenceCollator, encode_pairs, sequence_logps
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.tokenization import load_tokenizer

    # the verification in-process (the fresh process, ~5 s of imports, is covered by tests/test_merge.py)
    monkeypatch.setattr(merge_mod, "verify_in_fresh_process", lambda f, p, d, q, log: {
        **merge_verify.verify_folder(f, p, d), "reload_seconds": 0.0})
    assert merge_main([str(lora_run), "--out", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "verification passed" in out
    info = json.loads((lora_run / "run.json").read_text())
    base_dir = info["base_checkpoint"]
    tok = load_tokenizer(base_dir, None)
    merged = CogVLMForCausalLM.from_pretrained(str(tmp_path / "merged"))
    unmerged = PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(base_dir), str(lora_run / "adapter"))
    pairs, _ = read_pairs(Path(base_dir).parent / "data" / "eval.jsonl")
    processor = CogVLMProcessor.from_config(merged.config, tok, max_length=64)
    rows = encode_pairs(pairs[:8], processor)
    collator = PreferenceCollator(processor)
    mc, mr = sequence_logps(merged, collator, rows)
    uc, ur = sequence_logps(unmerged, collator, rows)
    bc, _ = sequence_logps(unmerged, collator, rows, reference=True)
    assert torch.allclose(mc, uc, atol=1e-3) and torch.allclose(mr, ur, atol=1e-3)
    assert (mc - bc).abs().max() > 0.1  # the DPO adapter matters
