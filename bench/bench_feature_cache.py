"""Feature cache speed-up per training step and disk size per image (`data.feature_cache`, CPU).

A CogVLM2-shaped model scaled to CPU: decoder hidden 512, 4 layers, GQA 8/2; vision tower hidden 512, 8 layers,
224-px images (256 patches, 66 image tokens after the 2x2 conv); LoRA r=8 on both experts, tower and GLU frozen;
batches of 4 rows of BOS + image + 120 text tokens, fp32. The same step is timed with the tower running (every
epoch of a plain run) and with its features read from a warm cache (every epoch after the first), fastest of
--repeats. Disk size per image is measured on the tiny run and computed for the real models (features stored in
the training dtype, bf16).

    .venv/bin/python bench/bench_feature_cache.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, image tokens without boi/eoi, LM hidden, tower hidden after the conv)
FULL_SIZE = [("CogVLM2-19B (1344 px)", 2304, 4096, 1792), ("CogVLM-17B (490 px)", 1225, 4096, 1792)]


def build(threads: int):
    from finetune.config import LoraSection
    from finetune.lora import apply_lora
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import tiny_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = tiny_config(2, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_multi_query_heads=2, image_size=224,
                      vision_config={"hidden_size": 512, "num_heads": 8, "intermediate_size": 1376,
                                     "num_hidden_layers": 8})
    model = CogVLMForCausalLM(cfg)
    lora = LoraSection(targets=["experts"], r=8, lora_alpha=16, lora_dropout=0.0)
    return cfg, apply_lora(model, lora, gradient_checkpointing=False, log=lambda *_: None).train()


def batch(cfg, rows: int = 4, text: int = 120) -> dict[str, torch.Tensor]:
    n = cfg.image_tokens
    length = 1 + n + text
    ids = torch.randint(10, 200, (rows, length))
    types = torch.zeros_like(ids)
    types[:, 1:1 + n] = 1
    labels = torch.full_like(ids, -100)
    labels[:, -20:] = ids[:, -20:]
    size = cfg.vision_config["image_size"]
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids), "labels": labels,
            "images": torch.randn(rows, 3, size, size)}


def best_step(model, inputs, repeats: int) -> float:
    def step():
        model(**inputs, use_cache=False).loss.backward()
        for p in model.parameters():
            p.grad = None

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from finetune.feature_cache import FeatureCache, vision_module

    cfg, model = build(args.threads)
    inputs = batch(cfg)
    plain = best_step(model, inputs, args.repeats)
    vision = vision_module(model)
    with tempfile.TemporaryDirectory() as tmp:
        vision.feature_cache = FeatureCache(tmp, {"bench": True}, "glu")
        cached = best_step(model, inputs, args.repeats)  # the warm-up step fills the cache
        files = list(Path(tmp).glob("*/*.safetensors"))
        per_image = sum(f.stat().st_size for f in files) / len(files)
    vision.feature_cache = None
    print(f"CPU, {torch.get_num_threads()} thread(s), fp32, batch 4 x {inputs['input_ids'].shape[1]} positions, "
          f"vision 8 x 512 at 224 px, decoder 4 x 512, LoRA r=8 on both experts; fastest of {args.repeats}\n")
    print("| step | time | speed-up |")
    print("|---|---:|---:|")
    print(f"| tower runs (plain run, every epoch) | {plain * 1e3:.0f} ms | 1.00x |")
    print(f"| features from the cache (epochs after the first) | {cached * 1e3:.0f} ms | {plain / cached:.2f}x |")
    print(f"\nDisk per image, this model (fp32, {cfg.image_tokens - 2} x {cfg.hidden_size}): {per_image / 2**10:.0f} "
          "KiB\n")
    print("| model | cached stage | features per image | disk per image (bf16) |")
    print("|---|---|---|---:|")
    for name, tokens, hidden, tower in FULL_SIZE:
        print(f"| {name} | glu (tower + GLU frozen) | {tokens} x {hidden} | {tokens * hidden * 2 / 2**20:.1f} MiB |")
        print(f"| {name} | tower (GLU trains) | {tokens} x {tower} | {tokens * tower * 2 / 2**20:.1f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
