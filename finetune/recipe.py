"""Train a LoRA/QLoRA adapter from a recipe, top to bottom (docs/conventions.md §6).

    accelerate launch train.py recipes/<recipe>.yaml [key=value ...]

setup (recipe -> run folder -> model -> adapters -> data) -> train (transformers' Trainer, configured,
not re-written: checkpointing, resume, schedules, accumulation, logging, distribution come from it)
-> save (PEFT adapter, run.json, loss plot).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .config import RunConfig, parse_recipe_args, to_yaml
from .run_folder import RunInfo, prepare_run_folder


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _, cfg = parse_recipe_args(argv, "train.py", "train a LoRA/QLoRA adapter from a recipe", resume_flag=True)
    from .trainer import DivergedError

    try:
        train(cfg)
    except DivergedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def train(cfg: RunConfig, log=print, callbacks: list | None = None) -> Path:
    """Run one recipe end to end; returns the run folder. `callbacks` are extra TrainerCallbacks.

    The console gets a short summary; the resolved recipe, the memory plan and the target tables go to
    recipe.resolved.yaml and plan.txt in the run folder. run.json exists from the start and says whether
    the run is running, failed (with the error) or completed.
    """
    from transformers import set_seed

    from .fileio import write_atomic

    set_seed(cfg.train.seed)
    is_main = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))

    # ---- Run folder ----
    out = Path(cfg.output.dir)
    resume = prepare_run_folder(cfg, out, log if is_main else (lambda *_: None), clear=is_main)
    out.mkdir(parents=True, exist_ok=True)
    run_info = RunInfo(resumed_from=str(resume) if resume else None, method=cfg.train.method)
    if is_main:
        write_atomic(out / "recipe.resolved.yaml", to_yaml(cfg))
        run_info.write(out)
    try:
        if cfg.train.method == "dpo":  # preference tuning through TRL (finetune/dpo.py)
            from .dpo import train_dpo

            return train_dpo(cfg, out, resume, run_info, is_main, log, callbacks)
        return _train(cfg, out, resume, run_info, is_main, world, log, callbacks)
    except BaseException as err:
        if is_main:
            run_info.fail(err)
            run_info.write(out)
        raise


def _train(cfg, out, resume, run_info, is_main, world, log, callbacks):

    import torch
    from transformers import TrainingArguments

    from finetune import extra_params
    from finetune.lora import apply_lora
    from finetune.targets import resolve_modules_to_save, resolve_targets, trainable_counts

    from .callbacks import CheckpointCallback, EvalCallback, ExtraParamsCallback, ProgressLineCallback
    from .data_building import SkipBadImages, WithRowIndex, build_datasets, processor_for_recipe, row_namer
    from .fileio import write_atomic
    from .loading import build_meta_model, load_config_and_tokenizer, load_weights, resolve_dtype
    from .memory import plan_memory
    from .plots import plot_curves
    from .run_folder import RUN_STATE
    from .trainer import DivergedError, GuardedTrainer, keep_4bit_layers_trainable, nonfinite_parameters, real_numel

    on_gpu = torch.cuda.is_available()
    plan: list[str] = [f"# run plan for {out}", ""]

    def to_plan(text: str) -> None:
        plan.append(str(text))

    # ---- Memory plan (meta device: shapes only, before any weight is loaded) ----
    meta = build_meta_model(cfg.model.checkpoint_dir)
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    matched = [n for hit in matches.values() for n in hit]
    modules, bare = extra_params.split_modules_to_save(cfg.lora.modules_to_save)
    lora_n, full_n = trainable_counts(meta, matched, cfg.lora.r, resolve_modules_to_save(modules, meta) + bare)
    dtype_name = str(resolve_dtype(cfg.model.dtype)).replace("torch.", "")
    in_features = sum(dict(meta.named_modules())[n].in_features for n in matched)
    memory = plan_memory(meta, cfg, lora_n, full_n, dtype_name, lora_in_features=in_features, on_gpu=on_gpu)
    to_plan(str(memory))
    del meta

    # ---- Tokenizer and data (cheap checks first: nothing is wrong with the data once weights load) ----
    config, tokenizer = load_config_and_tokenizer(cfg.model)
    processor = processor_for_recipe(cfg, config, tokenizer)
    template = processor.template_version
    train_ds, eval_ds, eval_convs, collator = build_datasets(cfg, processor, log=log)
    skipped_images = None
    if cfg.data.skip_invalid:  # images that stop decoding after validation (or, streaming, were never validated)
        import multiprocessing

        skipped_images = multiprocessing.Value("i", 0)  # shared with the DataLoader workers
        if cfg.data.streaming:
            train_ds.skipped = skipped_images  # CogVLMIterableDataset skips, counts and names file:line
        else:
            train_ds = SkipBadImages(train_ds, skipped_images)
    for line in step_warnings(cfg, None if cfg.data.streaming else len(train_ds), world):
        log(f"warning: {line}")

    # ---- Model ----
    model = load_weights(cfg.model, cfg.quant)
    keep_4bit_layers_trainable(model)  # QLoRA: evaluation must not switch 4-bit layers to inference kernels
    n_params = sum(real_numel(p) for p in model.parameters())
    log(f"model: CogVLM{config.cogvlm_version}, {n_params / 1e6:.2f}M params, "
        f"dtype {next(model.parameters()).dtype}, quant {cfg.quant.mode}, {config.image_tokens} tokens per image, "
        f"template '{template}'")

    # ---- Adapters (match report and parameter table go to plan.txt) ----
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing, log=to_plan)
    if cfg.data.feature_cache:  # frozen vision features computed once (finetune/feature_cache.py)
        from .feature_cache import (
            attach,
            attach_cross,
            cross_module,
            dataset_image_refs,
            precompute,
            release_tower,
            vision_module,
        )

        cache = attach(model, cfg.data.feature_cache, cfg.model.checkpoint_dir, log=log)
        cross = attach_cross(model, cfg.data.feature_cache, cfg.model.checkpoint_dir, log=log)  # CogAgent only
        if not cfg.data.streaming:
            refs = dataset_image_refs(train_ds)
            refs += [ref for row in (eval_ds or []) for ref in row.get("images") or []]
            computed = precompute(cache, vision_module(model), refs, processor.transform_image)
            freed = release_tower(vision_module(model), cache.stage)
            if cross is not None:
                computed += precompute(cross, cross_module(model), refs, processor.transform_cross_image)
                freed += release_tower(cross_module(model), cross.stage)
                log(cross.stats())
            log(f"{cache.stats()}; {computed} computed now; {freed / 1e6:.1f}M vision weights released (every "
                "image of the run is cached)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(real_numel(p) for p in model.parameters())
    if is_main:
        write_atomic(out / "plan.txt", "\n".join(plan) + "\n")
    log(f"lora: r={cfg.lora.r} on {len(matched)} modules ({', '.join(cfg.lora.targets)}); trainable "
        f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)")
    log(f"memory plan (estimate): {memory.total_gib:.2f} GiB {'per GPU' if on_gpu else 'of CPU RAM'}; recipe, "
        f"plan and tables in {out / 'recipe.resolved.yaml'} and {out / 'plan.txt'}")

    # ---- Trainer ----
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    optim = cfg.train.optim
    if not on_gpu and optim.startswith("paged_"):
        optim = optim.removeprefix("paged_")
        log(f"note: paged optimizers need a GPU; {cfg.train.optim} runs as {optim} on CPU")
    tty = sys.stderr.isatty() or os.environ.get("COGTUNE_TQDM") == "1"
    from .distributed import ConsolidatedAdapterCallback, enable_fsdp_on_cpu, save_adapter

    enable_fsdp_on_cpu()  # accelerate keeps FSDP for GPUs; on CPU processes (gloo) torch's FSDP2 runs as well
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
        optim=optim,
        seed=cfg.train.seed,
        # LoRA weights stay fp32 under peft; bf16 autocast only where the model already runs in bf16.
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        use_cpu=not on_gpu,
        # Checkpointing is switched on by apply_lora (it must precede peft's wrapping for k-bit models); the
        # Trainer's own flag keeps its default, off (its name, gradient_/activation_checkpointing, varies by release).
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # its per-micro-batch NaN test reads the device; the kit's guard covers it
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="no",  # token-weighted eval and generation eval run in EvalCallback
        report_to=[r for r in cfg.train.report_to if r != "none"] or "none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        disable_tqdm=not tty,
    )
    evaluator = EvalCallback(cfg, eval_ds, eval_convs, collator, out, log=log)
    progress = [] if tty or not is_main else [ProgressLineCallback(log=log)]
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train_ds, data_collator=WithRowIndex(collator),
                             callbacks=[evaluator, *progress, *(callbacks or [])])
    trainer.row_name, trainer.warn = row_namer(train_ds), log  # a skipped or diverged step names its rows
    trainer.skip_nonfinite = cfg.train.skip_nonfinite
    trainer.max_nonfinite_steps = cfg.train.max_nonfinite_steps
    trainer.skipped_images = skipped_images
    if not tty:  # the one-line progress replaces transformers' raw dict printer
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    extra = extra_params.split_modules_to_save(cfg.lora.modules_to_save)[1]  # e.g. boi/eoi
    if extra:
        trainer.add_callback(ExtraParamsCallback(model, extra))
        if resume:  # the Trainer restores the peft adapter; bare parameters come from their own file
            extra_params.apply(model, extra_params.read(resume))
    trainer.add_callback(ConsolidatedAdapterCallback(model))  # sharded runs: the adapter as one file per checkpoint
    trainer.add_callback(CheckpointCallback(trainer))  # last: its manifest marks the checkpoint complete
    if resume and (Path(resume) / RUN_STATE).is_file():  # loss sums and counters of the part already trained
        trainer.restore_run_state(json.loads((Path(resume) / RUN_STATE).read_text()))
    evaluator.trainer = trainer
    if cfg.lora.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        trainer.optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.train.learning_rate,
                                                      loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
                                                      weight_decay=cfg.train.weight_decay)

    # ---- Train ----
    wall = run_training(trainer, cfg, resume, log)
    bad = nonfinite_parameters(model)
    if bad:
        raise DivergedError(f"training diverged: {len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]}); no adapter "
                            f"was saved. Lower train.learning_rate (now {cfg.train.learning_rate:g}).")
    train_loss = trainer.run_train_loss()

    # ---- Save ----
    save_adapter(model, out / "adapter", extra, is_main)  # every rank: sharded weights are gathered first
    if is_main:
        processor.save_pretrained(out / "adapter")  # tokenizer + processor_config.json
        run_info.finish(cfg, config, template, global_step=trainer.state.global_step, train_loss=train_loss,
                        train_loss_tokens=trainer.run_loss_tokens + int(trainer._int_tokens),
                        skipped_nonfinite=trainer.skipped,
                        skipped_images=skipped_images.value if skipped_images is not None else 0,
                        wall_seconds=round(wall, 2))
        run_info.write(out)
        plot_curves(trainer.state.log_history, out / "curves.png")
        images = "" if skipped_images is None else f", rows skipped for undecodable images: {skipped_images.value}"
        log(f"saved adapter to {out / 'adapter'} ({trainer.state.global_step} steps, {wall:.1f}s, "
            f"final train loss {train_loss:.4f}, skipped non-finite steps: {trainer.skipped}{images})")
    return out


def restore_checkpoint_weights(trainer, folder: Path) -> None:
    """Load a checkpoint's adapter weights and trainer state without training (resume at max_steps)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(str(folder / "adapter_model.safetensors")))
    trainer.state = TrainerState.load_from_json(str(folder / "trainer_state.json"))


