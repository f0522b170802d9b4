"""Measure a recipe's real peak memory and throughput next to its memory plan (for a machine with a GPU).

Memory and speed do not depend on weight values, so no download is needed: the script writes a random
checkpoint of the recipe's architecture (official layout, from the reference config.json), synthetic rows
that fill `data.max_length` (one image each), trains a few steps through the kit's own trainer and prints
measured peak memory and tokens/s beside `finetune/memory.py`'s estimate.

    python bench/bench_gpu.py recipes/cogvlm2-qlora-24gb.yaml --steps 6 [--work /data/bench] [k=v ...]
    python bench/bench_gpu.py recipes/tiny-demo.yaml --tiny      # CPU check of this script itself

A full-size random CogVLM2 checkpoint takes ~39 GB of disk (written once into --work and reused).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT / "tests" / "assets" / "reference" / "configs"
CONFIGS = {1: "cogvlm-chat-hf.config.json", 2: "cogvlm2-llama3-chat-19B.config.json"}


def random_checkpoint(version: int, out: Path, tiny: bool) -> Path:
    """A random-weight checkpoint in the official layout (reused when already written)."""
    if (out / "config.json").is_file():
        return out
    if tiny:
        from finetune.tiny import make_tiny

        return make_tiny(version, out)
    import torch

    from finetune.models.cogvlm.configuration import CogVLMConfig
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tokenization import build_tiny_tokenizer

    # A stand-in tokenizer (offline): ids only need to be in range, and the special ids in config.json are set to
    # its own; the real vocabulary size is kept, so memory and speed are those of the real model.
    tok = build_tiny_tokenizer(version)
    special = {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
               "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")] if version == 2
               else tok.eos_token_id}
    config = CogVLMConfig(**{**json.loads((REFERENCE / CONFIGS[version]).read_text()), **special})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 19.5B parameters: build in bf16 (fp32 would not fit an 80 GB card)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = CogVLMForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out, max_shard_size="5GB")
    tok.save_pretrained(out)
    return out


def synthetic_rows(folder: Path, n: int, image_size: int, answer_words: int) -> Path:
    """Rows of one noise image + a question + a long answer (long enough to reach max_length)."""
    from PIL import Image

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"images/{i}.png"
        if not (folder / name).is_file():
            Image.effect_noise((image_size, image_size), 64).convert("RGB").save(folder / name)
        answer = " ".join(rng.choice(["red", "green", "blue", "left", "right", "circle"]) for _ in range(answer_words))
        rows.append({"id": str(i), "images": [name], "messages": [
            {"role": "user", "content": "<image>Describe the picture."}, {"role": "assistant", "content": answer}]})
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("out/bench-gpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks this script, measures nothing")
    args = parser.parse_intermixed_args(argv)

    import torch
    from transformers import TrainerCallback

    from finetune.config import load_recipe
    from finetune.loading import build_meta_model
    from finetune.recipe import train
    from finetune.targets import memory_plan_for, resolve_targets

    probe = load_recipe(args.recipe, args.overrides + ["model.checkpoint_dir=x", "data.train_path=x"])
    version = 2 if probe.model.family is None or "cogvlm2" in probe.model.family else 1
    base = random_checkpoint(version, args.work / f"base-v{version}{'-tiny' if args.tiny else ''}", args.tiny)
    meta = build_meta_model(base)
    image_size = meta.config.vision_config["image_size"]
    words = max(8, (probe.data.max_length - meta.config.image_tokens - 32) // 3)  # ~2-3 tokens a word: fits
    rows = synthetic_rows(args.work / f"data-{image_size}", 8, image_size, words)
    cfg = load_recipe(args.recipe, [
        *args.overrides, f"model.checkpoint_dir={base}", "model.family=null", "model.tokenizer_dir=null",
        f"data.train_path={rows}", "data.eval_path=null", f"train.max_steps={args.steps}", "train.logging_steps=1",
        "train.save_steps=100000", "train.report_to=[none]", f"output.dir={args.work / 'run'}",
        "output.overwrite=true"])
    _, matches, _ = resolve_targets(cfg.lora.targets, meta)
    plan = memory_plan_for(meta, cfg, [n for hit in matches.values() for n in hit])

    history: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train(cfg, log=lambda *_: None, callbacks=[Keep()])
    wall = time.time() - t0
    measured = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")
    tps = [entry["tokens_per_s"] for entry in history if "tokens_per_s" in entry][1:]  # step 1 includes warm-up
    print(str(plan))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (--tiny: nothing measured)"
    print("\n| recipe | device | planned GiB | peak allocated GiB | peak reserved GiB | tokens/s (median) | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    median = sorted(tps)[len(tps) // 2] if tps else float("nan")
    print(f"| {Path(args.recipe).name} | {device} | {plan.total_gib:.2f} | {measured:.2f} | {reserved:.2f} | "
          f"{median:.0f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
