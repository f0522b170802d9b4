"""Preference tuning (DPO and TRL's other offline preference losses) on the kit's CogVLM model, through TRL.

TRL's `DPOTrainer` does the preference work: the loss variants (`loss_type`), the reference
log-probabilities (precomputed or on the fly), the reference as the base / starting adapter through
peft (never a second full model in memory), the curves (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected), checkpointing and resume (it is a
transformers `Trainer`). The kit adapts the inputs: two pieces of TRL are replaced (they live in
`finetune/dpo_data.py`, which does not import TRL), and why:

* **Encoding.** TRL tokenizes `prompt + chosen` / `prompt + rejected` with a chat template, or, for
  vision data, through a `ProcessorMixin` whose images become `pixel_values`. A Cog sequence is
  neither: it is BOS, a span of `image_tokens` placeholders typed VISION in `token_type_ids`, then the
  prompt in the official template, then the answer + EOS, and positions follow the token types. So each
  pair is encoded with the kit's own processor (`CogVLMProcessor.encode`, the same one SFT and inference use;
  `last_turn_only=True`, so only the final answer is scored), and `CogDPOTrainer._prepare_dataset`
  returns the already-encoded dataset unchanged.
* **Collation.** `PreferenceCollator` yields exactly the columns TRL's `DataCollatorForPreference`
  yields (`input_ids`, `attention_mask`, `completion_mask`, chosen rows first then rejected, plus
  `ref_chosen_logps` / `ref_rejected_logps` when precomputed) and the Cog extras `token_type_ids` and
  `images`, which TRL passes through to the model untouched. `completion_mask` is the kit's label mask
  (answer tokens + EOS). The extras are the model's declared inputs (`model_input_names`) less those it
  derives itself (no `position_ids`: the model derives them from the token types).

Everything else is TRL's own code path: its fused LM head (`add_fused_lm_head`) calls the kit's
backbone (`model.model`, the `base_model_prefix`) with these inputs and projects only the completion
positions through `lm_head`, so the kit's labelled-only logits saving carries over.

This module adds what an SFT run has around the trainer: the memory plan (`dpo_memory_plan`), the
non-finite guard (`CogDPOTrainer.compute_loss` / `log`), the progress line, checkpoint manifests and
resume, run.json, and the preference curves (`finetune.plots.plot_dpo_curves`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .dpo_data import (
    PreferenceCollator,
    dpo_sigmoid_loss,
    encode_pair,
    encode_pairs,
    pair_conversations,
    preference_accuracy,
    read_pairs_or_fail,
    sequence_logps,
)

try:  # trl is optional for SFT; importing this module without it gives a clear message at use
    from trl import DPOTrainer as _DPOTrainer
except ImportError:  # pragma: no cover - trl is in the dev environment
    _DPOTrainer = object


def _checkpointing_flag() -> str:
    """The TrainingArguments field for the Trainer's checkpointing switch: `activation_checkpointing` on
    transformers releases that renamed it, `gradient_checkpointing` before."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


