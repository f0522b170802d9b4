"""Preference tuning (DPO and TRL's other offline preference losses) on the kit's CogVLM model, through TRL.

TRL's `DPOTrainer` does the preference work: the loss variants (`loss_type`), the reference
log-probabilities (precomputed or on the fly), the reference as the base / starting adapter through
peft (never a second full model in memory), the curves (rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected), checkpointing and resume (it is a
transformers `Trainer`). This module only adapts the inputs; two pieces of TRL are replaced, and why:

* **Encoding.** TRL tokenizes `prompt + chosen` / `prompt + rejected` with a chat template, or, for
  vision data, through a `ProcessorMixin` whose images become `pixel_values`. A Cog sequence is
  neither: it is BOS, a span of `image_tokens` placeholders typed VISION in `token_type_ids`, then the
  prompt in the official template, then the answer + EOS, and positions follow the token types. So each
  pair is encoded here with the kit's own processor (`CogVLMProcessor.encode`, the same one SFT and inference use;
  `last_turn_only=True`, so only the final answer is scored), and `CogDPOTrainer._prepare_dataset`
  returns the already-encoded dataset unchanged.
* **Collation.** `PreferenceCollator` yields exactly the columns TRL's `DataCollatorForPreference`
  yields (`input_ids`, `attention_mask`, `completion_mask`, chosen rows first then rejected, plus
  `ref_chosen_logps` / `ref_rejected_logps` when precomputed) and the Cog extras `token_type_ids` and
  `images`, which TRL passes through to the model untouched. `completion_mask` is the kit's label mask
  (answer tokens + EOS). The extras are the model's declared inputs (`model_input_names`) less those it derives
  itself (no `position_ids`: the model derives them from the token types).

Everything else is TRL's own code path: its fused LM head (`add_fused_lm_head`) calls the kit's
backbone (`model.model`, the `base_model_prefix`) with these inputs and projects only the completion
positions through `lm_head`, so the kit's labelled-only logits saving carries over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from data_formats.schema import Conversation, Message

from .models.cogvlm.processing import IGNORE_INDEX, CogVLMCollator, CogVLMProcessor

if TYPE_CHECKING:
    from data_formats.preference import PreferencePair

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


def pair_conversations(pair: PreferencePair) -> tuple[Conversation, Conversation]:
    """(prompt + chosen, prompt + rejected) as two ordinary conversations."""
    p = pair.prompt
    turns = [Message(m.role, m.content) for m in p.messages]
    chosen = Conversation(p.id, list(p.images), turns + [Message("assistant", pair.chosen)], p.source)
    rejected = Conversation(p.id, list(p.images), [Message(m.role, m.content) for m in p.messages]
                            + [Message("assistant", pair.rejected)], p.source)
    return chosen, rejected


def encode_pair(pair: PreferencePair, processor: CogVLMProcessor) -> dict[str, Any]:
    """One pair -> a dataset row: chosen_/rejected_ input_ids, token_type_ids, labels, and the image refs.

    Both sides are encoded by the processor with `last_turn_only=True` (whatever it was built with): the
    labels (and so TRL's completion mask) cover the final answer and its EOS only. A side that does not fit
    raises `RowTooLong`.
    """
    row: dict[str, Any] = {"id": pair.id}
    if not processor.last_turn_only:
        processor = processor.with_settings(last_turn_only=True)
    for side, conv in zip(("chosen", "rejected"), pair_conversations(pair)):
        e = processor.encode(conv)
        row[f"{side}_input_ids"], row[f"{side}_token_type_ids"], row[f"{side}_labels"] = \
            e.input_ids, e.token_type_ids, e.labels
        row["image_refs"] = [str(r) for r in e.images]
    return row


def encode_pairs(pairs: Sequence[PreferencePair], processor: CogVLMProcessor) -> list[dict[str, Any]]:
    """`encode_pair` for every pair (kept in order)."""
    return [encode_pair(p, processor) for p in pairs]


@dataclass
class PreferenceCollator:
    """Rows of `encode_pair` -> TRL's preference batch (chosen rows, then rejected rows) + Cog extras.

    Padding, token types and image loading are the kit's `CogVLMCollator`'s (right padding).
    """

    processor: CogVLMProcessor

    def __post_init__(self) -> None:
        from .generation import generation_input_names

        self._cog = CogVLMCollator(self.processor)
        self._extras = generation_input_names(self.processor.model_input_names)

    def _side(self, rows: Sequence[dict[str, Any]], side: str) -> list[dict[str, Any]]:
        return [{"input_ids": r[f"{side}_input_ids"], "token_type_ids": r[f"{side}_token_type_ids"],
                 "labels": r[f"{side}_labels"], "images": list(r["image_refs"])} for r in rows]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._cog(self._side(rows, "chosen") + self._side(rows, "rejected"))  # (2B, L)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
        }
        for name in self._extras:  # token_type_ids, images, ...: TRL passes them to the model untouched
            if name not in out and batch[name] is not None:
                out[name] = batch[name]
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                out[key] = torch.tensor([float(r[key]) for r in rows])
        return out


class CogDPOTrainer(_DPOTrainer):  # type: ignore[misc, valid-type]
    """TRL's DPOTrainer, fed rows the kit already encoded (see the module docstring for why).

    Give it `data_collator=PreferenceCollator(...)`, a `datasets.Dataset` of `encode_pair` rows and a
    `DPOConfig` with `remove_unused_columns=False` (TRL would otherwise keep only its own column names).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Already tokenized with Cog image spans and token types by `encode_pair`; TRL's tokenization
        # (chat template, no VISION span) must not run on it.
        return dataset


@torch.no_grad()
def sequence_logps(model: torch.nn.Module, collator: PreferenceCollator, rows: Sequence[dict[str, Any]],
                   batch_size: int = 8, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers, computed from full logits.

    Independent of TRL's fused head on purpose: tests and the proof check TRL's numbers against it.
    `reference=True` disables the peft adapter(s) (the base model).
    """
    import contextlib

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    ctx = model.disable_adapter() if reference and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with ctx:
            for i in range(0, len(rows), batch_size):
                batch = collator(rows[i:i + batch_size])
                mask = batch.pop("completion_mask")
                for key in ("ref_chosen_logps", "ref_rejected_logps"):
                    batch.pop(key, None)
                device = next(model.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**batch, use_cache=False, loss_only=False).logits.float()  # (2B, L, V)
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                tok = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]  # (2B, L-1)
                summed = (tok * mask[:, 1:].to(tok.device)).sum(dim=1).cpu()
                c, r = summed.chunk(2)
                chosen.append(c)
                rejected.append(r)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(model: torch.nn.Module, collator: PreferenceCollator, rows: Sequence[dict[str, Any]],
                        batch_size: int = 8) -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one."""
    c, r = sequence_logps(model, collator, rows, batch_size)
    return float((c > r).float().mean())


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The DPO loss (Rafailov et al. 2023, eq. 7) per pair, written out: -log σ(β((πc - rc) - (πr - rr)))."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin)


# ---------------------------------------------------------------------------------------------
# A recipe run (`train.method: dpo`), called by finetune.recipe.train
# ---------------------------------------------------------------------------------------------


def read_pairs_or_fail(path: str, cfg: Any, log=print) -> list:
    """Preference rows through `data_formats.preference` validation: every problem listed, or skipped rows
    counted with `data.skip_invalid`. Raises ValueError (no traceback for the user) otherwise."""
    from data_formats.preference import read_pairs

    pairs, problems = read_pairs(path, cfg.data.image_root, max_images=None if cfg.data.allow_multi_image else 1,
                                 check_images=True, allow_outside_images=cfg.data.allow_outside_images)
    errors = [p for p in problems if p.level == "error"]
    for w in (p for p in problems if p.level == "warning"):
        log(str(w))
    if errors and not cfg.data.skip_invalid:
        rows = len({e.source for e in errors})
        raise ValueError(f"{path}: {rows} preference row(s) have problems (fix them, or set data.skip_invalid: "
                         "true to skip them):\n" + "\n".join(f"  {e}" for e in errors))
    if errors:
        log(f"{path}: skipped {len({e.source for e in errors})} invalid preference row(s)")
    if not pairs:
        raise ValueError(f"{path}: no usable preference rows")
    return pairs


def _encode_or_skip(pairs: list, processor: CogVLMProcessor, cfg: Any, log=print) -> list[dict]:
    from .models.cogvlm.processing import RowTooLong

    rows, too_long = [], []
    for p in pairs:
        try:
            rows.append(encode_pair(p, processor))
        except RowTooLong as err:
            too_long.append(str(err))
    if too_long:
        log(f"skipped {len(too_long)} pair(s) longer than data.max_length={cfg.data.max_length}, e.g. {too_long[0]}")
    if not rows:
        raise ValueError("no preference rows left after encoding; raise data.max_length")
    return rows


def train_dpo(cfg: Any, out: Any, resume: Any, run_info: Any, is_main: bool, log=print,
              callbacks: list | None = None) -> Any:
    """Preference-tune an adapter with TRL's DPOTrainer; same run folder, resume, adapter and run.json as SFT.

    Reference model: with `dpo.start_adapter` the starting adapter (TRL copies the adapter's weights, a few
    MB, into a frozen "ref" adapter); without it a new zero-initialised adapter, whose frozen copy equals the
    base. Either way there is one base model in memory.
    """
    import json
    import time

    from datasets import Dataset
    from trl import DPOConfig

    from finetune.lora import apply_lora

    from .data_building import processor_for_recipe
    from .fileio import write_atomic
    from .loading import load_config_and_tokenizer, load_weights
    from .plots import plot_curves
    from .trainer import keep_4bit_layers_trainable

    on_gpu = torch.cuda.is_available()
    config, tokenizer = load_config_and_tokenizer(cfg.model)
    processor = processor_for_recipe(cfg, config, tokenizer).with_settings(last_turn_only=True)
    template = processor.template_version
    train_rows = _encode_or_skip(read_pairs_or_fail(cfg.data.train_path, cfg, log), processor, cfg, log)
    eval_rows = (_encode_or_skip(read_pairs_or_fail(cfg.data.eval_path, cfg, log), processor, cfg, log)
                 if cfg.data.eval_path else None)
    log(f"dpo: {len(train_rows)} training pairs" + (f", {len(eval_rows)} held-out pairs" if eval_rows else ""))

    model = load_weights(cfg.model, cfg.quant)
    keep_4bit_layers_trainable(model)  # QLoRA: see finetune/trainer.py (eval must not repack 4-bit weights)
    if cfg.dpo.start_adapter:
        from peft import PeftModel, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(model, cfg.dpo.start_adapter, is_trainable=True)
        log(f"dpo: continuing adapter {cfg.dpo.start_adapter} (it is also the reference)")
    else:
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing,
                           log=lambda *_: None)
    collator = PreferenceCollator(processor)
    before = preference_accuracy(model, collator, eval_rows) if eval_rows else None
    if before is not None:
        log(f"held-out preference accuracy before: {before:.3f}")

    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    optim = cfg.train.optim
    if not on_gpu and optim.startswith("paged_"):
        optim = optim.removeprefix("paged_")
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
        save_steps=cfg.train.save_steps, save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if eval_rows and cfg.eval.eval_steps else "no", eval_steps=cfg.eval.eval_steps or None,
        report_to=[r for r in cfg.train.report_to if r != "none"] or "none",
        remove_unused_columns=False,  # TRL would keep only its own column names; ours are the Cog encoding
        dataloader_num_workers=cfg.data.num_workers, disable_tqdm=True,
        beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss_type], label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        max_length=None,  # rows are already cut to data.max_length by the kit's encoding (whole turns only)
    )
    trainer = CogDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                            data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw metric dicts on the console; the curves go to log_history.json
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.time() - t0
    after = preference_accuracy(model, collator, eval_rows) if eval_rows else None
    if after is not None:
        log(f"held-out preference accuracy after: {after:.3f} (before {before:.3f})")
    if is_main:
        # Only the trained adapter: TRL's frozen "ref" copy is not part of the result.
        model.save_pretrained(str(out / "adapter"), selected_adapters=["default"])
        processor.save_pretrained(out / "adapter")  # tokenizer + processor_config.json
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        run_info.finish(cfg, config, template, global_step=trainer.state.global_step,
                        train_loss=losses[-1] if losses else None, wall_seconds=round(wall, 2),
                        start_adapter=cfg.dpo.start_adapter, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss_type,
                        preference_accuracy_before=before, preference_accuracy_after=after)
        run_info.write(out)
        write_atomic(out / "log_history.json", json.dumps(trainer.state.log_history, indent=1))
        plot_curves(trainer.state.log_history, out / "curves.png")
        log(f"saved adapter to {out / 'adapter'} ({trainer.state.global_step} steps, {wall:.1f}s)")
    return out


__all__ = ["CogDPOTrainer", "PreferenceCollator", "dpo_sigmoid_loss", "encode_pair", "encode_pairs",
           "pair_conversations", "preference_accuracy", "sequence_logps", "train_dpo"]
