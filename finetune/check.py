"""`cogtune check RECIPE`: catch a broken run in a minute instead of after hours.

1. the recipe validates (strict keys and types);
2. the training data validates (every problem at once) and encodes at data.max_length;
3. the LoRA targets match, shown on a meta-device model (no weights loaded);
4. the real model overfits 8 rows for a few steps through the real trainer, and the loss must drop
   (for `train.method: dpo`, 8 preference pairs through TRL's DPOTrainer, and the DPO loss must drop).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from .config import RunConfig, parse_recipe_args


def overfit_check(cfg: RunConfig, rows: int = 8, steps: int = 20, log=print) -> tuple[float, float]:
    """(first loss, last loss) of a short overfit on the first `rows` training rows."""
    from .recipe import train
    from .validate import load_and_validate

    if cfg.train.method == "dpo":  # preference pairs: a DPO overfit (finetune/dpo.py), the DPO loss must drop
        from .dpo_data import read_pairs_or_fail

        convs = read_pairs_or_fail(cfg.data.train_path, cfg, log)
    else:
        convs, _ = load_and_validate(cfg.data.train_path, image_root=cfg.data.image_root,
                                     max_images=None if cfg.data.allow_multi_image else 1,
                                     skip_invalid=cfg.data.skip_invalid,
                                     allow_outside_images=cfg.data.allow_outside_images)
    with tempfile.TemporaryDirectory(prefix="cogtune-check-") as tmp:
        subset = Path(tmp) / "rows.jsonl"
        with open(subset, "w") as fh:
            for c in convs[:rows]:
                fh.write(json.dumps(c.to_json()) + "\n")
        quick = replace(
            cfg,
            data=replace(cfg.data, train_path=str(subset), eval_path=None, num_workers=0,
                         image_root=cfg.data.image_root or str(Path(cfg.data.train_path).parent)),
            train=replace(cfg.train, max_steps=steps, gradient_accumulation_steps=1, per_device_train_batch_size=min(
                rows, len(convs)), warmup_steps=0, lr_scheduler_type="constant", logging_steps=1, save_steps=10**9,
                report_to=["none"], resume=None),
            output=replace(cfg.output, dir=str(Path(tmp) / "run"), overwrite=True),
        )
        history: list[dict] = []
        from transformers import TrainerCallback

        class _Keep(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    history.append(logs)

        train(quick, log=log, callbacks=[_Keep()])
    losses = [float(h["loss"]) for h in history]
    return losses[0], min(losses[-3:])


def main(argv: list[str]) -> int:
    _, cfg = parse_recipe_args(argv, "cogtune check", __doc__.splitlines()[0])
    print("recipe: ok")
    from finetune.targets import match_report, resolve_targets

    from .loading import build_meta_model, check_checkpoint_dir
    from .validate import DataValidationError

    try:
        check_checkpoint_dir(cfg.model.checkpoint_dir)
        meta = build_meta_model(cfg.model.checkpoint_dir)
        _, matches, skipped = resolve_targets(cfg.lora.targets, meta)
        print("targets: ok\n" + match_report(matches, skipped))
        first, last = overfit_check(cfg)
    except (DataValidationError, ValueError, FileNotFoundError) as err:
        print(f"check failed: {err}", file=sys.stderr)
        return 1
    dropped = last < 0.9 * first
    what = "8 preference pairs (DPO)" if cfg.train.method == "dpo" else "8 rows"
    print(f"overfit {what}: loss {first:.4f} -> {last:.4f} ({'dropped' if dropped else 'did NOT drop'})")
    if not dropped and cfg.train.method == "dpo":
        print("check failed: the DPO loss did not drop on 8 pairs (it starts at log 2 = 0.693, policy = reference). "
              "Likely causes: learning rate too low for this short check (DPO recipes train at ~5e-6 over many "
              "steps; try train.learning_rate=1e-4), dpo.beta too small, or targets that do not reach the answer "
              "tokens (see `cogtune targets`).", file=sys.stderr)
        return 1
    if not dropped:
        print("check failed: the loss did not drop on 8 rows. Likely causes: learning rate too low, "
              "targets that do not reach the answer tokens, or labels all -100 (see `cogtune validate`). "
              "A freshly initialised base (e.g. `cogtune make-tiny`) has near-uniform logits: add "
              "'lora.modules_to_save=[lm_head]' and a higher train.learning_rate such as 3e-3.",
              file=sys.stderr)
        return 1
    print("check: ok")
    return 0
