"""Pieces the training recipe configures transformers' Trainer with: loss guard, callbacks, plots.

Kept out of `recipe.py` so the recipe reads top to bottom; none of this subclasses the Trainer.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class GuardedTrainer(Trainer):
    """transformers' Trainer, changed only in `compute_loss` (its documented extension point).

    The model computes the loss itself (token-weighted through `num_items_in_batch`, lm_head on
    labelled positions only); this adds the non-finite guard: such micro-batches are skipped and counted.
    """

    skip_nonfinite: bool = True
    skipped: int = 0
    tokens_seen: torch.Tensor | int = 0  # real (non-pad) tokens; attention_mask holds segment ids when packing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen = self.tokens_seen + (inputs["attention_mask"] > 0).sum().detach()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if self.skip_nonfinite and model.training:
            loss, skipped = guard_nonfinite(loss, [p for p in model.parameters() if p.requires_grad])
            self.skipped += skipped
        return (loss, result[1]) if return_outputs else loss


class ExtraParamsCallback(TrainerCallback):
    """Writes bare trained parameters (boi/eoi) into every checkpoint, beside peft's adapter files."""

    def __init__(self, model, names: list[str]) -> None:
        self.model, self.names = model, names

    def on_save(self, args, state, control, **kwargs):
        from adapters import extra_params

        extra_params.save(self.model, self.names, Path(args.output_dir) / f"checkpoint-{state.global_step}")


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s, peak memory and the non-finite skip count to every log line (and TensorBoard)."""

    def __init__(self) -> None:
        self.trainer: GuardedTrainer | None = None  # set by the recipe once the Trainer exists
        self._t = None
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._tokens = time.time(), 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._t is None or "loss" not in logs or self.trainer is None:
            return
        now, seen = time.time(), int(self.trainer.tokens_seen)  # one host sync per log line
        logs["tokens_seen"] = seen
        logs["tokens_per_s"] = round((seen - self._tokens) / max(now - self._t, 1e-9), 1)
        self._t, self._tokens = now, seen
        if torch.cuda.is_available():
            logs["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            import resource

            logs["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        logs["skipped_nonfinite"] = self.trainer.skipped
        bar = next((getattr(cb, "training_bar", None) for cb in self.trainer.callback_handler.callbacks
                    if getattr(cb, "training_bar", None) is not None), None)
        if bar is not None:  # the progress bar itself shows throughput and memory
            mem = logs.get("peak_mem_gb", logs.get("peak_rss_gb"))
            bar.set_postfix(loss=logs["loss"], tok_s=logs["tokens_per_s"], mem_gb=mem, refresh=False)


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
                                      else 1, skip_invalid=cfg.data.skip_invalid)
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
                    allow_multi_image=cfg.data.allow_multi_image, image_root=cfg.data.image_root)
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
        # One process evaluates (under accelerate every rank holds the whole model; eval uses no collectives).
        if not self.examples or state.global_step == self._last_step or not state.is_world_process_zero:
            return
        self._last_step = state.global_step
        metrics = {"eval_loss": round(token_weighted_eval_loss(model, self.examples, self.collator), 5)}
        gen, samples = generation_eval(model, self.tokenizer, self.convs, self.template,
                                       self.cfg.eval.max_new_tokens, self.cfg.eval.generation_rows)
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
            self.trainer.log(metrics)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.cfg.eval.eval_steps
        if every and state.global_step % every == 0:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._run(state, model)