def save_emergency_checkpoint(trainer) -> Path | None:
    """After an unexpected error: save the last finished step as a normal, verified checkpoint.

    Weights change only at optimizer steps, so the state at `global_step` is consistent; resuming redoes
    the interrupted step's micro-batches. Returns the folder, or None when there was nothing to save.
    """
    step = trainer.state.global_step
    if step == 0:
        return None
    folder = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    from .run_folder import checkpoint_problem

    if folder.is_dir() and checkpoint_problem(folder) is None:
        return folder
    try:
        trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's own writer: resume reads what it wrote
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    except Exception as err:  # noqa: BLE001 - the original error matters more; say why nothing was saved
        print(f"warning: could not save a checkpoint after the error: {err}", file=sys.stderr)
        return None
    return folder if checkpoint_problem(folder) is None else None


def run_training(trainer, cfg: RunConfig, resume, log=print) -> float:
    """`trainer.train()` with the kit's resume and failure rules (SFT and DPO alike); returns the wall seconds.

    A checkpoint that already reached `train.max_steps` is restored, not trained one step further (the Trainer
    would run one more step past max_steps); an unexpected error first saves the last finished step as a
    resumable checkpoint; a diverged run (`DivergedError`) saves nothing.
    """
    from .trainer import DivergedError

    t0 = time.time()
    done = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"] if resume else 0
    try:
        if resume and 0 < cfg.train.max_steps <= done:
            log(f"resume: {Path(resume).name} already reached train.max_steps={cfg.train.max_steps}; nothing left "
                "to train, saving its adapter (raise train.max_steps to train longer)")
            restore_checkpoint_weights(trainer, Path(resume))
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except DivergedError:
        raise  # its weights are not worth resuming from
    except Exception as err:
        saved = save_emergency_checkpoint(trainer)
        where = (f"a resumable checkpoint was saved at {saved}; fix the cause, then rerun with --resume auto"
                 if saved else "no step had finished, so there was nothing to save")
        log(f"error during training at step {trainer.state.global_step}: {type(err).__name__}: {err}\n  {where}")
        raise
    return time.time() - t0


