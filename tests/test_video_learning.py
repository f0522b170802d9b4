"""A tiny CogVLM2-Video model learns which colour comes first in short synthetic clips, through LoRA on the
language weights (bench/video_learning.py at a smaller size, with a real threshold)."""

from __future__ import annotations

import torch

from bench.video_learning import run


def test_lora_learns_the_first_colour_of_a_clip(tmp_path):
    # One intra-op thread: the tiny matmuls gain nothing from more, and on a shared 2-core machine the thread
    # pool's contention made this test ~6x slower (40 s+ against 7 s), with the same numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before, after = run(tmp_path, n_train=48, n_eval=24, frames=2, steps=40, batch=8, lr=5e-3, seed=0,
                            log=lambda *_: None, colours=3, kinds=("first",))
    finally:
        torch.set_num_threads(threads)
    assert before["all"] <= 0.6  # a random model is near chance (1/3)
    assert after["all"] >= 0.9, (before, after)
