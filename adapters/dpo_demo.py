"""Tiny CPU proof of preference tuning: a short SFT, then DPO, on a synthetic image task.

The task: a 56-px picture dominated by one colour, "What color is the picture?". The SFT rows answer
with a RANDOM colour name (the model learns the answer format, not the colour), so afterwards the
model prefers the true colour over a wrong one about half the time (chance). The DPO pairs prefer
the true colour (chosen) over another (rejected); held-out pairs measure preference accuracy, the
share of pairs whose chosen answer the model finds more likely, before -> after DPO.

    python -m adapters.dpo_demo --out out/dpo-demo [--quant nf4] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .demo import COLOURS, QUESTIONS, render


def write_pairs(folder: Path, n_sft: int, n_train: int, n_eval: int, seed: int,
                image_rule: bool = True) -> dict[str, Path]:
    """sft.jsonl (random answers), train.jsonl and eval.jsonl (preference rows), images beside them.

    `image_rule`: chosen = the picture's colour, rejected = another one (needs the image). Otherwise an
    easier rule for quick tests: chosen is one of the first three colour names, rejected one of the others.
    """
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = {}
    for split, n in (("sft", n_sft), ("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            colour = rng.choice(names)
            image = f"images/{split}_{i:04d}.png"
            render(colour, rng).save(folder / image)
            prompt = [{"role": "user", "content": "<image>" + rng.choice(QUESTIONS)}]
            if split == "sft":
                rows.append({"id": f"{split}-{i}", "images": [image],
                             "messages": prompt + [{"role": "assistant", "content": rng.choice(names)}]})
            else:
                if image_rule:
                    good, bad = colour, rng.choice([c for c in names if c != colour])
                else:
                    good, bad = rng.choice(names[:3]), rng.choice(names[3:])
                rows.append({"id": f"{split}-{i}", "images": [image], "messages": prompt,
                             "chosen": good, "rejected": bad})
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def run_proof(out: Path, *, n_sft: int = 64, n_train: int = 96, n_eval: int = 48, sft_steps: int = 10,
              dpo_steps: int = 30, dpo_lr: float = 5e-3, quant: str = "none", seed: int = 0, log=print,
              dpo_overrides: tuple[str, ...] = ()) -> dict:
    """Tiny base -> SFT adapter -> DPO (continuing it) through the recipe path; returns the DPO run.json.

    `dpo_overrides`: extra recipe overrides for the DPO run (e.g. "dpo.beta=0.5")."""
    from finetune.config import load_recipe
    from finetune.recipe import train
    from finetune.tiny import make_tiny

    base = make_tiny(2, out / "base", seed=seed)
    data = write_pairs(out / "data", n_sft, n_train, n_eval, seed)
    common = [f"model.checkpoint_dir={base}", "model.dtype=float32", f"quant.mode={quant}", "data.max_length=64",
              "data.num_workers=0", "lora.targets=[experts,glu_adapter]", "lora.r=8", "lora.lora_alpha=16",
              "lora.lora_dropout=0.0", "train.gradient_checkpointing=false", "train.report_to=[none]",
              "train.save_steps=1000", "train.warmup_steps=0", "train.gradient_accumulation_steps=1",
              "output.overwrite=true", f"train.seed={seed}"]
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "cogvlm2-dpo.yaml"
    sft = load_recipe(recipe, common + ["model.family=null", "train.method=sft", f"data.train_path={data['sft']}",
                                        f"train.max_steps={sft_steps}", "train.learning_rate=3e-3",
                                        "train.per_device_train_batch_size=16", "train.logging_steps=5",
                                        f"output.dir={out / 'sft'}", "eval.generation_rows=0"])
    train(sft, log=log)
    dpo = load_recipe(recipe, common + ["model.family=null", f"data.train_path={data['train']}",
                                        f"data.eval_path={data['eval']}", f"train.max_steps={dpo_steps}",
                                        f"train.learning_rate={dpo_lr}", "train.per_device_train_batch_size=8",
                                        "train.logging_steps=1", "train.lr_scheduler_type=constant",
                                        f"dpo.start_adapter={out / 'sft' / 'adapter'}", f"output.dir={out / 'dpo'}",
                                        *dpo_overrides])
    train(dpo, log=log)
    return json.loads((out / "dpo" / "run.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters.dpo_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/dpo-demo")
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--seed", type=int, default=0, help="base weights, data and training order")
    parser.add_argument("--train-pairs", type=int, default=96)
    parser.add_argument("--eval-pairs", type=int, default=48)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--dpo-lr", type=float, default=5e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args(argv)
    info = run_proof(Path(args.out), n_train=args.train_pairs, n_eval=args.eval_pairs, dpo_steps=args.dpo_steps,
                     dpo_lr=args.dpo_lr, quant=args.quant, seed=args.seed, dpo_overrides=(f"dpo.beta={args.beta}",))
    print(f"held-out preference accuracy: {info['preference_accuracy_before']:.3f} -> "
          f"{info['preference_accuracy_after']:.3f} ({args.quant}, seed {args.seed}, {info['global_step']} DPO steps, "
          f"{info['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