def step_warnings(cfg: RunConfig, rows: int | None, world: int = 1) -> list[str]:
    """Warnings for a run too short to learn or to plot: fewer than ~20 optimizer steps or ~5 logged points."""
    import math

    t = cfg.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    if t.max_steps > 0:
        steps, how = t.max_steps, f"train.max_steps={t.max_steps}"
    elif rows is None:
        return []
    else:
        batches = math.ceil(rows / (t.per_device_train_batch_size * world))
        steps = math.ceil(math.ceil(batches / t.gradient_accumulation_steps) * t.num_train_epochs)
        how = (f"{rows} rows / ({t.per_device_train_batch_size} per device x {t.gradient_accumulation_steps} "
               f"accumulation x {world} device(s)) x {t.num_train_epochs:g} epoch(s)")
    out = []
    if steps < 20:
        fix = ("raise train.max_steps" if t.max_steps > 0 else
               f"lower train.gradient_accumulation_steps (now {t.gradient_accumulation_steps}) or "
               f"train.per_device_train_batch_size (now {t.per_device_train_batch_size}), or raise "
               f"train.num_train_epochs (now {t.num_train_epochs:g})")
        out.append(f"this run takes only {steps} optimizer steps ({how}, {per_step} rows per step): too few to learn "
                   f"much or to draw a curve; {fix}")
    points = steps // max(t.logging_steps, 1) + 1
    if points < 5:
        out.append(f"only {points} loss point(s) will be logged (train.logging_steps={t.logging_steps} over {steps} "
                   f"steps); set train.logging_steps={max(1, steps // 10)}")
    return out


