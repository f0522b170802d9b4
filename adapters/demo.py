"""The embedded default: the whole kit on a tiny model, on a CPU, in a couple of minutes.

`python train.py` (no arguments) or `cogtune demo`:
  1. writes a tiny random CogVLM2-architecture checkpoint in the official layout (`make_tiny`);
  2. renders a synthetic image task with PIL: name the dominant colour of a 56-px picture that also
     holds a small distractor shape and noise (a coarse visual attribute, which a random-init tiny
     model can learn through LoRA; small shapes at random places it cannot, so the task avoids them);
  3. measures held-out accuracy of the base model (ranking the candidate colours by likelihood, so
     "chance" is 1 / number of colours), trains a LoRA adapter with `recipes/tiny-demo.yaml` through
     the same trainer as real runs, and measures again (ranking and greedy exact match);
  4. merges the adapter (verified against base + adapter) and answers one held-out question.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 220, 50),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
}
QUESTIONS = ["What color is the picture?", "What is the main color of this image?", "Which color fills the image?"]
DEMO_PARTS = ("base", "data", "run", "merged")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-demo.yaml"


def render(colour: str, rng: random.Random, size: int = 56):
    """A mostly-`colour` picture: jittered shade, pixel noise, and a small grey/white/black distractor."""
    from PIL import Image, ImageDraw

    base = [max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour]]
    img = Image.new("RGB", (size, size), tuple(base))
    px = img.load()
    for _ in range(size * size // 6):
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
    draw = ImageDraw.Draw(img)
    s = rng.randint(6, 14)
    x, y = rng.randint(0, size - s), rng.randint(0, size - s)
    shade = rng.choice([(255, 255, 255), (128, 128, 128), (20, 20, 20)])
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + s, y + s], fill=shade)
    return img


def write_task(folder: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl in the cogtune schema, images as PNG files beside them."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            colour = rng.choice(list(COLOURS))
            name = f"images/{split}_{i:04d}.png"
            render(colour, rng).save(folder / name)
            rows.append({"id": f"{split}-{i}", "images": [name], "messages": [
                {"role": "user", "content": "<image>" + rng.choice(QUESTIONS)},
                {"role": "assistant", "content": colour}]})
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths["train"], paths["eval"]


def ranking_accuracy(model, collator, convs: list, batch_size: int = 16) -> float:
    """Share of rows whose true colour gets the highest per-token likelihood among all candidate colours."""
    import torch

    from data_formats.schema import Message
    from finetune.trainer import shifted_token_loss

    device = next(model.parameters()).device
    names = list(COLOURS)
    correct = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(convs), batch_size):
            chunk = convs[i:i + batch_size]
            variants = [type(c)(id=c.id, images=c.images, source=c.source,
                                messages=[*c.messages[:-1], Message("assistant", name)])
                        for c in chunk for name in names]
            batch = collator([collator.encode(v) for v in variants])
            labels = batch.pop("labels")
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            logits = model(**batch).logits
            scores = []
            for row in range(len(variants)):  # mean log-likelihood per answer token (+ EOS): length-fair
                s, n = shifted_token_loss(logits[row:row + 1], labels[row:row + 1])
                scores.append(-float(s) / max(int(n), 1))
            for j, c in enumerate(chunk):
                best = max(range(len(names)), key=lambda k: scores[j * len(names) + k])
                correct += names[best] == c.messages[-1].content
    return correct / len(convs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogtune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/tiny-demo", help="demo folder (rebuilt on every run)")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--eval-rows", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from peft import PeftModel

    from data_formats.schema import read_jsonl
    from finetune.config import load_recipe
    from finetune.generation import generate_answers, score
    from finetune.loading import load_model
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
    from finetune.recipe import train
    from finetune.tiny import make_tiny

    t0 = time.time()
    out = Path(args.out)
    marker = out / ".cogtune-demo"
    # an earlier demo's folder, from before the marker: only base/ data/ run/ merged/, and run/ is a kit run
    legacy = out.is_dir() and (out / "run" / "recipe.resolved.yaml").is_file() and all(
        p.name in DEMO_PARTS for p in out.iterdir())
    if out.is_dir() and any(out.iterdir()) and not (marker.is_file() or legacy):
        print(f"error: {out} is not empty and was not written by `cogtune demo`; nothing was removed. Give --out "
              "a new or empty folder.", file=sys.stderr)
        return 2
    for part in DEMO_PARTS:  # every run starts clean, removing only what an earlier demo wrote
        if (out / part).exists():
            shutil.rmtree(out / part)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by `cogtune demo`: it rebuilds base/, data/, run/ and merged/ here on every run\n")
    # ---- 1. tiny base checkpoint + 2. synthetic task ----
    base = make_tiny(2, out / "base", seed=args.seed)
    train_path, eval_path = write_task(out / "data", args.train_rows, args.eval_rows, args.seed)
    cfg = load_recipe(RECIPE, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
                               f"data.eval_path={eval_path}", f"output.dir={out / 'run'}", *args.overrides])
    print(f"[demo] tiny CogVLM2 base at {base}; {args.train_rows} training and {args.eval_rows} held-out rows "
          f"({len(COLOURS)} colours, chance = {100 / len(COLOURS):.1f}%)")

    # ---- 3. accuracy before ----
    model, tokenizer = load_model(cfg.model)
    processor = CogVLMProcessor.from_config(model.config, tokenizer, template_version=cfg.data.template_version,
                                            max_length=cfg.data.max_length, last_turn_only=True)
    collator = CogVLMCollator(processor)
    eval_convs, problems = read_jsonl(eval_path)
    assert not problems, problems
    before = ranking_accuracy(model, collator, eval_convs)
    print(f"[demo] held-out accuracy BEFORE training: {100 * before:.1f}%")
    del model

    # ---- training (the same trainer as real runs) ----
    run = train(cfg)

    # ---- accuracy after ----
    model, tokenizer = load_model(cfg.model)
    model = PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    after = ranking_accuracy(model, collator, eval_convs)
    # generate_answers answers each row's last user turn (the reference answer is not part of the prompt)
    preds = generate_answers(model, processor, eval_convs, max_new_tokens=4)
    exact = score(preds, [c.messages[-1].content for c in eval_convs])
    print(f"[demo] held-out accuracy AFTER training: {100 * after:.1f}% (ranking), "
          f"greedy exact match {100 * exact['exact_match']:.1f}%")

    # ---- 4. merge (verified) and answer one held-out question with the merged model ----
    from adapters.merge import merge_adapter

    merged = merge_adapter(run, out / "merged", max_shard_size="300KB").out
    merged_model, _ = load_model(type(cfg.model)(checkpoint_dir=str(merged), dtype="float32"))
    sample = eval_convs[0]
    answer = generate_answers(merged_model, CogVLMProcessor.from_pretrained(merged), [sample], max_new_tokens=4)[0]
    print(f"[demo] merged model, held-out image {sample.images[0]}: "
          f"Q: {sample.messages[-2].content.replace('<image>', '')!r} A: {answer!r} "
          f"(truth: {eval_convs[0].messages[-1].content!r})")
    wall = time.time() - t0
    print(f"[demo] done in {wall:.0f}s: accuracy {100 * before:.1f}% -> {100 * after:.1f}% "
          f"(chance {100 / len(COLOURS):.1f}%); run folder {run}, merged model {merged}")
    return 0 if after >= 0.9 else 1
