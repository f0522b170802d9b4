"""Trainer callbacks of a run: extra parameters saved beside the adapter, checkpoint manifests, the one-line
progress, and evaluation during training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from .fileio import write_atomic
from .run_folder import RUN_STATE, write_manifest
from .trainer import GuardedTrainer


class ExtraParamsCallback(TrainerCallback):
    """Writes bare trained parameters (boi/eoi) into every checkpoint, beside peft's adapter files."""

    def __init__(self, model, names: list[str]) -> None:
        self.model, self.names = model, names

    def on_save(self, args, state, control, **kwargs):
        from .distributed import save_extra_params

        # every rank gathers (sharded weights), one rank writes
        save_extra_params(self.model, self.names, Path(args.output_dir) / f"checkpoint-{state.global_step}",
                          state.is_world_process_zero)


class CheckpointCallback(TrainerCallback):
    """After the Trainer (and ExtraParamsCallback) wrote a checkpoint: the run state, then the manifest.

    Add it after every other callback that writes into checkpoints: the manifest must come last.
    """

    def __init__(self, trainer: GuardedTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            write_atomic(folder / RUN_STATE, json.dumps(self.trainer.run_state()))
            write_manifest(folder)


class ProgressLineCallback(TrainerCallback):
    """One progress line with ETA every `every_s` seconds (and at each log) when stderr is not a terminal.

    tqdm's bar needs a terminal; piped through tee/nohup the run would otherwise be silent between logs.
    COGTUNE_TQDM=1 forces the bar instead.
    """

    def __init__(self, every_s: float = 30.0, log=print) -> None:
        self.every_s, self.log = every_s, log
        self._t0 = self._last = None
        self._step0 = 0
        self._loss = self._lr = None
        self._loss_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._last = time.time()
        self._step0 = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss, self._lr, self._loss_step = logs["loss"], logs.get("learning_rate"), state.global_step
            self._print(state, logs.get("tokens_per_s"))

    def on_step_end(self, args, state, control, **kwargs):
        if self._last is not None and time.time() - self._last >= self.every_s:
            self._print(state, None)

    def _print(self, state, tok_s) -> None:
        now = time.time()
        self._last = now
        done, total = state.global_step, max(state.max_steps, 1)
        rate = (now - self._t0) / max(done - self._step0, 1)
        eta = rate * max(total - done, 0)
        parts = [f"step {done}/{total} ({100 * done / total:.0f}%)", f"elapsed {_hms(now - self._t0)}",
                 f"ETA {_hms(eta)}"]
        if self._loss is not None:
            stale = f" (logged at step {self._loss_step})" if self._loss_step != done else ""
            parts.append(f"loss {self._loss:.4f}{stale}")
        if self._lr is not None:
            parts.append(f"lr {self._lr:.3g}")
        if tok_s is not None:
            parts.append(f"{tok_s:.0f} tok/s")
        self.log("progress: " + ", ".join(parts))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class EvalCallback(TrainerCallback):
    """Token-weighted eval loss and generation eval every `eval.eval_steps` and at the end of training."""

    def __init__(self, cfg, eval_examples, eval_convs, collator, out_dir, log=print) -> None:
        self.cfg, self.examples, self.convs, self.collator = cfg, eval_examples, eval_convs, collator
        self.out_dir, self.log = Path(out_dir), log
        self.trainer = None  # set by the recipe after the Trainer exists (to log through it)
        self._last_step = -1

    def _run(self, state, model) -> None:
        # Every rank evaluates its share (under FSDP/ZeRO-3 a forward needs all ranks); rank 0 gets the results.
        if not self.examples or state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        t0 = time.time()
        from .distributed import evaluate_on_every_rank

        loss, gen, samples = evaluate_on_every_rank(model, self.examples, self.collator, self.convs,
                                                    self.collator.processor, self.cfg.eval.max_new_tokens,
                                                    self.cfg.eval.generation_rows)
        if not state.is_world_process_zero:
            return
        metrics = {"eval_loss": round(loss, 5)}
        metrics.update({f"eval_{k}": v for k, v in gen.items()})
        self.log(f"eval @ step {state.global_step}: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
        for s in samples[: self.cfg.eval.log_predictions]:
            self.log(f"  [{s['id']}] pred={s['prediction']!r} ref={s['reference']!r}")
        if samples:
            import json

            write_atomic(self.out_dir / f"eval_predictions_step{state.global_step}.jsonl",
                         "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
            from finetune.report import write_eval_report

            write_eval_report(self.out_dir / f"eval_report_step{state.global_step}.html", self.convs, samples, metrics,
                              state.global_step)
        if self.trainer is not None:
            self.trainer.eval_seconds += time.time() - t0
            # Trainer.log clears control.should_log: this step's train-loss line (a collective under several
            # processes, taken by every rank) must still be logged
            should_log = self.trainer.control.should_log
            self.trainer.log(metrics)
            self.trainer.control.should_log = should_log

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.cfg.eval.eval_steps
        if every and state.global_step % every == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._run(state, model)
