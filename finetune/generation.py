"""Batched greedy generation and answer scoring, shared by training eval, `cogtune predict` and `chat`.

Batches are LEFT padded by the collator (new tokens must follow every row's last real token) and carry
the attention mask, so padding is never attended (docs/architecture.md §17). Position ids are not taken from the
collator: the model rebuilds them at every step from token types and the mask, normalised so that a
left-padded row gets the same positions as the row alone. Hence a batch of N gives the same greedy
output as N batches of 1 (pinned by tests/test_generation.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from data_formats.boxes import iou, parse_boxes

from .models.cogvlm.processing import CogVLMCollator, CogVLMProcessor

# Model inputs the model rebuilds itself while generating: positions come from token types and the mask at
# every step (docs/architecture.md §17), so the collator's are not passed to generate().
DERIVED_AT_GENERATION = ("position_ids",)


def _param_dtype(model: Any, suffix: str) -> torch.dtype:
    """dtype of the first parameter whose name ends with `suffix` (first floating one as a fallback)."""
    floating = None
    for name, p in model.named_parameters():
        if name.endswith(suffix):
            return p.dtype
        if floating is None and p.is_floating_point():
            floating = p.dtype
    return floating or torch.float32


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids (CogVLM2: eos and <|eot_id|>) and the
    tokenizer's eos, so a checkpoint whose generation_config.json lacks one still stops."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def generation_input_names(names: Any) -> tuple[str, ...]:
    """The model inputs generate() takes: the model's `model_input_names` (a model, its class, or the names)
    minus those it derives itself (DERIVED_AT_GENERATION)."""
    names = getattr(names, "model_input_names", names)
    return tuple(n for n in names if n not in DERIVED_AT_GENERATION)


def prepare_batch(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Collator output -> generate() inputs on the model's device, for every input the model declares
    (`model_input_names`, less DERIVED_AT_GENERATION); absent or None inputs are left out; floating inputs
    (images) in the vision tower's dtype."""
    device = _device(model)
    out = {}
    for name in generation_input_names(model):
        value = batch.get(name)
        if value is None:
            continue
        if torch.is_tensor(value) and value.is_floating_point():
            value = value.to(device=device, dtype=_param_dtype(model, "patch_embedding.proj.weight"))
        elif torch.is_tensor(value):
            value = value.to(device)
        out[name] = value
    return out


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: CogVLMProcessor,
    conversations: Sequence[Any],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    stream: Any = None,
    progress: Any = None,
    synced: bool = False,
) -> list[str]:
    """Greedy answers to the last user turn of each conversation (a trailing reference answer is ignored).

    `processor` gives the template, image span and image transform; prompts are never truncated here
    (its max_length is a training setting).

    Rows are sorted by length so a batch holds similar lengths (less padding); answers come back in input
    order. `stream`: a transformers streamer (e.g. `TextStreamer`); streamers take one row, so generation then
    runs one conversation at a time. `progress`: called with the number of rows finished after each batch.
    `synced`: every rank of a sharded model (FSDP, ZeRO-3) generates together; ranks whose rows are finished
    keep stepping until all are (each forward gathers weights from every rank).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stream is not None:
        batch_size = 1
    tokenizer = processor.tokenizer
    collator = CogVLMCollator(processor.with_settings(max_length=None), padding_side="left",
                              add_generation_prompt=True)
    encoded = [collator.encode(c) for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    stops = stop_token_ids(model, tokenizer)
    pad = collator.pad_token_id
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = prepare_batch(model, collator([encoded[i] for i in idx]))
            width = inputs["input_ids"].shape[1]
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=stops, pad_token_id=pad, streamer=stream,
                                 temperature=None, top_p=None, top_k=None, synced_gpus=synced)
            for row, i in enumerate(idx):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    return answers


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Case and whitespace folded: "A  red\\nsquare " == "a red square"."""
    return re.sub(r"\s+", " ", text).strip().lower()


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact match (normalised); and for references holding Cog boxes `[[x0,y0,x1,y1]]`: parse rate and IoU@0.5.

    Box metrics count only rows whose reference has a box: `box_parse_rate` = share of those predictions
    with a parseable box, `iou@0.5` = share whose first predicted box overlaps the reference's first box
    with IoU >= 0.5 (an unparseable prediction counts as a miss), `mean_iou` over the same rows.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    n = len(references)
    exact = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    result: dict[str, Any] = {"n": n, "exact_match": exact / n if n else 0.0}
    parsed = hits = 0
    ious: list[float] = []
    for pred, ref in zip(predictions, references):
        ref_groups = parse_boxes(ref)
        if not ref_groups:
            continue
        pred_groups = parse_boxes(pred)
        if not pred_groups:
            ious.append(0.0)
            continue
        parsed += 1
        value = iou(pred_groups[0][0], ref_groups[0][0])
        ious.append(value)
        hits += value >= 0.5
    if ious:
        result.update({"n_box": len(ious), "box_parse_rate": parsed / len(ious), "iou@0.5": hits / len(ious),
                       "mean_iou": sum(ious) / len(ious)})
    return result
