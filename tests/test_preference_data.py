"""Preference rows: validation (file:line, every problem at once) and the RLAIF-V / ShareGPT-pair converters."""

from __future__ import annotations

from pathlib import Path

from data_formats import preference

DATA = Path(__file__).parent / "assets" / "data"


def test_validate_reports_every_problem_with_file_line():
    pairs, problems = preference.read_pairs(DATA / "preference.jsonl")
    assert [p.id for p in pairs] == ["ok-1", "ok-2"]
    assert pairs[0].chosen == "Red." and pairs[0].rejected == "Blue."
    assert pairs[0].prompt.images[0].endswith("images/red.png")
    assert pairs[1].prompt.messages[0].role == "system"
    text = [str(p) for p in problems if p.level == "error"]
    src = str(DATA / "preference.jsonl")
    # line 3: a prompt that already holds the answer
    assert any(t.startswith(f"{src}:3: messages[1]: prompt ends with an assistant turn") for t in text)
    # line 4: three problems at once (missing image, empty chosen, non-string rejected)
    line4 = [t for t in text if t.startswith(f"{src}:4:")]
    assert any("image not found" in t for t in line4)
    assert any(t.startswith(f"{src}:4: chosen: is empty") for t in line4)
    assert any(t.startswith(f"{src}:4: rejected: is list") for t in line4)
    assert any(t.startswith(f"{src}:5: rejected: is the same text as 'chosen'") for t in text)
    line6 = [t for t in text if t.startswith(f"{src}:6:")]
    assert any("'human'" in t for t in line6) and any(t.startswith(f"{src}:6: rejected: missing") for t in line6)
    assert any(t.startswith(f"{src}:7: line: not valid JSON") for t in text)


def test_pair_round_trips_to_canonical_json():
    pairs, _ = preference.read_pairs(DATA / "preference.jsonl")
    row = pairs[1].to_json()
    assert row["chosen"] == "Hi." and row["messages"][-1] == {"role": "user", "content": "Say hi."}
    again, problems = preference.parse_pair(row, "x:1", DATA)
    assert again is not None and not problems and again.to_json() == row


def test_rlaif_v_converter():
    records = list(preference.convert("rlaif-v", DATA / "rlaif_v.jsonl"))
    assert len(records) == 3
    src, pair, problems = records[0]
    assert src.endswith("rlaif_v.jsonl:1") and not problems
    assert pair.id == "7" and pair.chosen == "It is red." and pair.rejected.startswith("It is green")
    assert pair.prompt.messages[0].content == "What colour is the square?"
    assert len(pair.prompt.images) == 1 and \
        pair.prompt.images[0].endswith("images/red.png")
    assert records[1][1] is None and records[1][2][0].field == "question"
    assert records[2][1] is None and any("image not found" in p.message for p in records[2][2])


def test_sharegpt_pair_converter():
    records = list(preference.convert("sharegpt-pairs", DATA / "sharegpt_pairs.json"))
    assert len(records) == 3
    first = records[0][1]
    assert first is not None and first.chosen == "Blue." and first.rejected == "Red."
    assert [m.role for m in first.prompt.messages] == ["system", "user"]
    second = records[1][1]
    assert second is not None and [m.role for m in second.prompt.messages] == ["user", "assistant", "user"]
    assert second.chosen == "Goodbye."
    assert records[2][1] is None and "unknown role 'alien'" in records[2][2][0].message
    assert records[2][0].endswith("sharegpt_pairs.json:7")
