"""The trainer end to end on a tiny model: what moves, what must not, resume, QLoRA, the run folder."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from adapters.demo import RECIPE, write_task
from finetune.config import load_recipe
from finetune.recipe import train
from finetune.tiny import make_tiny
from finetune.trainer import DivergedError, guard_nonfinite


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    base = make_tiny(2, root / "base", seed=1)
    train_path, eval_path = write_task(root / "data", n_train=24, n_eval=6, seed=1)
    return base, train_path, eval_path


def _cfg(task, out, *extra):
    base, train_path, eval_path = task
    return load_recipe(RECIPE, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
                                f"data.eval_path={eval_path}", f"output.dir={out}", "train.max_steps=4",
                                "train.per_device_train_batch_size=4", "train.logging_steps=1",
                                "train.report_to=[none]", "eval.generation_rows=2", *extra])


class _Snapshot(TrainerCallback):
    """Copies every parameter at the start and the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_weights_move_and_base_weights_stay_bit_identical(task, tmp_path):
    snap = _Snapshot()
    train(_cfg(task, tmp_path / "run", "lora.modules_to_save=[]"), log=lambda *_: None, callbacks=[snap])
    lora = [n for n in snap.before if "lora_" in n]
    assert lora and snap.trainable == set(lora)
    for n in lora:
        assert not torch.equal(snap.before[n], snap.after[n]), f"{n} did not change"
    on_disk = {}
    for shard in task[0].glob("*.safetensors"):
        on_disk.update({k: v for k, v in load_file(shard).items() if not k.endswith("inv_freq")})  # buffers
    base = [n for n in snap.before if "lora_" not in n]
    assert len(base) == len(on_disk)
    for n in base:
        assert torch.equal(snap.before[n], snap.after[n]), f"base weight {n} changed"
        key = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(snap.after[n], on_disk[key]), f"{n} differs from the checkpoint"


def test_run_folder_contents_and_plain_peft_load(task, tmp_path):
    out = train(_cfg(task, tmp_path / "run"), log=lambda *_: None)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/processor_config.json",
                 "recipe.resolved.yaml", "run.json", "curves.png"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["template_version"] == "chat" and run["family_version"] == 2 and run["global_step"] == 4
    assert len(run["base_config_hash"]) == 16
    assert run["base_fingerprint"] == __import__("finetune.loading").loading.base_fingerprint(task[0])
    assert load_recipe(out / "recipe.resolved.yaml") == _cfg(task, tmp_path / "run")
    from finetune.models.cogvlm.processing import CogVLMProcessor

    cfg = _cfg(task, tmp_path / "run")  # the processor saved beside the adapter carries the recipe's encoding
    saved = CogVLMProcessor.from_pretrained(out / "adapter")
    assert (saved.template_version, saved.max_length, saved.last_turn_only, saved.allow_multi_image) == (
        "chat", cfg.data.max_length, cfg.data.last_turn_only, cfg.data.allow_multi_image)

    from peft import PeftModel

    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    model = PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(str(task[0])), str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_non_empty_run_folder_is_refused_without_resume(task, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        train(_cfg(task, tmp_path / "run", "output.overwrite=false"), log=lambda *_: None)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_stop_and_resume_equals_uninterrupted(task, tmp_path):
    common = ("train.max_steps=6", "train.save_steps=3", "eval.generation_rows=0", "data.eval_path=null")
    full = train(_cfg(task, tmp_path / "full", *common), log=lambda *_: None)
    part = tmp_path / "part"
    train(_cfg(task, part, *common), log=lambda *_: None, callbacks=[_StopAt(3)])
    assert (part / "checkpoint-3").is_dir()
    resumed = train(_cfg(task, part, *common, "train.resume=auto"), log=lambda *_: None)
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert json.loads((resumed / "run.json").read_text())["global_step"] == 6


def test_qlora_nf4_trains_a_few_steps_on_cpu(task, tmp_path):
    snap = _Snapshot()
    out = train(_cfg(task, tmp_path / "q", "quant.mode=nf4", "quant.bnb_4bit_compute_dtype=float32",
                     "lora.modules_to_save=[]", "eval.generation_rows=0"), log=lambda *_: None, callbacks=[snap])
    assert json.loads((out / "run.json").read_text())["quant_mode"] == "nf4"
    lora = [n for n in snap.before if "lora_B" in n]
    assert lora and all(not torch.equal(snap.before[n], snap.after[n]) for n in lora)


def test_nonfinite_loss_is_skipped_with_zero_gradients():
    lin = torch.nn.Linear(4, 8)
    bad = (lin(torch.randn(1, 3, 4)) * float("nan")).sum()
    loss, skipped = guard_nonfinite(bad, list(lin.parameters()))
    loss.backward()
    assert skipped and loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in lin.parameters())


