"""Pieces the training recipe configures transformers' Trainer with: loss guard, callbacks, plots.

Kept out of `recipe.py` so the recipe reads top to bottom; none of this subclasses the Trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .fileio import write_atomic  # noqa: F401  (re-exported: the recipe, check and predict import it from here)


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
    """Training diverged: too many non-finite losses in a row, or non-finite trained weights."""


class GuardedTrainer(Trainer):
    """transformers' Trainer, changed in `compute_loss` (its documented extension point) and `log`.

    The model computes the loss itself (token-weighted through `num_items_in_batch`, lm_head on
    labelled positions only); this adds the non-finite guard: such micro-batches are skipped and counted,
    and `max_nonfinite_steps` of them in a row stop the run (it diverged). The logged loss is the
    token-weighted mean over the finite micro-batches of the interval (a skipped one is not a loss of 0),
    and the run's train loss covers every finite micro-batch since step 0, across resumes.
    """

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen = self.tokens_seen + (inputs["attention_mask"] > 0).sum().detach()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training:
            labelled = (inputs["labels"][:, 1:] != -100).sum().detach()
            finite = bool(torch.isfinite(loss))
            if finite:
                scale = num_items_in_batch / self.accelerator.num_processes if num_items_in_batch is not None \
                    else labelled
                self._int_sum = self._int_sum + loss.detach().float() * scale
                self._int_tokens = self._int_tokens + labelled
                self._nonfinite_run = 0
            else:
                self._int_skipped += 1
                self._nonfinite_run += 1
                if self._nonfinite_run > self.max_nonfinite_steps:
                    raise DivergedError(
                        f"training diverged at step {self.state.global_step}: {self._nonfinite_run} micro-batches in "
                        f"a row had a non-finite loss (train.max_nonfinite_steps={self.max_nonfinite_steps}); no "
                        f"adapter was saved. Lower train.learning_rate (now {self.args.learning_rate:g}) or raise "
                        "train.warmup_steps, and check the data with `cogtune validate`.")
            if self.skip_nonfinite and not finite:
                loss, _ = guard_nonfinite(loss, [p for p in model.parameters() if p.requires_grad])
                self.skipped += 1
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Train-loss lines get the finite-only loss, tokens/s (smoothed, eval time left out) and memory,
        before the callbacks (console, TensorBoard) see them."""
        if "loss" in logs and "train_loss" not in logs:
            from .distributed import sum_across_ranks  # every rank logs here: the interval's loss over all ranks

            self._int_sum, self._int_tokens = sum_across_ranks([float(self._int_sum), int(self._int_tokens)],
                                                               self.args.device if self.args.device.type == "cuda"
                                                               else None)
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


class ExtraParamsCallback(TrainerCallback):
    """Writes bare trained parameters (boi/eoi) into every checkpoint, beside peft's adapter files."""

    def __init__(self, model, names: list[str]) -> None:
        self.model, self.names = model, names

    def on_save(self, args, state, control, **kwargs):
        from .distributed import save_extra_params

        # every rank gathers (sharded weights), one rank writes
        save_extra_params(self.model, self.names, Path(args.output_dir) / f"checkpoint-{state.global_step}",
                          state.is_world_process_zero)


# ---- checkpoints: a manifest marks a complete one; resume verifies it ----

MANIFEST = "cogtune-manifest.json"
RUN_STATE = "cogtune-run-state.json"
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
                    "scheduler.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record every file of a finished checkpoint (size, sha256); written last, it marks the checkpoint complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
    return folder / MANIFEST


