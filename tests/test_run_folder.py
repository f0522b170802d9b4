"""The run folder under faults and bad input: what overwrite may remove, which checkpoint resume takes,
when a run fails, what run.json says, and what the console shows (issues 9 and 14)."""

import json
import math
import os
import re
import shutil
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from adapters.demo import RECIPE, write_task
from finetune.config import load_recipe, parse_recipe_args
from finetune.fileio import write_atomic
from finetune.recipe import step_warnings, train
from finetune.run_folder import MANIFEST, checkpoint_problem, newest_complete_checkpoint
from finetune.tiny import make_tiny
from finetune.trainer import DivergedError

from .test_recipe import _StopAt

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    base = make_tiny(2, root / "base", seed=1)
    train_path, eval_path = write_task(root / "data", n_train=24, n_eval=6, seed=1)
    return base, train_path, eval_path


def _cfg(task, out, *extra, base=None, train_path=None):
    b, t, _ = task
    return load_recipe(RECIPE, [f"model.checkpoint_dir={base or b}", f"data.train_path={train_path or t}",
                                "data.eval_path=null", f"output.dir={out}", "train.max_steps=4",
                                "train.per_device_train_batch_size=4", "train.logging_steps=1",
                                "train.report_to=[none]", "train.save_steps=2", "lora.modules_to_save=[]",
                                "output.overwrite=false", *extra])


class _Logs(TrainerCallback):
    def __init__(self):
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.history.append(dict(logs or {}))


