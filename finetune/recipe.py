"""Train a LoRA/QLoRA adapter from a recipe, top to bottom (style guide §9.9).

    accelerate launch train.py recipes/<recipe>.yaml [key=value ...]

setup (recipe -> run folder -> model -> adapters -> data) -> train (transformers' Trainer, configured,
not re-written: checkpointing, resume, schedules, accumulation, logging, distribution come from it)
-> save (PEFT adapter, run.json, loss plot).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .config import RunConfig, parse_recipe_args, to_yaml


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _, cfg = parse_recipe_args(argv, "train.py", "train a LoRA/QLoRA adapter from a recipe", resume_flag=True)
    try:
        train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def train(cfg: RunConfig, log=print, callbacks: list | None = None) -> Path:
    """Run one recipe end to end; returns the run folder. `callbacks` are extra TrainerCallbacks."""
    import torch
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from adapters import extra_params
    from adapters.lora import apply_lora

    from .loading import load_config_and_tokenizer, load_weights
    from .train_utils import (
        EvalCallback,
        ExtraParamsCallback,
        GuardedTrainer,
        ThroughputCallback,
        build_datasets,
        plot_curves,
        write_atomic,
    )

    set_seed(cfg.train.seed)
    is_main = int(os.environ.get("RANK", "0")) == 0

    # ---- Run folder ----
    out = Path(cfg.output.dir)
    resume = None
    if cfg.train.resume == "auto":
        resume = get_last_checkpoint(str(out)) if out.is_dir() else None
        log(f"resume: {resume or 'no checkpoint found, starting fresh'}")
    elif cfg.train.resume:
        resume = cfg.train.resume
    elif out.is_dir() and any(out.iterdir()):
        if not cfg.output.overwrite:
            raise ValueError(f"run folder {out} is not empty. Use train.resume=auto to continue it, "
                             "output.overwrite=true to write over it, or another output.dir.")
        clear_run_folder(out, log)
    if resume:
        check_same_recipe(out / "recipe.resolved.yaml", cfg)
    out.mkdir(parents=True, exist_ok=True)
    resolved = to_yaml(cfg)
    log("---- recipe (resolved) ----\n" + resolved.rstrip())
    if is_main:
        write_atomic(out / "recipe.resolved.yaml", resolved)

    # ---- Memory plan (meta device: shapes only, before any weight is loaded) ----
    from adapters.targets import linear_module_names, memory_plan_for, resolve_targets

    from .loading import build_meta_model

    meta = build_meta_model(cfg.model.checkpoint_dir)
    _, matches, _ = resolve_targets(cfg.lora.targets, [n for n, _ in meta.named_modules()], linear_module_names(meta))
    log(str(memory_plan_for(meta, cfg, [n for hit in matches.values() for n in hit])))
    del meta

    # ---- Tokenizer and data (cheap checks first: nothing is wrong with the data once weights load) ----
    config, tokenizer = load_config_and_tokenizer(cfg.model)
    template = cfg.data.template_version or config.template_version
    train_ds, eval_ds, eval_convs, collator = build_datasets(cfg, tokenizer, config, template, log=log)

    # ---- Model ----
    model = load_weights(cfg.model, cfg.quant)
    log(f"model: CogVLM{config.cogvlm_version}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"dtype {next(model.parameters()).dtype}, {config.image_tokens} tokens per image, template '{template}'")

    # ---- Adapters ----
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing, log=log)

    # ---- Trainer ----
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.train.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        learning_rate=cfg.train.learning_rate,
        num_train_epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps,
        warmup_steps=cfg.train.warmup_steps,
        lr_scheduler_type=cfg.train.lr_scheduler_type,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        optim=cfg.train.optim,
        seed=cfg.train.seed,
        # LoRA weights stay fp32 under peft; bf16 autocast only where the model already runs in bf16.
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        # Checkpointing is switched on by apply_lora (it must precede peft's wrapping for k-bit models); the
        # Trainer's own flag keeps its default, off (its name, gradient_/activation_checkpointing, varies by release).
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="no",  # token-weighted eval and generation eval run in EvalCallback
        report_to=[r for r in cfg.train.report_to if r != "none"] or "none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        disable_tqdm=not sys.stderr.isatty() and os.environ.get("COGTUNE_TQDM") != "1",
    )
    throughput = ThroughputCallback()
    evaluator = EvalCallback(cfg, eval_ds, eval_convs, collator, tokenizer, template, out, log=log)
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                             callbacks=[throughput, evaluator, *(callbacks or [])])
    trainer.skip_nonfinite = cfg.train.skip_nonfinite
    extra = extra_params.split_modules_to_save(cfg.lora.modules_to_save)[1]  # e.g. boi/eoi
    if extra:
        trainer.add_callback(ExtraParamsCallback(model, extra))
        if resume:  # the Trainer restores the peft adapter; bare parameters come from their own file
            extra_params.apply(model, extra_params.read(resume))
    throughput.trainer = evaluator.trainer = trainer
    if cfg.lora.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        trainer.optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.train.learning_rate,
                                                      loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                                      weight_decay=cfg.train.weight_decay)

    # ---- Train ----
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - t0

    # ---- Save ----
    if is_main:
        model.save_pretrained(str(out / "adapter"))
        extra_params.save(model, extra, out / "adapter")
        tokenizer.save_pretrained(str(out / "adapter"))
        run_info = {
            "family_version": config.cogvlm_version,
            "base_checkpoint": str(Path(cfg.model.checkpoint_dir).resolve()),
            "base_config_hash": config_hash(cfg.model.checkpoint_dir),
            "tokenizer_dir": cfg.model.tokenizer_dir,
            "template_version": template,
            "image_tokens": config.image_tokens,
            "quant_mode": cfg.quant.mode,
            "targets": cfg.lora.targets,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "skipped_nonfinite": trainer.skipped,
            "wall_seconds": round(wall, 2),
            "versions": library_versions(),
        }
        write_atomic(out / "run.json", json.dumps(run_info, indent=2))
        plot_curves(trainer.state.log_history, out / "curves.png")
        log(f"saved adapter to {out / 'adapter'} ({trainer.state.global_step} steps, {wall:.1f}s, "
            f"final train loss {result.training_loss:.4f}, skipped non-finite micro-batches: {trainer.skipped})")
    return out


def clear_run_folder(out: Path, log=print) -> None:
    """output.overwrite: remove what an earlier run left (checkpoints above all, which resume=auto would
    otherwise pick up as if they belonged to this run)."""
    import shutil

    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    log(f"output.overwrite: cleared {out}")


# Sections whose change makes a checkpoint belong to another experiment (train.* may change on resume,
# e.g. max_steps to train longer).
_RESUME_SECTIONS = ("model", "data", "lora", "quant")


def check_same_recipe(saved: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run folder written by a different recipe (model, data, LoRA or quantization)."""
    import dataclasses

    import yaml

    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = dataclasses.asdict(cfg)
    changed = [f"{sec}.{k}: {before.get(sec, {}).get(k)!r} -> {v!r}" for sec in _RESUME_SECTIONS
               for k, v in now[sec].items() if before.get(sec, {}).get(k) != v]
    if changed:
        raise ValueError(f"cannot resume {saved.parent}: its recipe differs in " + "; ".join(changed)
                         + ". Resume with the same recipe, or train into another output.dir.")


def config_hash(checkpoint_dir: str | Path) -> str:
    """sha256 of the base config.json: merge refuses an adapter trained on another base."""
    data = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cogtune", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