class CogDPOTrainer(_DPOTrainer):  # type: ignore[misc, valid-type]
    """TRL's DPOTrainer, fed rows the kit already encoded (see the module docstring for why), with the SFT
    run's non-finite guard.

    Give it `data_collator=PreferenceCollator(...)`, a `datasets.Dataset` of `encode_pair` rows and a
    `DPOConfig` with `remove_unused_columns=False` (TRL would otherwise keep only its own column names).

    The guard is the SFT run's (`finetune.trainer.NonfiniteGuard`, checked once per optimizer step): a step
    with a NaN/inf loss or gradient is not applied and is counted, the metrics of its micro-batches are dropped
    from the curves, and more than `max_nonfinite_steps` such steps in a row stop the run (it diverged). The
    logged loss is the mean over the finite micro-batches of the interval.
    """

    loss_name = "DPO loss"
    skip_nonfinite: bool = True
    max_nonfinite_steps: int = 10
    skipped: int = 0
    _nonfinite_run: int = 0
    _int_skipped: int = 0
    _int_sum: torch.Tensor | float = 0.0
    _int_n: torch.Tensor | int = 0
    run_loss_sum: float = 0.0
    run_loss_n: int = 0
    _step_metrics: dict[str, int] | None = None  # lengths of TRL's metric lists when the pending step began

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from .trainer import NonfiniteGuard

        self.nonfinite_guard = NonfiniteGuard(self)
        self.add_callback(self.nonfinite_guard)

    def divergence_hint(self) -> str:
        return (f"Lower train.learning_rate (now {self.args.learning_rate:g}) or dpo.beta (now {self.args.beta:g}), "
                "and check the pairs with `cogtune validate`.")

    def after_step_check(self, bad: bool) -> None:
        """A step the guard drops leaves nothing in the curves: its micro-batches' metrics go too."""
        if bad and self._step_metrics is not None:
            for key, values in self._metrics["train"].items():
                del values[self._step_metrics.get(key, 0):]
        self._step_metrics = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already tokenized with Cog image spans and token types by `encode_pair`; TRL's tokenization
        # (chat template, no VISION span) must not run on it.
        return dataset

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self._step_metrics is None:  # the first micro-batch of an optimizer step
            self._step_metrics = {k: len(v) for k, v in self._metrics["train"].items()}
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        raw = loss.detach().float()
        loss, finite = self.nonfinite_guard.observe(loss, model)  # no host read per micro-batch
        self._int_sum = self._int_sum + torch.where(finite, raw, 0.0)
        self._int_n = self._int_n + finite.long()
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and "train_loss" not in logs:  # a training log line: the finite-only mean
            total, n = float(self._int_sum), int(self._int_n)  # the host reads of the interval
            if n:
                logs["loss"] = round(total / n, 4)
            else:  # every micro-batch of the interval was non-finite: nothing to report as a loss
                del logs["loss"]
            if self._int_skipped:
                logs["skipped_nonfinite_in_interval"] = self._int_skipped
            logs["skipped_nonfinite"] = self.skipped
            self.run_loss_sum += total
            self.run_loss_n += n
            self._int_sum, self._int_n, self._int_skipped = 0.0, 0, 0
            metrics = self._metrics["train"]
            for key in [k for k, v in metrics.items() if not v]:  # emptied by skipped micro-batches: no point
                del metrics[key]
        super().log(logs, start_time)

    def run_train_loss(self) -> float | None:
        """Mean DPO loss over every finite micro-batch of the run (resumed parts included)."""
        n = self.run_loss_n + int(self._int_n)
        return (self.run_loss_sum + float(self._int_sum)) / n if n else None

    # ---- state that checkpoints carry beside the Trainer's own (CheckpointCallback writes it) ----
    def run_state(self) -> dict:
        return {"loss_sum": self.run_loss_sum + float(self._int_sum), "loss_count": self.run_loss_n + int(self._int_n),
                "skipped_nonfinite": self.skipped}

    def restore_run_state(self, state: dict) -> None:
        self.run_loss_sum, self.run_loss_n = float(state.get("loss_sum", 0.0)), int(state.get("loss_count", 0))
        self.skipped = int(state.get("skipped_nonfinite", 0))

    def _save_checkpoint(self, model, trial):
        # TRL's version first writes a model card (README.md) into the run folder, which holds only what the kit
        # writes (output.overwrite may remove it later); the checkpoint itself is the Trainer's.
        from transformers import Trainer

        Trainer._save_checkpoint(self, model, trial)


def _encode_or_skip(pairs: list, processor: Any, cfg: Any, log=print) -> list[dict]:
    from .models.cogvlm.processing import RowTooLong

    rows, too_long = [], []
    for p in pairs:
        try:
            rows.append(encode_pair(p, processor))
        except RowTooLong as err:
            too_long.append(str(err))
    if too_long:
        log(f"skipped {len(too_long)} pair(s) longer than data.max_length={cfg.data.max_length}, e.g. {too_long[0]}")
    cut = sum(max(r["chosen_dropped_turns"], r["rejected_dropped_turns"]) > 0 for r in rows)
    if cut:
        log(f"note: {cut} pair(s) drop old turns to fit data.max_length={cfg.data.max_length} (chosen and rejected "
            "drop as many, so both answers follow the same prompt); `cogtune validate` counts them")
    if not rows:
        raise ValueError("no preference rows left after encoding; raise data.max_length")
    return rows


# ---------------------------------------------------------------------------------------------
# Memory plan of a DPO run
# ---------------------------------------------------------------------------------------------


def _adapter_numel(folder: str | Path) -> int:
    """Parameters stored in a peft adapter folder (read from the safetensors header, no weights loaded)."""
    import math

    from safetensors import safe_open

    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(key).get_shape()) for key in fh.keys())