@pytest.fixture(scope="module")
def finished_run(task, tmp_path_factory):
    """A 6-step run stopped after step 4, with complete checkpoint-2 and checkpoint-4 (tests damage copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(task, out, "train.max_steps=6"), callbacks=[_StopAt(4)], **QUIET)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---- 14.1: overwrite removes only what the kit wrote ----

def test_overwrite_refuses_a_folder_with_user_files_and_removes_nothing(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    (out / "notes.txt").write_text("my notes")
    (out / "mydata").mkdir()
    (out / "mydata" / "train.jsonl").write_text(task[1].read_text())
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"files the kit did not write: mydata/, notes\.txt.*Nothing was removed"):
        train(_cfg(task, out, "output.overwrite=true"), **QUIET)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_refuses_a_folder_holding_the_runs_own_inputs(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    shutil.copytree(task[0], out / "base")
    shutil.copytree(task[1].parent, out / "data")
    n = len(list(out.rglob("*")))
    with pytest.raises(ValueError, match=r"inputs of this run: model\.checkpoint_dir .*data\.train_path"):
        train(_cfg(task, out, "output.overwrite=true", base=out / "base", train_path=out / "data" / "train.jsonl"),
              **QUIET)
    assert len(list(out.rglob("*"))) == n and (out / "base" / "config.json").is_file()


def test_overwrite_removes_the_kit_files_of_an_earlier_run(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    (out / "eval_predictions_step4.jsonl").write_text("{}\n")
    train(_cfg(task, out, "output.overwrite=true", "train.max_steps=1", "train.save_steps=100"), **QUIET)
    assert not (out / "checkpoint-4").exists() and not (out / "eval_predictions_step4.jsonl").exists()
    assert json.loads((out / "run.json").read_text())["global_step"] == 1


def test_a_folder_without_kit_evidence_is_never_treated_as_a_run(task, tmp_path):
    """A user folder holding an `adapter/` and a `checkpoint-1/` (but no recipe.resolved.yaml, no run.json)."""
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "checkpoint-1").mkdir()
    with pytest.raises(ValueError, match="files the kit did not write: adapter/, checkpoint-1/"):
        train(_cfg(task, out, "output.overwrite=true"), **QUIET)
    assert (out / "adapter").is_dir()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from adapters.demo import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--out", str(tmp_path)]) == 2
    assert "nothing was removed" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- 9.7: a failed run does not block its own rerun; run.json tells what the run is ----

def test_failed_run_leaves_run_json_and_its_rerun_needs_no_overwrite(task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "messages": [{"role": "user", "content": "hi"}]}\n')
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        train(_cfg(task, out, train_path=bad), **QUIET)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"]
    assert (out / "recipe.resolved.yaml").is_file()
    train(_cfg(task, out, "train.max_steps=1"), **QUIET)  # the corrected rerun, overwrite off
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_trained_run_still_needs_resume_or_overwrite(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    with pytest.raises(ValueError, match=r"holds an earlier run \(.*checkpoint-4.*--resume auto.*overwrite=true"):
        train(_cfg(task, out), **QUIET)


# ---- 14.3 / 14.4: resume takes the newest complete, verified checkpoint ----

def _damage(folder, how):
    if how == "empty folder":
        for p in folder.iterdir():
            p.unlink()
    elif how == "no trainer_state":
        (folder / "trainer_state.json").unlink()
    elif how == "no optimizer":  # a kill after the adapter, before optimizer.pt
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", MANIFEST):
            (folder / name).unlink(missing_ok=True)
    elif how == "no manifest":  # killed after every Trainer file, before the completion marker
        (folder / MANIFEST).unlink()
    elif how == "altered adapter":  # same size, other bytes
        path = folder / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-8:] = b"\xff" * 8
        path.write_bytes(bytes(data))
    elif how == "missing scheduler":
        (folder / "scheduler.pt").unlink()


@pytest.mark.parametrize("how", ["empty folder", "no trainer_state", "no optimizer", "no manifest", "altered adapter",
                                 "missing scheduler"])
def test_incomplete_or_altered_checkpoints_are_detected(finished_run, tmp_path, how):
    out = _copy(finished_run, tmp_path)
    assert checkpoint_problem(out / "checkpoint-4") is None
    _damage(out / "checkpoint-4", how)
    assert checkpoint_problem(out / "checkpoint-4") is not None
    chosen, skipped = newest_complete_checkpoint(out)
    assert chosen == out / "checkpoint-2" and [f.name for f, _ in skipped] == ["checkpoint-4"]


def test_resume_auto_skips_a_partial_checkpoint_and_matches_the_uninterrupted_run(finished_run, task, tmp_path):
    full = train(_cfg(task, tmp_path / "full", "train.max_steps=6"), **QUIET)
    out = _copy(finished_run, tmp_path)
    _damage(out / "checkpoint-4", "no trainer_state")
    lines = []
    train(_cfg(task, out, "train.max_steps=6", "train.resume=auto"), log=lines.append)
    assert any("skipped checkpoint-4: trainer_state.json" in str(x) for x in lines)
    assert any(str(x).startswith("resume: ") and str(x).endswith("checkpoint-2") for x in lines)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (full, out))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ra, rb = (json.loads((r / "run.json").read_text()) for r in (full, out))
    assert rb["global_step"] == 6 and rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
    assert checkpoint_problem(out / "checkpoint-4") is None  # written again, complete this time


def test_explicit_resume_refuses_missing_optimizer_and_nonfinite_weights(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    ck = out / "checkpoint-4"
    (ck / MANIFEST).unlink()  # an older checkpoint without a manifest: checked on its files and weights
    weights = load_file(ck / "adapter_model.safetensors")
    key = next(iter(weights))
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, ck / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"cannot resume from .*checkpoint-4: .*tensor {key} holds NaN"):
        train(_cfg(task, out, "train.max_steps=6", f"train.resume={ck}"), **QUIET)
    (ck / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="optimizer.pt missing"):
        train(_cfg(task, out, "train.max_steps=6", f"train.resume={ck}"), **QUIET)


def test_resume_auto_refuses_when_no_checkpoint_is_complete(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    _damage(out / "checkpoint-4", "no manifest")
    _damage(out / "checkpoint-2", "no optimizer")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(_cfg(task, out, "train.max_steps=6", "train.resume=auto"), **QUIET)
    assert (out / "checkpoint-4").is_dir()  # nothing removed when nothing is resumed


# ---- 14.15: flags among overrides; run-wide train loss; no step past max_steps ----

def test_resume_flag_may_follow_overrides(task, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text())
    _, cfg = parse_recipe_args([str(recipe), "--resume", "auto", "lora.r=4", "--skip-invalid", "train.max_steps=3"],
                               "train.py", "t", resume_flag=True)
    assert (cfg.train.resume, cfg.lora.r, cfg.data.skip_invalid, cfg.train.max_steps) == ("auto", 4, True, 3)


def test_resume_at_max_steps_records_that_step_and_keeps_the_adapter(finished_run, task, tmp_path):
    out = _copy(finished_run, tmp_path)
    before = json.loads((out / "run.json").read_text())
    train(_cfg(task, out, f"train.resume={out / 'checkpoint-4'}"), **QUIET)
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 4 and run["train_loss"] == pytest.approx(before["train_loss"], rel=1e-6)
    a = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 14.5: a diverged run fails ----

def test_diverged_run_fails_without_saving_an_adapter(task, tmp_path):
    out = tmp_path / "run"
    logs = _Logs()
    with pytest.raises(DivergedError, match=r"diverged.*max_nonfinite_steps=3.*learning_rate"):
        train(_cfg(task, out, "train.learning_rate=1e30", "train.max_steps=40", "train.save_steps=1000",
                   "train.max_nonfinite_steps=3", "train.warmup_steps=0"), log=lambda *_: None, callbacks=[logs])
    assert not (out / "adapter").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "diverged" in run["error"]
    losses = [h["loss"] for h in logs.history if "loss" in h]
    assert losses and all(x > 0 for x in losses)  # a skipped micro-batch is never logged as a loss of 0
    assert any("skipped_nonfinite_in_interval" in h and "loss" not in h for h in logs.history)


class PoisonWeights(TrainerCallback):
    """After optimizer step `step`, a trained weight holds NaN (the last line of defence must catch it)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_nonfinite_weights_are_never_saved(task, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match="hold NaN/inf"):
        train(_cfg(task, out, "train.max_steps=2", "train.save_steps=1000"), callbacks=[PoisonWeights(2)], **QUIET)
    assert not (out / "adapter").exists()


