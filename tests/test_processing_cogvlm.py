"""Templates, CogVLMProcessor.encode (labels turn by turn, truncation, multi-image) and the image transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_formats.schema import Conversation, Message
from finetune.families import CLIP_MEAN, CLIP_STD
from finetune.models.cogvlm.processing import (
    IGNORE_INDEX,
    CogVLMProcessor,
    RowTooLong,
    build_prompt,
    get_template,
    load_and_transform_image,
)
from finetune.tokenization import build_tiny_tokenizer

SPAN = 6  # tiny checkpoints' image span (2x2 patches + boi + eoi)


def conv(*turns: str, images: tuple[str, ...] = ("img.png",), system: str | None = None) -> Conversation:
    msgs = [Message("system", system)] if system else []
    msgs += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return Conversation("row", list(images), msgs, "data.jsonl:1")


def enc(c: Conversation, version: int = 2, template: str = "chat", add_generation_prompt: bool = False, **kw):
    tok = build_tiny_tokenizer(version)
    processor = CogVLMProcessor(tok, image_tokens=SPAN, image_size=28, template_version=template, **kw)
    return processor.encode(c, add_generation_prompt=add_generation_prompt)


# --- templates (docs/architecture.md §14) -------------------------------------------------------------------

HIST = [("What color?", "red"), ("Where?", "left")]


@pytest.mark.parametrize("family,template,expected", [
    ("cogvlm", "base", "How big?"),
    ("cogvlm", "chat", "Question: What color? Answer: red\nQuestion: Where? Answer: left\nQuestion: How big? Answer:"),
    ("cogvlm", "vqa",
     "Question: What color? Short answer: red\nQuestion: Where? Short answer: left\nQuestion: How big? Short answer:"),
    ("cogagent", "base", "How big?"),
    ("cogagent", "chat", " [INST] What color? [/INST] red [INST] Where? [/INST] left [INST] How big? [/INST] "),
    ("cogagent", "chat_old",
     "<EOI>Question: What color? Answer: red\nQuestion: Where? Answer: left\nQuestion: How big? Answer:"),
    ("cogagent", "vqa", "<EOI>Question: How big? Short answer:"),
])
def test_template_strings(family, template, expected):
    assert build_prompt("How big?", HIST, template, family) == expected


def test_template_strings_without_history_and_cogvlm2_alias():
    assert build_prompt("Hi {x}?", [], "chat", 2) == "Question: Hi {x}? Answer:"  # braces are not format fields
    assert build_prompt("Hi", [], "chat", "cogagent") == " [INST] Hi [/INST] "
    assert build_prompt("Hi", [], "chat", "cogvlm", system="Be brief.") == "Be brief.\nQuestion: Hi Answer:"


def test_unknown_template_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: base, chat, vqa"):
        get_template("llama3", "cogvlm")
    with pytest.raises(ValueError, match="base, chat, chat_old, vqa"):
        get_template("chat_v2", "cogagent")


# --- encode_conversation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("template", ["base", "chat", "vqa"])
def test_single_turn_equals_official_layout(version, template):
    tok = build_tiny_tokenizer(version)
    e = enc(conv("<image>\nWhat color is the shape?", "red"), version, template)
    prompt = tok.encode(build_prompt("What color is the shape?", [], template), add_special_tokens=False)
    answer = tok.encode("red", add_special_tokens=False) + [tok.eos_token_id]
    assert e.input_ids == [tok.bos_token_id] + [tok.pad_token_id] * SPAN + prompt + answer
    assert e.token_type_ids == [0] + [1] * SPAN + [0] * (len(prompt) + len(answer))
    assert e.labels == [IGNORE_INDEX] * (1 + SPAN + len(prompt)) + answer
    assert e.images == ["img.png"] and e.dropped_turns == 0


def _answer_spans(labels: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for x in labels + [IGNORE_INDEX]:
        if x != IGNORE_INDEX:
            cur.append(x)
        elif cur:
            spans.append(cur)
            cur = []
    return spans


def test_labels_every_turn_and_last_only():
    tok = build_tiny_tokenizer(2)
    c = conv("<image>What color?", "red", "Where is it?", "left", "How big?", "small")
    ans = [tok.encode(a, add_special_tokens=False) + [tok.eos_token_id] for a in ("red", "left", "small")]
    assert _answer_spans(enc(c).labels) == ans
    last = enc(c, last_turn_only=True)
    assert _answer_spans(last.labels) == ans[-1:]
    assert last.input_ids == enc(c).input_ids  # same tokens, only the loss mask differs


def test_multi_turn_rendering_and_training_equals_inference():
    """Turn k's context in a training row is exactly what generation with that history sees."""
    tok = build_tiny_tokenizer(2)
    turns = ("<image>What color?", "red", "Where is it?", "left", "How big?", "small")
    full = enc(conv(*turns))
    text = tok.decode(full.input_ids[1 + SPAN:])
    assert text == ("Question: What color? Answer:red<|end_of_text|>"
                    "\nQuestion: Where is it? Answer:left<|end_of_text|>"
                    "\nQuestion: How big? Answer:small<|end_of_text|>")
    for k in range(3):
        gen = enc(conv(*turns[: 2 * k + 1]), add_generation_prompt=True)
        answer_start = [i for i, x in enumerate(full.labels) if x != IGNORE_INDEX][0] if k == 0 else None
        n = len(gen.input_ids)
        assert full.input_ids[:n] == gen.input_ids and full.token_type_ids[:n] == gen.token_type_ids
        assert all(x == IGNORE_INDEX for x in gen.labels)
        assert full.labels[n] != IGNORE_INDEX  # the very next token is the turn's (trained) answer
        if answer_start is not None:
            assert n == answer_start
    # A trailing reference answer is ignored in generation mode (eval rows).
    assert enc(conv(*turns), add_generation_prompt=True).input_ids == enc(
        conv(*turns[:5]), add_generation_prompt=True).input_ids