def dpo_memory_plan(cfg: Any, on_gpu: bool) -> Any:
    """The SFT memory plan for a DPO step: the policy forward runs chosen and rejected rows together (2 sequences
    per pair), and the reference is the same model with the adapter disabled (no second copy): a no-grad forward
    whose one live layer sits beside the policy's saved activations, or nothing when precomputed. Continuing an
    SFT adapter adds TRL's frozen copy of it (the "ref" adapter)."""
    from dataclasses import replace

    from . import extra_params
    from .loading import build_meta_model, resolve_dtype
    from .memory import _BYTES, GIB, plan_memory
    from .targets import resolve_modules_to_save, resolve_targets, trainable_counts

    meta = build_meta_model(cfg.model.checkpoint_dir)
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    matched = [n for hit in matches.values() for n in hit]
    modules, bare = extra_params.split_modules_to_save(cfg.lora.modules_to_save)
    lora_n, full_n = trainable_counts(meta, matched, cfg.lora.r, resolve_modules_to_save(modules, meta) + bare)
    if cfg.dpo.start_adapter:  # the starting adapter is what trains, whatever lora.* says
        lora_n, full_n = _adapter_numel(cfg.dpo.start_adapter), 0
    dtype_name = str(resolve_dtype(cfg.model.dtype)).replace("torch.", "")
    in_features = sum(dict(meta.named_modules())[n].in_features for n in matched)
    b = cfg.train.per_device_train_batch_size
    pairs = replace(cfg, train=replace(cfg.train, per_device_train_batch_size=2 * b))
    plan = plan_memory(meta, pairs, lora_n, full_n, dtype_name, lora_in_features=in_features, on_gpu=on_gpu)
    plan.rows = [(name, gib, f"{basis}; {b} pair(s) = {2 * b} rows (chosen + rejected)"
                  if name.startswith(("activations: decoder", "loss logits")) else basis)
                 for name, gib, basis in plan.rows]
    c, act = meta.config, _BYTES.get(dtype_name, 2)
    if cfg.dpo.precompute_ref_log_probs:
        plan.rows.append(("reference forward", 0.0, "precomputed in one no-grad pass before training"))
    else:
        layer = 2 * b * cfg.data.max_length * (10 * c.hidden_size + 4 * c.intermediate_size) * act
        plan.rows.append(("reference forward (no grad)", layer / GIB, "adapter disabled on the same weights (no "
                          "second model): one layer live, beside the policy's saved activations"))
    if cfg.dpo.start_adapter:
        plan.rows.append(("reference adapter (frozen copy)", lora_n * 4 / GIB,
                          f"{lora_n / 1e6:.1f}M x 4 B: TRL's 'ref' copy of dpo.start_adapter"))
    return plan


# ---------------------------------------------------------------------------------------------
# A recipe run (`train.method: dpo`), called by finetune.recipe.train
# ---------------------------------------------------------------------------------------------


