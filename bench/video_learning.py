"""Proof of learning for CogVLM2-Video: a tiny random model learns "what colour comes first / last?" from video.

Synthetic clips (written with PyAV): `frames` solid-colour frames (jittered shade, pixel noise), each frame a
different colour. Half the questions ask for the first colour, half for the last; the answer is the colour name.
A tiny random CogVLM2-Video model (make-tiny layout, 56-px frames, `chat` template with time-index tokens) is
scored on held-out clips by ranking the candidate colours by likelihood (chance = 1 / colours), trained with
LoRA on the language weights + the vision adapter (no vision experts exist in this family) and `lm_head`
saved, through the kit's video processor and collator (frames decoded once, cached), then scored again.

    .venv/bin/python bench/video_learning.py [--train 480 --eval 60 --steps 200]

Prints accuracy before -> after, per question type, and the wall time. CPU only, a couple of minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 220, 50)}
QUESTIONS = {"first": "What colour comes first?", "last": "What colour comes last?"}


def write_clip(path: Path, colours: list[str], rng: random.Random, size: int = 56) -> None:
    """One frame per colour (1 fps), each a jittered shade with pixel noise."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    nrng = np.random.default_rng(rng.randrange(2**32))
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for name in colours:
            base = np.array([max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[name]])
            img = np.clip(base + nrng.integers(-30, 31, size=(size, size, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_task(folder: Path, n_train: int, n_eval: int, frames: int, seed: int,
               kinds: tuple[str, ...] = ("first", "last"), names: list[str] | None = None) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl in the cogtune schema with a `videos` field; clips beside them."""
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        rows = []
        for i in range(n):
            colours = rng.sample(names or list(COLOURS), frames)
            kind = kinds[i % len(kinds)]
            name = f"clips/{split}_{i:04d}.mp4"
            write_clip(folder / name, colours, rng)
            rows.append({"id": f"{split}-{i}-{kind}", "videos": [name], "messages": [
                {"role": "user", "content": "<video>" + QUESTIONS[kind]},
                {"role": "assistant", "content": colours[0] if kind == "first" else colours[-1]}]})
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths["train"], paths["eval"]


def ranking_accuracy(model: Any, collator: Any, convs: list[Any], batch_size: int = 32,
                     names: list[str] | None = None) -> dict[str, float]:
    """Share of rows whose true colour has the best mean answer-token likelihood, overall and per question."""
    import torch

    from data_formats.schema import Message

    names = names or list(COLOURS)
    hits: dict[str, list[bool]] = {"first": [], "last": []}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(convs), batch_size):
            chunk = convs[i:i + batch_size]
            variants = [type(c)(id=c.id, images=[], source=c.source, videos=c.videos,
                                messages=[*c.messages[:-1], Message("assistant", n)]) for c in chunk for n in names]
            batch = collator(variants)
            labels = batch.pop("labels")
            batch.pop("position_ids")
            logits = model(**batch, loss_only=False).logits[:, :-1]  # (B, L-1, V)
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
            keep = target != -100
            score = -(nll * keep).sum(1) / keep.sum(1)  # (B,) mean log-likelihood of answer + EOS
            for j, c in enumerate(chunk):
                best = int(score[j * len(names):(j + 1) * len(names)].argmax())
                hits[c.id.rsplit("-", 1)[1]].append(names[best] == c.messages[-1].content)
    every = hits["first"] + hits["last"]
    return {"all": sum(every) / len(every), **{k: sum(v) / len(v) for k, v in hits.items() if v}}


def run(folder: Path, n_train: int = 240, n_eval: int = 60, frames: int = 3, steps: int = 150, batch: int = 16,
        lr: float = 3e-3, seed: int = 0, log: Any = print, colours: int = len(COLOURS),
        kinds: tuple[str, ...] = ("first", "last")) -> tuple[dict[str, float], dict[str, float]]:
    """Write the task and a tiny model, measure, train LoRA, measure again; returns (before, after)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from data_formats.schema import read_jsonl
    from finetune.models.cogvlm.processing import CogVLMCollator
    from finetune.models.cogvlm2_video.configuration import tiny_video_config
    from finetune.models.cogvlm2_video.modeling import CogVLMVideoForCausalLM
    from finetune.models.cogvlm2_video.processing import CogVLMVideoProcessor
    from finetune.tokenization import build_tiny_tokenizer

    torch.manual_seed(seed)
    names = list(COLOURS)[:colours]
    train_path, eval_path = write_task(folder, n_train, n_eval, frames, seed, kinds, names)
    train, p1 = read_jsonl(train_path)
    held_out, p2 = read_jsonl(eval_path)
    assert not p1 and not p2, (p1 + p2)[:3]
    tok = build_tiny_tokenizer(2)
    config = tiny_video_config(template_version="chat")
    model = CogVLMVideoForCausalLM(config)
    processor = CogVLMVideoProcessor.from_config(config, tok, template_version="chat", last_turn_only=True,
                                                 cache_dir=folder / "frame-cache")
    collator = CogVLMCollator(processor)
    before = ranking_accuracy(model, collator, held_out, names=names)
    log(f"[video] {n_train} training / {n_eval} held-out clips, {frames} frames each, {len(names)} colours "
        f"(chance {100 / len(names):.0f}%); accuracy BEFORE {_show(before)}")
    from finetune.targets import resolve_targets

    # The kit's presets: the language weights (every token goes through them) and the vision adapter.
    pattern, _, _ = resolve_targets(["language_expert", "glu_adapter"], model)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=pattern,
                                                  modules_to_save=["lm_head"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    rng = random.Random(seed)
    encoded = [collator.encode(c) for c in train]  # reads timestamps; each clip is decoded once, then cached
    t0, losses = time.time(), []
    peft_model.train()
    for step in range(steps):
        items = rng.sample(encoded, batch)
        inputs = collator(items)
        inputs.pop("position_ids")
        loss = peft_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"[video] step {step + 1}/{steps} loss {np.mean(losses[-10:]):.3f} ({time.time() - t0:.0f}s)")
    after = ranking_accuracy(peft_model, collator, held_out, names=names)
    log(f"[video] accuracy AFTER {_show(after)}; frames decoded {processor.cache.decodes} times for "
        f"{n_train + n_eval} clips over {steps} steps")
    return before, after


def _show(acc: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items() if k != "all")
    return f"{100 * acc['all']:.1f}% ({parts})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/video-learning", help="folder for clips, rows and the frame cache")
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=60)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    before, after = run(Path(args.out), args.train, args.eval, args.frames, args.steps, lr=args.lr, seed=args.seed)
    print(f"[video] held-out accuracy {100 * before['all']:.1f}% -> {100 * after['all']:.1f}% in "
          f"{time.time() - t0:.0f}s")
    return 0 if after["all"] >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
