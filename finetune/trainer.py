"""The Trainer the recipe configures: token-weighted loss with a non-finite guard, and the helpers it needs.

One subclass of transformers' Trainer (GuardedTrainer) overrides only what the library cannot be configured to
do: stop a diverged run without saving it, and count the loss over labelled tokens only.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On a CPU with AVX512-BF16, a Linear4bit called in eval mode without grad rewrites its weight into a
    CPU-only packed layout, permanently; training after that runs the inference kernel, which has no
    backward and adds the bias in place (`result += bias`: "a view of a leaf Variable that requires grad
    is being used in an in-place operation"). Returns how many layers were switched off.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled positions, number of labelled positions)."""
    logits = logits[:, :-1].float()  # (B, L-1, V)
    target = labels[:, 1:].to(logits.device)  # (B, L-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, (target != -100).sum()


def guard_nonfinite(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(loss, skipped): a NaN/inf loss becomes a zero loss disconnected from the activations.

    Multiplying the bad loss by zero would still send NaN into every gradient (0 * NaN = NaN); a zero
    built from the trainable parameters gives exact zero gradients instead.
    """
    if torch.isfinite(loss):
        return loss, False
    return sum(p.sum() * 0.0 for p in params), True


class DivergedError(ValueError):
    """Training diverged: too many non-finite optimizer steps in a row, or non-finite trained weights."""


def _read_flag(flag: torch.Tensor) -> bool:
    """The guard's device -> host read (a GPU sync): once per optimizer step (tests count the calls)."""
    return bool(flag)


class NonfiniteGuard(TrainerCallback):
    """The divergence guard SFT (`GuardedTrainer`) and DPO (`finetune.dpo.CogDPOTrainer`) share.

    Reading `isfinite(loss)` on the host for every micro-batch stalls a GPU once per micro-batch. Instead
    `observe` ORs each micro-batch's verdict into a flag that stays on the device, and once per optimizer step,
    just before the optimizer runs (after clipping), the flag and the gradients are read together, with one
    host read (reduced over ranks first, so that every rank decides alike). A bad step never reaches the
    optimizer: its gradients are dropped (an optimizer leaves a parameter without a gradient untouched:
    weights, moments and weight decay alike; under fp16 loss scaling they are set to NaN so that the scaler
    skips the step), and it is counted (`trainer.skipped`). More than `trainer.max_nonfinite_steps` bad steps
    in a row, or one with `trainer.skip_nonfinite` off, stop the run with a `DivergedError` (nothing saved).

    DeepSpeed applies the optimizer step inside the last micro-batch's backward, before that check can run;
    there each micro-batch is read on the host and a non-finite one contributes exact zero gradients
    (`guard_nonfinite`), as the kit did everywhere before.

    The trainer provides `skip_nonfinite`, `max_nonfinite_steps`, `skipped`, `_nonfinite_run`, `_int_skipped`,
    `loss_name`, `divergence_hint()` and `after_step_check(bad)`.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.flag: torch.Tensor | None = None  # device bool: a micro-batch of the pending step was non-finite
        # Per micro-batch of the pending step: (device bool finite, dataset row indices or None). Read on the host
        # only when the step turns out bad, to name its rows.
        self.micro_batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def _steps_inside_backward(self) -> bool:
        from accelerate.utils import DistributedType

        return self.trainer.accelerator.distributed_type == DistributedType.DEEPSPEED

    def observe(self, loss: torch.Tensor, model: torch.nn.Module,
                row_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, device bool: this micro-batch's loss is finite), without a host read.

        A non-finite loss is backpropagated as 0 (its step is dropped before the optimizer sees it anyway), so
        that the Trainer's own loss bookkeeping stays finite. `row_index`: the dataset rows of the micro-batch
        (`data_building.WithRowIndex`), kept to name them if the step is bad.
        """
        finite = torch.isfinite(loss.detach())
        self.flag = ~finite if self.flag is None else self.flag | ~finite
        self.micro_batches.append((finite, row_index))
        if self._steps_inside_backward():
            if _read_flag(finite):
                return loss, finite
            return guard_nonfinite(loss, [p for p in model.parameters() if p.requires_grad])[0], finite
        return torch.where(finite, loss, torch.zeros_like(loss)), finite

    def bad_rows(self) -> str:
        """Which rows a bad step held (host reads, on a bad step only): the micro-batches whose loss was
        non-finite, or every row of the step when only a gradient was. '' when the data has no row names."""
        name = getattr(self.trainer, "row_name", None)
        if name is None or not self.micro_batches:
            return ""
        flags = torch.stack([finite.reshape(()) for finite, _ in self.micro_batches]).tolist()  # one read
        batches = [(flags[k], [] if idx is None else idx.tolist()) for k, (_, idx) in enumerate(self.micro_batches)]
        if not any(rows for _, rows in batches):
            return ""
        culprits = [k for k, (finite, _) in enumerate(batches) if not finite]
        picked = culprits or range(len(batches))
        ids = [name(i) for k in picked for i in batches[k][1]]
        shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        where = (f"non-finite {self.trainer.loss_name} in micro-batch {', '.join(str(k + 1) for k in culprits)} of "
                 f"{len(batches)}" if culprits else "finite losses but a non-finite gradient")
        return f"{where}; rows: {shown}"

    def _step_is_bad(self) -> bool:
        trainer = self.trainer
        bad = self.flag if self.flag is not None else torch.zeros((), dtype=torch.bool)
        self.flag = None
        if not self._steps_inside_backward():
            grads = [p.grad for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            if grads:
                finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
                bad = bad.to(finite.device) | ~finite
        if trainer.accelerator.num_processes > 1:
            # on the accelerator's device: NCCL reduces only GPU tensors, and offloaded gradients live on the CPU
            bad = trainer.accelerator.reduce(bad.to(trainer.accelerator.device, torch.int32), reduction="sum") > 0
        return _read_flag(bad)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        bad = self._step_is_bad()
        trainer.after_step_check(bad)
        rows = self.bad_rows() if bad else ""
        self.micro_batches = []
        if not bad:
            trainer._nonfinite_run = 0
            return
        trainer.skipped += 1
        trainer._int_skipped += 1
        trainer._nonfinite_run += 1
        rows_note = f" ({rows})" if rows else ""
        if not trainer.skip_nonfinite or trainer._nonfinite_run > trainer.max_nonfinite_steps:
            why = (f"train.max_nonfinite_steps={trainer.max_nonfinite_steps}" if trainer.skip_nonfinite
                   else "train.skip_nonfinite=false")
            raise DivergedError(
                f"training diverged at step {state.global_step + 1}: {trainer._nonfinite_run} optimizer step(s) in a "
                f"row had a non-finite {trainer.loss_name} or gradient ({why}){rows_note}; the optimizer did not "
                f"apply it and no adapter was saved. {trainer.divergence_hint()}")
        warn = getattr(trainer, "warn", None)
        if warn is not None and state.is_world_process_zero:
            warn(f"warning: step {state.global_step + 1} skipped, not applied: non-finite {trainer.loss_name} or "
                 f"gradient{rows_note}")
        if self._steps_inside_backward():
            return  # DeepSpeed has stepped already, on the finite micro-batches only
        nan_for_scaler = getattr(trainer.accelerator, "scaler", None) is not None
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if nan_for_scaler:
                        p.grad.fill_(float("nan"))
                    else:
                        p.grad = None


class GuardedTrainer(Trainer):
    """transformers' Trainer, changed in `compute_loss` (its documented extension point) and `log`.

    The model computes the loss itself (token-weighted through `num_items_in_batch`, lm_head on
    labelled positions only); this adds the non-finite guard (`NonfiniteGuard`, checked once per optimizer
    step): a step with a NaN/inf loss or gradient is not applied and is counted, and more than
    `max_nonfinite_steps` of them in a row stop the run (it diverged). The logged loss is the
    token-weighted mean over the finite micro-batches of the interval (a non-finite one is not a loss of 0),
    and the run's train loss covers every finite micro-batch since step 0, across resumes.
    """

    loss_name = "loss"

    skip_nonfinite: bool = True
    max_nonfinite_steps: int = 10
    skipped: int = 0
    skipped_images = None  # multiprocessing.Value set by the recipe when --skip-invalid guards image decoding
    tokens_seen: torch.Tensor | int = 0  # real (non-pad) tokens; attention_mask holds segment ids when packing
    _nonfinite_run: int = 0
    # token-weighted loss sums: (sum of per-token losses, labelled tokens) for the log interval and the whole run
    _int_sum: torch.Tensor | float = 0.0
    _int_tokens: torch.Tensor | int = 0
    _int_skipped: int = 0
    run_loss_sum: float = 0.0
    run_loss_tokens: int = 0
    _tok_rate: float | None = None
    _log_t: float | None = None
    _log_tokens: int = 0
    eval_seconds: float = 0.0  # time spent in EvalCallback, left out of tokens/s

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite_guard = NonfiniteGuard(self)
        self.add_callback(self.nonfinite_guard)

    def divergence_hint(self) -> str:
        return (f"Lower train.learning_rate (now {self.args.learning_rate:g}) or raise train.warmup_steps, and check "
                "the data with `cogtune validate`.")

    def after_step_check(self, bad: bool) -> None:
        """Called by the guard once per optimizer step, before a bad step is dropped (nothing to do for SFT)."""

    # Set by the recipe: the name of dataset row i (for the guard's report of a bad step) and a warning printer.
    row_name: Any = None
    warn: Any = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        row_index = inputs.pop("row_index", None)  # bookkeeping (data_building.WithRowIndex), not a model input
        if model.training:
            self.tokens_seen = self.tokens_seen + (inputs["attention_mask"] > 0).sum().detach()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training:  # device-side bookkeeping only: no host read per micro-batch
            raw = loss.detach().float()
            loss, finite = self.nonfinite_guard.observe(loss, model, row_index)
            labelled = (inputs["labels"][:, 1:] != -100).sum().detach()
            scale = num_items_in_batch / self.accelerator.num_processes if num_items_in_batch is not None \
                else labelled
            self._int_sum = self._int_sum + torch.where(finite, raw * scale, 0.0)
            self._int_tokens = self._int_tokens + torch.where(finite, labelled, 0)
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Train-loss lines get the finite-only loss, tokens/s (smoothed, eval time left out) and memory,
        before the callbacks (console, TensorBoard) see them."""
        if "loss" in logs and "train_loss" not in logs:
            from .distributed import sum_across_ranks  # every rank logs here: the interval's loss over all ranks

            self._int_sum, self._int_tokens = sum_across_ranks([float(self._int_sum), int(self._int_tokens)])
            tokens = int(self._int_tokens)
            if tokens:
                logs["loss"] = round(float(self._int_sum) / tokens, 4)
                self.run_loss_sum += float(self._int_sum)
                self.run_loss_tokens += tokens
            else:  # every micro-batch of the interval was skipped: nothing to report as a loss
                del logs["loss"]
            if self._int_skipped:
                logs["skipped_nonfinite_in_interval"] = self._int_skipped
            logs["skipped_nonfinite"] = self.skipped
            self._int_sum, self._int_tokens, self._int_skipped = 0.0, 0, 0
            self._add_throughput(logs)
        if "train_loss" in logs:
            logs["train_loss"] = self.run_train_loss()
        super().log(logs, *args, **kwargs)

    def run_train_loss(self) -> float:
        """Token-weighted mean loss over every finite micro-batch of the run (resumed parts included)."""
        total, tokens = self.run_loss_sum + float(self._int_sum), self.run_loss_tokens + int(self._int_tokens)
        return total / tokens if tokens else float("nan")

    def _add_throughput(self, logs: dict) -> None:
        now, seen = time.time(), int(self.tokens_seen)  # one host sync per log line
        logs["tokens_seen"] = seen
        if self._log_t is not None:
            busy = max(now - self._log_t - self.eval_seconds, 1e-9)
            rate = (seen - self._log_tokens) / busy
            # exponential moving average: one slow interval (data-loader start, a checkpoint) does not swing it
            self._tok_rate = rate if self._tok_rate is None else 0.6 * self._tok_rate + 0.4 * rate
            logs["tokens_per_s"] = round(self._tok_rate, 1)
        self._log_t, self._log_tokens, self.eval_seconds = now, seen, 0.0
        if torch.cuda.is_available():
            logs["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            import resource

            logs["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if self.skipped_images is not None:
            logs["skipped_images"] = self.skipped_images.value

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from .distributed import load_consolidated_adapter

        # an FSDP checkpoint resumed without FSDP (fewer GPUs): its consolidated adapter, not the shards
        if self.is_fsdp_enabled or not load_consolidated_adapter(model or self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ---- state that checkpoints carry beside the Trainer's own ----
    def run_state(self) -> dict:
        return {"loss_sum": self.run_loss_sum + float(self._int_sum),
                "loss_tokens": self.run_loss_tokens + int(self._int_tokens),
                "skipped_nonfinite": self.skipped, "tokens_seen": int(self.tokens_seen),
                "skipped_images": self.skipped_images.value if self.skipped_images is not None else 0}

    def restore_run_state(self, state: dict) -> None:
        self.run_loss_sum, self.run_loss_tokens = float(state.get("loss_sum", 0.0)), int(state.get("loss_tokens", 0))
        self.skipped, self.tokens_seen = int(state.get("skipped_nonfinite", 0)), int(state.get("tokens_seen", 0))
        if self.skipped_images is not None:
            self.skipped_images.value = int(state.get("skipped_images", 0))


def real_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: bitsandbytes packs two 4-bit weights per stored byte (Params4bit)."""
    if type(p).__name__ == "Params4bit" and getattr(p, "quant_state", None) is not None:
        return int(torch.Size(p.quant_state.shape).numel())  # the unpacked weight's shape
    return p.numel()


def nonfinite_parameters(model) -> list[str]:
    """Names of trainable parameters holding NaN/inf (a diverged run must not save them)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