@pytest.mark.parametrize("fp16_scaler", [False, True])
def test_step_guard_keeps_a_bad_step_from_the_optimizer(fp16_scaler):
    """An inf loss whose gradients are finite (inf added as a constant) would still move AdamW's weights
    (weight decay) if stepped; the guard drops the step: no gradient (plain optimizers skip such a parameter),
    or NaN gradients under fp16 loss scaling, so that the GradScaler skips it."""
    from types import SimpleNamespace

    from finetune.trainer import NonfiniteGuard

    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0) if fp16_scaler else None
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(scaler=scaler, num_processes=1, distributed_type="NO"), optimizer=opt,
        skip_nonfinite=True, max_nonfinite_steps=10, skipped=0, _int_skipped=0, _nonfinite_run=0,
        loss_name="loss", divergence_hint=lambda: "", after_step_check=lambda bad: None)
    guard = NonfiniteGuard(trainer)
    before = [p.detach().clone() for p in lin.parameters()]
    loss, finite = guard.observe(lin(torch.ones(1, 3)).sum() + float("inf"), lin)
    (scaler.scale(loss) if scaler else loss).backward()
    assert not bool(finite) and all(torch.isfinite(p.grad).all() for p in lin.parameters())
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None)
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, lin.parameters()))
    assert trainer.skipped == 1 and not opt.state  # the optimizer never took the step
    trainer.skip_nonfinite = False
    guard.observe(torch.tensor(float("nan")), lin)
    with pytest.raises(DivergedError, match=r"diverged at step 1: 2 optimizer step.*skip_nonfinite=false"):
        guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None)


def test_check_passes_and_fails_when_loss_cannot_drop(task, tmp_path, capsys):
    from finetune.check import main

    base, train_path, _ = task
    args = [str(RECIPE), f"model.checkpoint_dir={base}", f"data.train_path={train_path}", "data.eval_path=null"]
    assert main(args) == 0
    assert "check: ok" in capsys.readouterr().out
    assert main([*args, "train.learning_rate=1e-12"]) == 1
    assert "did NOT drop" in capsys.readouterr().out


def test_boi_eoi_train_save_resume_and_merge(task, tmp_path):
    """boi/eoi are bare parameters: trained beside LoRA, saved next to the adapter, restored on resume and merge."""
    from adapters.merge import merge_adapter
    from finetune import extra_params
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    common = ("lora.modules_to_save=[boi_eoi]", "train.max_steps=6", "train.save_steps=3", "eval.generation_rows=0",
              "data.eval_path=null")
    full = train(_cfg(task, tmp_path / "full", *common), log=lambda *_: None)
    saved = extra_params.read(full / "adapter")
    base = CogVLMForCausalLM.from_pretrained(str(task[0]))
    assert set(saved) == {"model.vision.boi", "model.vision.eoi"}
    assert not torch.equal(saved["model.vision.boi"], base.model.vision.boi.detach())
    assert (full / "checkpoint-3" / extra_params.FILENAME).is_file()

    part = tmp_path / "part"
    train(_cfg(task, part, *common), log=lambda *_: None, callbacks=[_StopAt(3)])
    resumed = train(_cfg(task, part, *common, "train.resume=auto"), log=lambda *_: None)
    again = extra_params.read(resumed / "adapter")
    for k in saved:
        assert torch.allclose(saved[k], again[k], atol=1e-6), k

    merged = merge_adapter(full, tmp_path / "merged", log=lambda *_: None).out
    m = CogVLMForCausalLM.from_pretrained(str(merged))
    assert torch.equal(m.model.vision.boi.detach(), saved["model.vision.boi"])


@pytest.mark.parametrize("overrides, check", [
    (["lora.use_dora=true"], {"use_dora": True}),
    (["lora.use_rslora=true"], {"use_rslora": True}),
    (["lora.init_lora_weights=pissa"], {"init_lora_weights": "pissa"}),
    (["lora.init_lora_weights=olora"], {"init_lora_weights": "olora"}),
    (["lora.loraplus_lr_ratio=16"], {}),
    (["quant.mode=int8"], {}),
    (["train.optim=paged_adamw_8bit"], {}),
    (["data.packing=true"], {}),
], ids=["dora", "rslora", "pissa", "olora", "loraplus", "int8", "paged_adamw_8bit", "packing"])
def test_adapter_variants_train(task, tmp_path, overrides, check):
    history = []

    class _Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    out = train(_cfg(task, tmp_path / "v", "train.max_steps=2", "lora.modules_to_save=[]", "eval.generation_rows=0",
                     "data.eval_path=null", *overrides), log=lambda *_: None, callbacks=[_Keep()])
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    for key, value in check.items():
        assert adapter_cfg[key] == value
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(float(x))) for x in losses)
    first = next(h for h in history if "tokens_seen" in h)
    if "data.packing=true" in overrides:
        # 4 sequences packed over the dataset, each <= max_length 64 and holding 2+ rows of 19-27 tokens;
        # counting attention_mask's segment ids (1, 2) instead of tokens would exceed 4 * 64
        assert 4 * 27 < first["tokens_seen"] <= 4 * 64
    else:  # the first step saw 4 demo rows of 19-27 tokens each
        assert 4 * 19 <= first["tokens_seen"] <= 4 * 27


def test_overwrite_clears_old_checkpoints_and_resume_refuses_another_recipe(task, tmp_path):
    out = tmp_path / "run"
    common = ("train.max_steps=2", "train.save_steps=1", "eval.generation_rows=0", "data.eval_path=null")
    train(_cfg(task, out, *common), log=lambda *_: None)
    assert (out / "checkpoint-2").is_dir()
    train(_cfg(task, out, "train.max_steps=1", "train.save_steps=1", "eval.generation_rows=0", "data.eval_path=null",
               "output.overwrite=true"), log=lambda *_: None)
    assert not (out / "checkpoint-2").exists()  # resume=auto could otherwise pick up the old run's state
    with pytest.raises(ValueError, match=r"recipe differs in lora\.r: 8 -> 4"):
        train(_cfg(task, out, *common, "train.resume=auto", "lora.r=4"), log=lambda *_: None)