def checkpoint_problem(folder: str | Path, need_manifest: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (None when it can): incomplete, altered, or non-finite weights."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, meta in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
            if _sha256(path) != meta["sha256"]:
                return f"{name} differs from the checksum recorded when it was saved"
    elif need_manifest:
        return f"no {MANIFEST}: the save was interrupted (or the checkpoint predates it)"
    # FSDP checkpoints hold the optimizer state as a sharded folder (resumable on another number of GPUs)
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()
               and not (name == "optimizer.pt" and (folder / "optimizer_0").is_dir())]
    if missing:
        return f"{', '.join(missing)} missing (resuming would restart the optimizer or the schedule)"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():
                    if not bool(torch.isfinite(fh.get_tensor(key)).all()):
                        return f"{weights.name}: tensor {key} holds NaN/inf"
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            return f"{weights.name} is unreadable ({exc})"
    return None


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of a run folder, newest first."""
    import re

    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def newest_complete_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, [(newer checkpoint, why it was skipped), ...])."""
    skipped = []
    for folder in list_checkpoints(out):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


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


class SkipBadImages(torch.utils.data.Dataset):
    """--skip-invalid at run time: a row whose image cannot be decoded is replaced by the next good row,
    counted (shared across DataLoader workers) and reported, instead of ending the run."""

    def __init__(self, base, counter, log=None) -> None:
        self.base, self.counter = base, counter
        self.log = log or (lambda msg: print(msg, file=sys.stderr))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from data_formats.schema import ImageError

        for attempt in range(min(len(self.base), 64)):
            try:
                return self.base[(i + attempt) % len(self.base)]
            except (ImageError, OSError) as err:
                with self.counter.get_lock():
                    self.counter.value += 1
                self.log(f"skipped at run time (--skip-invalid): row {(i + attempt) % len(self.base)}: {err}")
        raise ValueError("64 rows in a row have images that cannot be decoded; run `cogtune validate` on the data")