class NanMicroBatch(TrainerCallback):
    """The loss of training forward number `at` (1-based, over the run) becomes NaN, through the graph (so its
    gradients are NaN too); the trainable weights are kept after every optimizer step."""

    def __init__(self, at, reads):
        self.at, self.forwards, self.weights, self.adam_steps = at, 0, {}, None
        self.reads, self.reads_in_training = reads, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.weights[0] = self.trainable()

        def poison(module, inputs, output):
            if module.training:
                self.forwards += 1
                if self.forwards == self.at:
                    output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(poison)

    def trainable(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = self.trainable()

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.adam_steps = {int(st["step"]) for st in optimizer.state.values()}
        self.reads_in_training = len(self.reads)  # before the final weight check, which reads every tensor


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def flag_reads(monkeypatch):
    """Device -> host reads the kit's trainers make as `bool(tensor)` (how a guard reads a flag on the host)."""
    reads, real = [], torch.Tensor.__bool__

    def counting(self):
        if sys._getframe(1).f_code.co_filename.endswith(("finetune/trainer.py", "finetune/dpo.py")):
            reads.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    return reads


GA4 = ("train.per_device_train_batch_size=1", "train.gradient_accumulation_steps=4", "train.warmup_steps=0",
       "train.save_steps=1000", "train.max_steps=3")


def test_nan_in_micro_batch_2_of_4_stops_before_the_optimizer_applies_it(task, tmp_path, flag_reads):
    out, probe = tmp_path / "run", NanMicroBatch(4 + 2, flag_reads)  # step 2, micro-batch 2 of 4
    with pytest.raises(DivergedError, match=r"diverged at step 2: 1 optimizer step.*max_nonfinite_steps=0"):
        train(_cfg(task, out, *GA4, "train.max_nonfinite_steps=0"), callbacks=[probe], **QUIET)
    assert probe.forwards == 8 and len(flag_reads) == 2  # 8 micro-batches, one host read per optimizer step
    assert not _same(probe.weights[0], probe.weights[1])  # step 1 trained
    assert _same(probe.trainable(), probe.weights[1])  # step 2 was never applied
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "diverged at step 2" in run["error"]


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(task, tmp_path, flag_reads):
    out, probe, logs = tmp_path / "run", NanMicroBatch(4 + 2, flag_reads), _Logs()
    train(_cfg(task, out, *GA4), callbacks=[probe, logs], **QUIET)  # default: skip and count
    assert probe.reads_in_training == 3  # 12 micro-batches, 3 optimizer steps
    assert _same(probe.weights[2], probe.weights[1]) and not _same(probe.weights[3], probe.weights[2])
    assert probe.adam_steps == {2}  # the skipped step never reached the optimizer (moments untouched)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["skipped_nonfinite"] == 1 and math.isfinite(run["train_loss"])
    lines = [h for h in logs.history if "skipped_nonfinite" in h]  # one per step (logging_steps=1)
    assert [h.get("skipped_nonfinite_in_interval", 0) for h in lines] == [0, 1, 0]
    assert all(math.isfinite(h["loss"]) for h in lines)  # the step's finite micro-batches still make its loss


def test_a_bad_step_names_its_rows(task, tmp_path, flag_reads):
    """A skipped step is reported with the micro-batch whose loss was non-finite and the dataset row it held;
    the extra host read happens on the bad step only (the per-step count stays one read per step)."""
    out, probe, lines = tmp_path / "run", NanMicroBatch(4 + 2, flag_reads), []
    train(_cfg(task, out, *GA4), callbacks=[probe], log=lines.append)
    assert probe.reads_in_training == 3
    (warning,) = [line for line in lines if "skipped, not applied" in line]
    m = re.search(r"step 2 skipped.*non-finite loss in micro-batch 2 of 4; rows: (\S+)\)$", warning)
    assert m, warning
    ids = {json.loads(line).get("id") for line in open(task[1], encoding="utf-8")}
    assert m.group(1) in ids  # a real row id of the training file, one row (batch size 1)


def test_log_reports_finite_mean_only():
    from finetune.trainer import GuardedTrainer

    trainer = GuardedTrainer.__new__(GuardedTrainer)
    trainer._int_sum, trainer._int_tokens, trainer._int_skipped = torch.tensor(12.0), torch.tensor(4), 3
    trainer.run_loss_sum, trainer.run_loss_tokens, trainer.skipped = 0.0, 0, 3
    trainer.tokens_seen, trainer._log_t, trainer.eval_seconds, trainer._tok_rate = 0, None, 0.0, None
    seen = {}

    def record(self, logs, *a, **k):
        seen.update(logs)

    orig = GuardedTrainer.__mro__[1].log
    try:
        GuardedTrainer.__mro__[1].log = record
        trainer.log({"loss": 0.1234, "learning_rate": 1e-3})
    finally:
        GuardedTrainer.__mro__[1].log = orig
    assert seen["loss"] == 3.0 and seen["skipped_nonfinite_in_interval"] == 3
    assert trainer.run_train_loss() == 3.0


# ---- 14.6: an error during training keeps a resumable checkpoint; --skip-invalid skips bad images ----

class _BreakImages(TrainerCallback):
    """After step 1, every training image but one becomes undecodable (as if the disk went bad mid-run)."""

    def __init__(self, folder, keep=1):
        self.folder, self.keep = folder, keep
        self.saved = {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and not self.saved:
            for p in sorted(self.folder.glob("train_*.png"))[self.keep:]:
                self.saved[p] = p.read_bytes()
                p.write_bytes(b"not an image")

    def restore(self):
        for p, data in self.saved.items():
            p.write_bytes(data)


@pytest.fixture()
def own_task(tmp_path):
    train_path, _ = write_task(tmp_path / "data", n_train=24, n_eval=2, seed=3)
    return train_path


def test_error_during_training_saves_a_resumable_checkpoint(task, own_task, tmp_path):
    out = tmp_path / "run"
    breaker = _BreakImages(own_task.parent / "images", keep=0)
    with pytest.raises(ValueError, match="cannot decode image"):
        train(_cfg(task, out, "train.save_steps=1000", train_path=own_task), log=lambda *_: None,
              callbacks=[breaker])
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    breaker.restore()
    train(_cfg(task, out, "train.save_steps=1000", "train.resume=auto", train_path=own_task), **QUIET)
    assert json.loads((out / "run.json").read_text())["global_step"] == 4


def test_skip_invalid_skips_and_counts_undecodable_images_at_run_time(task, own_task, tmp_path):
    out = tmp_path / "run"
    breaker = _BreakImages(own_task.parent / "images", keep=1)
    # two DataLoader workers (the count is shared with them); 10 steps reach the second epoch's fresh reads
    train(_cfg(task, out, "data.skip_invalid=true", "data.num_workers=2", "train.max_steps=10", train_path=own_task),
          log=lambda *_: None, callbacks=[breaker])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["global_step"] == 10 and run["skipped_images"] > 0


def _corrupt_row_image(train_path, index):
    """Make the image of row `index` undecodable; returns the row's `file:line` as messages name it."""
    (train_path.parent / "images" / f"train_{index:04d}.png").write_bytes(b"not an image")
    return f"{train_path}:{index + 1}: row train-{index}"


def test_streaming_skip_invalid_skips_counts_and_names_undecodable_images(task, own_task, tmp_path, capfd):
    """Streaming has no validation pass: with --skip-invalid a broken image skips its row, counted and named
    once with file:line, and the run trains on (two DataLoader workers share the count)."""
    out, where = tmp_path / "run", _corrupt_row_image(own_task, 5)
    logs = []
    train(_cfg(task, out, "data.streaming=true", "data.skip_invalid=true", "data.num_workers=2",
               train_path=own_task), log=logs.append)  # 4 steps x 4 rows: one pass over the 24 rows
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["global_step"] == 4 and run["skipped_images"] == 1
    assert capfd.readouterr().err.count(f"{where}: cannot decode image") == 1
    assert "rows skipped for undecodable images: 1" in logs[-1]


def test_streaming_without_skip_invalid_stops_at_an_undecodable_image_with_a_checkpoint(task, own_task, tmp_path):
    out, where = tmp_path / "run", _corrupt_row_image(own_task, 13)  # row 13: in step 4's micro-batch
    with pytest.raises(ValueError, match=re.escape(where) + r": cannot decode image .*--skip-invalid"):
        train(_cfg(task, out, "data.streaming=true", "train.max_steps=6", train_path=own_task), **QUIET)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    saved, _ = newest_complete_checkpoint(out)
    assert saved is not None and int(saved.name.split("-")[1]) >= 2  # what trained before the row is kept


# ---- 9.1: QLoRA trains after an evaluation ----

def test_qlora_trains_after_evaluation_exactly_as_without_it(task, tmp_path):
    b, t, e = task
    common = ("quant.mode=nf4", "quant.bnb_4bit_compute_dtype=float32", "lora.lora_dropout=0.0",
              "train.max_steps=4", "train.save_steps=1000", "eval.generation_rows=0", "lora.modules_to_save=[]")
    with_eval = train(_cfg(task, tmp_path / "e", *common, f"data.eval_path={e}", "eval.eval_steps=2"), **QUIET)
    plain = train(_cfg(task, tmp_path / "p", *common), **QUIET)
    a, c = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (with_eval, plain))
    assert a.keys() == c.keys()
    for k in a:  # evaluation must neither break training nor change what it computes
        assert torch.allclose(a[k], c[k], atol=1e-6), k


def test_4bit_layers_stay_on_the_training_kernel_after_eval(task):
    from finetune.config import ModelSection, QuantSection
    from finetune.loading import load_weights
    from finetune.trainer import keep_4bit_layers_trainable

    model = load_weights(ModelSection(checkpoint_dir=str(task[0]), dtype="float32"),
                         QuantSection(mode="nf4", bnb_4bit_compute_dtype="float32"))
    n = keep_4bit_layers_trainable(model)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([[1, 5, 6, 7]])
        model(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert n == len(layers) or n == 0  # 0 on CPUs without AVX512-BF16, where bitsandbytes never repacks


# ---- 9.9 / 9.10 / 9.11 / 9.12: what the console says ----

def test_short_runs_warn_with_the_knob_to_turn(task, tmp_path):
    cfg = load_recipe(RECIPE.parent / "cogvlm2-qlora-24gb.yaml", ["model.checkpoint_dir=x", "data.train_path=y"])
    lines = step_warnings(cfg, rows=40)
    assert "only 6 optimizer steps" in lines[0] and "gradient_accumulation_steps (now 16)" in lines[0]
    assert "train.logging_steps=" in lines[1]
    long = load_recipe(RECIPE.parent / "cogvlm2-qlora-24gb.yaml", ["model.checkpoint_dir=x", "data.train_path=y"])
    assert step_warnings(long, rows=4000) == []


def test_console_is_a_short_summary_and_the_details_go_to_the_run_folder(task, tmp_path, recwarn):
    lines = []
    out = train(_cfg(task, tmp_path / "run", "train.max_steps=2", "quant.mode=nf4",
                     "quant.bnb_4bit_compute_dtype=float32", "train.optim=paged_adamw_8bit",
                     "train.gradient_checkpointing=true"), log=lines.append)
    text = "\n".join(map(str, lines))
    first_loss = next(i for i, x in enumerate(lines) if "loss" in str(x) and "progress" in str(x))
    assert first_loss < 12, text
    assert "---- recipe" not in text and "memory plan (estimate):" in text
    assert "paged_adamw_8bit runs as adamw_8bit on CPU" in text
    plan = (out / "plan.txt").read_text()
    assert "CUDA context" not in plan and "weights: rest (float32)" in plan and "CPU RAM" in plan
    assert "LoRA targets" in plan
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "checkpointing" in m and "deprecated" in m], messages
    assert not [m for m in messages if "Paged optimizers" in m], messages
    # 9.11: the trainable count is over real parameters (4-bit storage holds two per element), as `targets` says
    from finetune.loading import build_meta_model
    from finetune.targets import parameter_table, resolve_targets

    meta = build_meta_model(task[0])
    cfg = _cfg(task, tmp_path / "x")
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    table = parameter_table(meta, [n for h in matches.values() for n in h], cfg.lora.r)
    summary = table.splitlines()[-1].removeprefix("trainable: ")
    assert f"trainable {summary}" in text
    assert table.splitlines()[-1] in plan  # the table of the quantized model agrees too


def test_progress_line_with_eta_and_throughput_in_tensorboard(task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = []
    out = train(_cfg(task, tmp_path / "run", "train.report_to=[tensorboard]"), log=lines.append)
    progress = [str(x) for x in lines if str(x).startswith("progress: step")]
    assert progress and "ETA" in progress[-1] and "step 4/4" in progress[-1]
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/tokens_per_s" in tags and any(t.startswith("train/peak_") for t in tags), tags


def test_tokens_per_s_is_smoothed():
    from finetune.trainer import GuardedTrainer

    trainer = GuardedTrainer.__new__(GuardedTrainer)
    trainer._log_t, trainer._log_tokens, trainer._tok_rate, trainer.eval_seconds = None, 0, None, 0.0
    trainer.skipped_images = None
    rates, t = [], 100.0
    for seen, dt in ((100, 1), (200, 1), (1000, 0.1), (1100, 1)):
        t += dt
        trainer.tokens_seen = seen
        logs = {}
        import finetune.trainer as tu

        real = tu.time.time
        tu.time.time = lambda t=t: t
        try:
            trainer._add_throughput(logs)
        finally:
            tu.time.time = real
        rates.append(logs.get("tokens_per_s"))
    # raw rates 100, 8000, 100; the smoothed line moves by 40% of each jump
    assert rates[0] is None and rates[1] == 100.0 and rates[2] == pytest.approx(3260.0) and rates[3] < 3260


# ---- 9.8: files respect the umask ----

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_write_atomic_respects_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_run_info_round_trip_keeps_unknown_keys_and_refuses_newer_formats(tmp_path):
    from finetune.run_folder import RUN_JSON_FORMAT, RunInfo, read_json

    info = RunInfo(resumed_from="x/checkpoint-3", method="dpo", extra={"beta": 0.1})
    info.fail(ValueError("boom"))
    info.write(tmp_path)
    raw = json.loads((tmp_path / "run.json").read_text())
    assert raw["status"] == "failed" and raw["error"] == "ValueError: boom" and raw["beta"] == 0.1
    raw["added_by_a_later_minor_release"] = [1, 2]
    (tmp_path / "run.json").write_text(json.dumps(raw))
    back = RunInfo.read(tmp_path)
    assert back.method == "dpo" and back.extra == {"beta": 0.1, "added_by_a_later_minor_release": [1, 2]}
    assert back.to_dict() == raw
    raw["format"] = RUN_JSON_FORMAT + 1
    (tmp_path / "run.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="newer cogtune"):
        read_json(tmp_path / "run.json")
