"""Wall time of our CogVLM2 model against the OFFICIAL remote code on the same weights and batches (CPU).

Like `bench/parity_official.py` (whose loader and stubs this reuses), it needs the official files in a folder
outside the repository. Both models run in fp32 on the CPU, on a small CogVLM2-shaped config; the official
vision tower runs on our SDPA stand-in for xformers, so the comparison isolates the language model:
expert routing, attention on padded batches (the official code falls back to an eager fp32-softmax path
whenever a batch is padded) and the loss head (ours skips logits at unlabelled positions when training).

Usage:
    .venv/bin/python bench/speed_vs_official.py --official-dir /tmp/official [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_official import BOS_ID, EOS_ID, PAD_ID, VOCAB, _batch, _with_labels, load_official  # noqa: E402


def build(official, seed: int = 0):
    """(official model, our model with its weights, our config) for a small CogVLM2-shaped config."""
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import tiny_config

    cfg = tiny_config(2, vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                      hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_multi_query_heads=2, image_size=224,
                      vision_config={"hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                                     "num_hidden_layers": 2})
    off_cfg = official.CogVLMConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_multi_query_heads=cfg.num_multi_query_heads, rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vision_config=dict(cfg.vision_config))
    torch.manual_seed(seed)
    ref = official.CogVLMForCausalLM(off_cfg)
    ours = CogVLMForCausalLM(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, cfg


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ref, ours, cfg = build(load_official(args.official_dir))
    gen = torch.Generator().manual_seed(1)
    batches = {
        "1 row, image + 200 text tokens": _batch([(200, True)], cfg, gen),
        "4 rows right-padded (200/120/60/30 text)": _batch([(200, True), (120, True), (60, True), (30, True)],
                                                          cfg, gen),
    }
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, GQA {cfg.num_attention_heads}/"
          f"{cfg.num_multi_query_heads}, vocab {cfg.vocab_size}, {cfg.image_tokens} image tokens; "
          f"fp32, {torch.get_num_threads()} CPU threads; median of {args.repeats}\n")
    print("| batch | pass | official (ms) | cogtune (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, batch in batches.items():
        labelled = _with_labels(batch, 20)

        def fwd(model, batch=batch):
            model.eval()
            with torch.no_grad():
                model(**batch, use_cache=False)

        def train_step(model, labelled=labelled):
            model.train()
            model.zero_grad(set_to_none=True)
            model(**labelled, use_cache=False).loss.backward()

        rows = [("forward", fwd), ("forward + backward (loss)", train_step)]
        for label, step in rows:
            t_ref = timed(lambda step=step: step(ref), args.repeats)
            t_ours = timed(lambda step=step: step(ours), args.repeats)
            print(f"| {name} | {label} | {1000 * t_ref:.1f} | {1000 * t_ours:.1f} | {t_ref / t_ours:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
