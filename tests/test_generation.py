"""Batched greedy generation equals one-by-one generation (user-pains F6); answer scoring."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_formats.schema import Conversation, Message, read_jsonl
from finetune.generation import generate_answers, normalize_answer, score
from finetune.tokenization import build_tiny_tokenizer

from .conftest import build_tiny_model

DATA = Path(__file__).parent / "assets" / "data" / "tiny.jsonl"


def _conversations() -> list[Conversation]:
    convs, problems = read_jsonl(DATA)
    assert not problems
    extra = Conversation("long", list(convs[0].images),
                         [Message("user", "Describe every detail of this picture, slowly and carefully please.")])
    return convs + [extra, convs[2]]


def test_batch_equals_single(version):
    model, tok = build_tiny_model(version), build_tiny_tokenizer(version)
    convs = _conversations()
    batched = generate_answers(model, tok, convs, template_version="chat", max_new_tokens=4, batch_size=5)
    single = [generate_answers(model, tok, [c], template_version="chat", max_new_tokens=4, batch_size=1)[0]
              for c in convs]
    assert batched == single
    assert all(isinstance(a, str) for a in batched) and any(batched)


def test_stream_receives_tokens():
    model, tok = build_tiny_model(2), build_tiny_tokenizer(2)
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    generate_answers(model, tok, _conversations()[:1], template_version="chat", max_new_tokens=3, stream=Recorder())
    assert seen[-1] == "end" and len(seen) >= 3


def test_score_exact_and_boxes():
    assert normalize_answer("  A  Red\nsquare ") == "a red square"
    res = score(["a red square", "blue"], ["A red  square", "Red"])
    assert res == {"n": 2, "exact_match": 0.5}
    res = score(["it is [[100,100,500,500]]", "nothing", "at [[0,0,10,10]]"],
                ["there [[110,100,500,520]]", "there [[0,0,999,999]]", "at [[600,600,900,900]]"])
    assert res["n_box"] == 3
    assert res["box_parse_rate"] == pytest.approx(2 / 3)
    assert res["iou@0.5"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