def train_dpo(cfg: Any, out: Any, resume: Any, run_info: Any, is_main: bool, log=print,
              callbacks: list | None = None) -> Any:
    """Preference-tune an adapter with TRL's DPOTrainer; the SFT run's folder, plan.txt, progress line,
    non-finite guard, checkpoints (manifest, resume), run.json, plus DPO's curves.

    Reference model: with `dpo.start_adapter` the starting adapter (TRL copies the adapter's weights, a few
    MB, into a frozen "ref" adapter); without it a new zero-initialised adapter, whose frozen copy equals the
    base. Either way there is one base model in memory.
    """
    import os
    import sys

    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig

    from .callbacks import CheckpointCallback, ProgressLineCallback
    from .data_building import processor_for_recipe
    from .fileio import write_atomic
    from .loading import load_config_and_tokenizer, load_weights
    from .lora import apply_lora
    from .plots import plot_dpo_curves
    from .recipe import run_training, step_warnings
    from .run_folder import RUN_STATE
    from .trainer import DivergedError, keep_4bit_layers_trainable, nonfinite_parameters

    on_gpu = torch.cuda.is_available()
    plan: list[str] = [f"# run plan for {out} (DPO)", ""]
    memory = dpo_memory_plan(cfg, on_gpu)  # meta device: shapes only, before any weight is loaded
    plan.append(str(memory))

    config, tokenizer = load_config_and_tokenizer(cfg.model)
    processor = processor_for_recipe(cfg, config, tokenizer).with_settings(last_turn_only=True)
    template = processor.template_version
    train_rows = _encode_or_skip(read_pairs_or_fail(cfg.data.train_path, cfg, log), processor, cfg, log)
    eval_rows = (_encode_or_skip(read_pairs_or_fail(cfg.data.eval_path, cfg, log), processor, cfg, log)
                 if cfg.data.eval_path else None)
    log(f"dpo: {len(train_rows)} training pairs" + (f", {len(eval_rows)} held-out pairs" if eval_rows else ""))
    for line in step_warnings(cfg, len(train_rows)):
        log(f"warning: {line}")

    model = load_weights(cfg.model, cfg.quant)
    keep_4bit_layers_trainable(model)  # QLoRA: see finetune/trainer.py (eval must not repack 4-bit weights)
    if cfg.dpo.start_adapter:
        from peft import PeftModel, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(model, cfg.dpo.start_adapter, is_trainable=True)
        log(f"dpo: continuing adapter {cfg.dpo.start_adapter} (it is also the reference)")
        plan.append(f"\nadapter: continuing {cfg.dpo.start_adapter} (its frozen copy is the reference)")
    else:
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing,
                           log=plan.append)
    if is_main:
        write_atomic(out / "plan.txt", "\n".join(plan) + "\n")
    log(f"memory plan (estimate): {memory.total_gib:.2f} GiB {'per GPU' if on_gpu else 'of CPU RAM'}; recipe, "
        f"plan and tables in {out / 'recipe.resolved.yaml'} and {out / 'plan.txt'}")
    collator = PreferenceCollator(processor)
    before = preference_accuracy(model, collator, eval_rows) if eval_rows else None
    if before is not None:
        log(f"held-out preference accuracy before: {before:.3f}")

    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    optim = cfg.train.optim
    if not on_gpu and optim.startswith("paged_"):
        optim = optim.removeprefix("paged_")
    tty = sys.stderr.isatty() or os.environ.get("COGTUNE_TQDM") == "1"
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.train.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        learning_rate=cfg.train.learning_rate, num_train_epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps, warmup_steps=cfg.train.warmup_steps,
        lr_scheduler_type=cfg.train.lr_scheduler_type, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, optim=optim, seed=cfg.train.seed,
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16, use_cpu=not on_gpu,
        # apply_lora already switched checkpointing on where asked (it must precede peft's k-bit wrapping); TRL
        # defaults the Trainer's switch to on, so it is set off under the name this transformers uses (5.24 renamed
        # it and warns on the old one).
        **{_checkpointing_flag(): False},
        logging_steps=cfg.train.logging_steps, logging_first_step=True, save_strategy="steps",
        logging_nan_inf_filter=False,  # its per-micro-batch NaN test reads the device; the kit's guard covers it
        save_steps=cfg.train.save_steps, save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if eval_rows and cfg.eval.eval_steps else "no", eval_steps=cfg.eval.eval_steps or None,
        report_to=[r for r in cfg.train.report_to if r != "none"] or "none",
        remove_unused_columns=False,  # TRL would keep only its own column names; ours are the Cog encoding
        dataloader_num_workers=cfg.data.num_workers, disable_tqdm=not tty,
        beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss_type], label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        max_length=None,  # rows are already cut to data.max_length by the kit's encoding (whole turns only)
    )
    progress = [] if tty or not is_main else [ProgressLineCallback(log=log)]
    trainer = CogDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                            data_collator=collator, processing_class=tokenizer,
                            callbacks=[*progress, *(callbacks or [])])
    trainer.skip_nonfinite = cfg.train.skip_nonfinite
    trainer.max_nonfinite_steps = cfg.train.max_nonfinite_steps
    if not tty:  # the one-line progress replaces transformers' raw dict printer
        trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CheckpointCallback(trainer))  # last: its manifest marks the checkpoint complete
    if resume and (Path(resume) / RUN_STATE).is_file():
        trainer.restore_run_state(json.loads((Path(resume) / RUN_STATE).read_text()))

    wall = run_training(trainer, cfg, resume, log)
    bad = nonfinite_parameters(model)
    if bad:
        raise DivergedError(f"training diverged: {len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]}); no adapter "
                            f"was saved. Lower train.learning_rate (now {cfg.train.learning_rate:g}).")
    after = preference_accuracy(model, collator, eval_rows) if eval_rows else None
    if after is not None:
        log(f"held-out preference accuracy after: {after:.3f} (before {before:.3f})")
    if is_main:
        # Only the trained adapter: TRL's frozen "ref" copy is not part of the result.
        model.save_pretrained(str(out / "adapter"), selected_adapters=["default"])
        processor.save_pretrained(out / "adapter")  # tokenizer + processor_config.json
        train_loss = trainer.run_train_loss()
        run_info.finish(cfg, config, template, global_step=trainer.state.global_step, train_loss=train_loss,
                        wall_seconds=round(wall, 2), skipped_nonfinite=trainer.skipped,
                        start_adapter=cfg.dpo.start_adapter, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                        preference_accuracy_before=before, preference_accuracy_after=after)
        run_info.write(out)
        write_atomic(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
        plot_dpo_curves(trainer.state.log_history, out / "curves.png", before, after)
        log(f"saved adapter to {out / 'adapter'} ({trainer.state.global_step} steps, {wall:.1f}s"
            + (f", final DPO loss {train_loss:.4f}" if train_loss is not None else "")
            + f", skipped non-finite steps: {trainer.skipped})")
    return out


__all__ = ["CogDPOTrainer", "PreferenceCollator", "dpo_memory_plan", "dpo_sigmoid_loss", "encode_pair",
           "encode_pairs", "pair_conversations", "preference_accuracy", "read_pairs_or_fail", "sequence_logps",
           "train_dpo"]
