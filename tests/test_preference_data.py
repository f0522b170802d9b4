"""Preference rows: validation (file:line, every problem at once) and the RLAIF-V / ShareGPT-pair converters."""

from __future__ import annotations

import json
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
    assert any("`cogtune convert --from sharegpt-pairs`" in t for t in line6)  # the pair converter, not SFT's
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


# ---- `cogtune validate` and `cogtune convert` on preference files ----

def _validate(capsys, *argv) -> tuple[int, str]:
    from finetune.validate import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def test_validate_cli_reports_pair_problems_and_both_token_lengths(tiny_checkpoints, capsys):
    rc, out = _validate(capsys, DATA / "preference.jsonl", "--model", tiny_checkpoints[2], "--max-length", 4096)
    src = str(DATA / "preference.jsonl")
    assert rc == 1
    # the preference checks ran (not the SFT ones, which would call every row "no answer"): file:line, all at once
    assert f"{src}:3: messages[1]: prompt ends with an assistant turn" in out
    assert f"{src}:4: chosen: is empty" in out and f"{src}:4: rejected: is list" in out
    assert f"{src}:7: line: not valid JSON" in out
    assert f"7 rows in {src}: 2 valid, 5 with errors" in out
    assert "token lengths (2 pairs" in out and "prompt+chosen:" in out and "prompt+rejected:" in out
    assert "0 pairs truncated" in out


def _history_pairs(tmp_path):
    """One pair with a long history: a short chosen answer and a long rejected one."""
    history = [{"role": "user", "content": "Tell me about the weather in the mountains " * 3},
               {"role": "assistant", "content": "It is cold and windy up there most of the year " * 3},
               {"role": "user", "content": "And in the valley?"}]
    row = {"id": "long", "messages": history, "chosen": "Mild.",
           "rejected": "Mild in summer, foggy in autumn, and snowy for most of the winter months " * 2}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_validate_cli_warns_when_a_pair_drops_different_numbers_of_turns(tiny_checkpoints, tmp_path, capsys):
    from data_formats.preference import read_pairs
    from finetune.dpo_data import pair_conversations
    from finetune.models.cogvlm.processing import CogVLMProcessor

    path = _history_pairs(tmp_path)
    processor = CogVLMProcessor.from_pretrained(tiny_checkpoints[2]).with_settings(last_turn_only=True)
    chosen, rejected = pair_conversations(read_pairs(path)[0][0])
    n_chosen = len(processor.encode(chosen).input_ids)
    n_rejected = len(processor.encode(rejected).input_ids)
    assert n_rejected > n_chosen
    # prompt+chosen fits whole, prompt+rejected must drop the old turn
    rc, out = _validate(capsys, path, "--model", tiny_checkpoints[2], "--max-length", n_chosen)
    assert rc == 0  # a warning, not an error
    assert (f"{path}:1: row: warning: at max_length {n_chosen} prompt+chosen ({n_chosen} tokens) drops 0 old turn(s) "
            f"but prompt+rejected ({n_rejected} tokens) drops 1") in out
    assert "1 pairs truncated (oldest history turns dropped), 1 of them unevenly" in out
    assert "training drops 1 from both, so that both answers follow the same prompt" in out
    rc, out = _validate(capsys, path, "--model", tiny_checkpoints[2], "--max-length", n_rejected)
    assert "0 pairs truncated" in out and "drops 0 old turn(s)" not in out


def test_training_encoding_drops_as_many_turns_from_both_sides(tiny_checkpoints, tmp_path):
    """At a max_length where only prompt+rejected must drop the old turn, both sides drop it: one shared prompt."""
    from data_formats.preference import read_pairs
    from finetune.dpo_data import encode_pair
    from finetune.models.cogvlm.processing import CogVLMProcessor

    pair = read_pairs(_history_pairs(tmp_path))[0][0]
    processor = CogVLMProcessor.from_pretrained(tiny_checkpoints[2])
    tok = processor.tokenizer
    whole = encode_pair(pair, processor)
    n_chosen, n_rejected = len(whole["chosen_input_ids"]), len(whole["rejected_input_ids"])
    cut = encode_pair(pair, processor.with_settings(max_length=n_chosen))
    assert cut["chosen_dropped_turns"] == cut["rejected_dropped_turns"] == 1
    assert len(cut["chosen_input_ids"]) < n_chosen and len(cut["rejected_input_ids"]) <= n_chosen < n_rejected
    answer = len(tok.encode(pair.chosen, add_special_tokens=False)) + 1  # + EOS
    prompt = cut["chosen_input_ids"][:-answer]
    assert cut["rejected_input_ids"][:len(prompt)] == prompt  # the same prompt tokens on both sides
    assert "mountains" in tok.decode(whole["chosen_input_ids"]) and "mountains" not in tok.decode(prompt)
    assert "And in the valley?" in tok.decode(prompt)  # the old turn is gone, the last one stays


def _convert(capsys, *argv) -> tuple[int, str, str]:
    from data_formats.convert import main

    rc = main([str(a) for a in argv] + ["--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_convert_cli_lists_and_runs_the_preference_converters(tmp_path, capsys):
    from data_formats.convert import build_parser

    choices = next(a.choices for a in build_parser()._actions if a.dest == "fmt")
    assert "rlaif-v" in choices and "sharegpt-pairs" in choices
    out_file = tmp_path / "rlaif.jsonl"
    rc, out, err = _convert(capsys, "--from", "rlaif-v", DATA / "rlaif_v.jsonl", "--out", out_file,
                            "--allow-outside-images")
    assert rc == 0 and "1 rows written" in out and "2 skipped (missing question: 1" in out
    assert f"{DATA / 'rlaif_v.jsonl'}:2: question: missing" in err
    assert "rlaif_v.jsonl:3: images[0]: image not found" in err
    pairs, problems = preference.read_pairs(out_file, allow_outside_images=True)
    assert not problems and pairs[0].chosen == "It is red." and pairs[0].prompt.messages[-1].role == "user"

    out_file = tmp_path / "data" / "pairs.jsonl"  # under the images' folder: relative paths are kept portable
    (tmp_path / "data").mkdir()
    import shutil

    shutil.copytree(DATA / "images", tmp_path / "data" / "images")
    shutil.copy(DATA / "sharegpt_pairs.json", tmp_path / "data")
    rc, out, err = _convert(capsys, "--from", "sharegpt-pairs", tmp_path / "data" / "sharegpt_pairs.json",
                            "--out", out_file)
    assert rc == 0 and "2 rows written" in out and "unknown role 'alien'" in err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert rows[0]["images"] == ["images/blue.png"] and rows[0]["chosen"] == "Blue."
    assert [m["role"] for m in rows[1]["messages"]] == ["user", "assistant", "user"]
    assert len(preference.read_pairs(out_file)[0]) == 2


def test_convert_cli_refuses_pairs_whose_images_lie_outside_the_input_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    row = {"idx": 1, "image": str(DATA / "images" / "red.png"), "question": "Q?", "chosen": "a", "rejected": "b"}
    (tmp_path / "in" / "rlaif.jsonl").write_text(json.dumps(row) + "\n")
    rc, _, err = _convert(capsys, "--from", "rlaif-v", tmp_path / "in" / "rlaif.jsonl", "--out", tmp_path / "o.jsonl")
    assert rc == 1 and "rlaif.jsonl:1: images[0]" in err and not (tmp_path / "o.jsonl").exists()