def plot_curves(log_history: list[dict], path: str | Path) -> Path | None:
    """PNG of train loss, eval loss and learning rate against step; None when nothing was logged."""
    steps = [h["step"] for h in log_history if "loss" in h]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "o" if len(steps) < 30 else None  # a few points must still show
    ax1.plot(steps, [h["loss"] for h in log_history if "loss" in h], marker=marker, label="train loss")
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if ev:
        ax1.plot(*zip(*ev), "o-", label="eval loss (token-weighted)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    lr = [(h["step"], h["learning_rate"]) for h in log_history if "learning_rate" in h]
    if lr:
        ax2.plot(*zip(*lr), color="tab:orange", marker=marker)
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- data ----

def read_conversations(path: str, image_root: str | None, cfg, log=print) -> list:
    """Rows of a cogtune JSONL through the same validation as `cogtune validate`.

    Errors stop the run with every problem listed, unless data.skip_invalid is set; then the
    invalid rows are skipped and counted. Nothing is dropped silently.
    """
    from .validate import load_and_validate

    convs, report = load_and_validate(path, image_root=image_root, max_images=None if cfg.data.allow_multi_image
                                      else 1, skip_invalid=cfg.data.skip_invalid,
                                      allow_outside_images=cfg.data.allow_outside_images)
    if report:
        log(report)
    return convs


def build_datasets(cfg, tokenizer, config, template: str, log=print):
    """(train dataset, eval examples or None, eval conversations, collator).

    Training rows go through `datasets` (finetune/dataset.py): tokenization cached on disk, images decoded
    lazily in DataLoader workers, optional streaming. Before that the whole file is validated like
    `cogtune validate` (skipped in streaming mode, where rows are checked as they are read).
    """
    from .dataset import PackedDataset, build_torch_dataset, encode_jsonl
    from .processing_cogvlm import CogVLMCollator

    collator = CogVLMCollator(tokenizer, config, template_version=template, max_length=cfg.data.max_length,
                              last_turn_only=cfg.data.last_turn_only, packing=cfg.data.packing,
                              allow_multi_image=cfg.data.allow_multi_image)
    if cfg.data.streaming:
        log("data.streaming: rows are validated as they are read; invalid or too-long rows are skipped without "
            "an up-front count (run `cogtune validate` on the file first)")
    else:
        read_conversations(cfg.data.train_path, cfg.data.image_root, cfg, log)
    settings = dict(family_version=config.cogvlm_version, image_tokens=config.image_tokens, template_version=template,
                    max_length=cfg.data.max_length, last_turn_only=cfg.data.last_turn_only,
                    allow_multi_image=cfg.data.allow_multi_image, image_root=cfg.data.image_root,
                    allow_outside_images=cfg.data.allow_outside_images)
    encoded, stats = encode_jsonl(cfg.data.train_path, tokenizer, streaming=cfg.data.streaming, **settings)
    if stats is not None:
        log(f"train: {stats}")
        for line in stats.examples:
            log(f"  skipped: {line}")
        if stats.kept == 0:
            raise ValueError("no training rows left after encoding; raise data.max_length or check the data")
    train = build_torch_dataset(encoded, int(config.vision_config["image_size"]))
    if cfg.data.packing and not cfg.data.streaming:  # plan packs over the whole dataset (see PackedDataset)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        train = PackedDataset(train, lengths, cfg.data.max_length)
        log(f"packing: {len(lengths)} rows -> {len(train)} sequences of <= {cfg.data.max_length} tokens "
            f"({sum(lengths) / (len(train) * cfg.data.max_length):.0%} filled)")
    eval_convs, eval_examples = [], None
    if cfg.data.eval_path:
        eval_convs = read_conversations(cfg.data.eval_path, cfg.data.image_root, cfg, log)
        encoded_eval, eval_stats = encode_jsonl(cfg.data.eval_path, tokenizer, **settings)
        log(f"eval: {eval_stats}")
        eval_examples = list(encoded_eval)  # small: rows as dicts for the token-weighted eval loss
    return train, eval_examples, eval_convs, collator


# ---- evaluation ----

@torch.no_grad()
def token_weighted_eval_loss(model, examples: list, collator, batch_size: int = 4) -> float:
    """Sum of label-token losses over all rows / number of label tokens (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collator(examples[i:i + batch_size])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = model(**batch, loss_only=True, num_items_in_batch=1)  # summed over label tokens
        total += float(out.loss)
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def generation_eval(model, tokenizer, convs: list, template: str, max_new_tokens: int, rows: int,
                    batch_size: int = 8) -> tuple[dict, list[dict]]:
    """Greedy answers for the first `rows` held-out rows, scored against their last assistant turn."""
    from .generation import generate_answers, score

    convs = [c for c in convs if c.messages and c.messages[-1].role == "assistant"][:rows]
    if not convs:
        return {}, []
    refs = [c.messages[-1].content for c in convs]
    was_training = model.training
    model.eval()
    # generate_answers answers the last user turn; the trailing reference answer is left out of the prompt
    preds = generate_answers(model, tokenizer, convs, template_version=template, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    model.train(was_training)
    metrics = score(preds, refs)
    samples = [{"id": c.id, "prediction": p, "reference": r} for c, p, r in zip(convs, preds, refs)]
    return metrics, samples


class EvalCallback(TrainerCallback):
    """Token-weighted eval loss and generation eval every `eval.eval_steps` and at the end of training."""

    def __init__(self, cfg, eval_examples, eval_convs, collator, tokenizer, template, out_dir, log=print) -> None:
        self.cfg, self.examples, self.convs, self.collator = cfg, eval_examples, eval_convs, collator
        self.tokenizer, self.template, self.out_dir, self.log = tokenizer, template, Path(out_dir), log
        self.trainer = None  # set by the recipe after the Trainer exists (to log through it)
        self._last_step = -1

    def _run(self, state, model) -> None:
        # Every rank evaluates its share (under FSDP/ZeRO-3 a forward needs all ranks); rank 0 gets the results.
        if not self.examples or state.global_step == self._last_step:
            return
        self._last_step = state.global_step
        t0 = time.time()
        from .distributed import evaluate_on_every_rank

        loss, gen, samples = evaluate_on_every_rank(model, self.examples, self.collator, self.convs, self.tokenizer,
                                                    self.template, self.cfg.eval.max_new_tokens,
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
            from adapters.report import write_eval_report

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