def test_system_prompt_is_plain_text_before_first_question():
    tok = build_tiny_tokenizer(1)
    e = enc(conv("<image>What color?", "red", "Where?", "left", system="Answer briefly."), 1)
    prompt_end = e.labels.index(next(x for x in e.labels if x != IGNORE_INDEX))
    assert tok.decode(e.input_ids[1 + SPAN:prompt_end]) == "Answer briefly.\nQuestion: What color? Answer:"


def test_image_span_only_vision_and_marker_text_removed():
    tok = build_tiny_tokenizer(1)
    e = enc(conv("What is <image> in the picture?", "red"), 1)
    assert e.token_type_ids[1:1 + SPAN] == [1] * SPAN and sum(e.token_type_ids) == SPAN
    assert "<image>" not in tok.decode(e.input_ids)
    assert tok.decode(e.input_ids[1 + SPAN:]).startswith("Question: What is in the picture? Answer:")


def test_text_only_row_has_no_vision_tokens():
    e = enc(conv("Hello?", "hi", images=()))
    assert sum(e.token_type_ids) == 0 and e.images == [] and e.input_ids[0] == 508


def test_truncation_drops_oldest_turns_never_the_image():
    c = conv("<image>What color?", "red", "Where is it?", "left", "How big?", "small")
    full = enc(c)
    last_alone = enc(conv("<image>How big?", "small"))
    assert enc(c, max_length=len(full)).dropped_turns == 0
    one = enc(c, max_length=len(full) - 1)
    assert one.dropped_turns == 1 and len(one) <= len(full) - 1
    assert one.token_type_ids[1:1 + SPAN] == [1] * SPAN and one.images == ["img.png"]
    # Turn 1 becomes the first turn: rendered with the first-turn prompt (no leading "\n").
    assert one.input_ids == enc(conv("<image>Where is it?", "left", "How big?", "small")).input_ids
    two = enc(c, max_length=len(last_alone))
    assert two.dropped_turns == 2 and two.input_ids == last_alone.input_ids
    with pytest.raises(RowTooLong) as e:
        enc(c, max_length=len(last_alone) - 1)
    assert e.value.length == len(last_alone) and "max_length" in str(e.value) and "data.jsonl:1" in str(e.value)
    # The image span alone is longer than max_length: the row goes, nothing is cut.
    with pytest.raises(RowTooLong):
        enc(conv("<image>Hi", "red"), max_length=SPAN)


def test_multi_image_needs_flag_and_keeps_spans_apart():
    c = conv("Compare <image><image> and <image>.", "same", images=("a.png", "b.png", "c.png"))
    with pytest.raises(ValueError, match="allow_multi_image"):
        enc(c)
    tok = build_tiny_tokenizer(2)
    e = enc(c, allow_multi_image=True)
    assert e.images == ["a.png", "b.png", "c.png"] and sum(e.token_type_ids) == 3 * SPAN
    tt = e.token_type_ids
    runs = [i for i in range(1, len(tt)) if tt[i] == 1 and tt[i - 1] == 0]
    assert len(runs) == 3  # adjacent markers got a LANGUAGE separator: three distinct VISION runs
    first = runs[0]
    assert tok.decode(e.input_ids[1:first]) == "Question: Compare "
    assert tok.decode(e.input_ids[first + SPAN:runs[1]]) == "\n"  # the separator


def test_multi_image_truncation_drops_whole_spans():
    c = conv("<image>What is this?", "red", "And <image>?", "blue", images=("a.png", "b.png"))
    full = enc(c, allow_multi_image=True)
    cut = enc(c, allow_multi_image=True, max_length=len(full) - 1)
    assert cut.dropped_turns == 1 and cut.images == ["b.png"] and sum(cut.token_type_ids) == SPAN


def test_bad_rows():
    with pytest.raises(ValueError, match="no answer"):
        enc(conv("<image>What?"))
    with pytest.raises(ValueError, match="markers but"):
        enc(conv("<image><image>What?", "red"), allow_multi_image=True)


# --- image transform (docs/architecture.md §13) -------------------------------------------------------------


def test_solid_colour_image_normalises_per_channel(tmp_path):
    path = tmp_path / "solid.png"
    Image.new("RGB", (40, 24), (255, 128, 0)).save(path)
    x = load_and_transform_image(str(path), 28)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    for c, value in enumerate((255, 128, 0)):
        expected = (value / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
        torch.testing.assert_close(x[c], torch.full((28, 28), expected), atol=1e-5, rtol=0)


def test_transform_matches_pil_bicubic_and_handles_alpha(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "noise.png")
    x = load_and_transform_image(str(tmp_path / "noise.png"), 14)
    ref = np.asarray(Image.fromarray(arr).resize((14, 14), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    torch.testing.assert_close(x, torch.from_numpy(ref.transpose(2, 0, 1)))
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    y = load_and_transform_image(str(tmp_path / "clear.png"), 14)
    torch.testing.assert_close(y[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
