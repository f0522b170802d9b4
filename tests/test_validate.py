"""`cogtune validate` and `load_and_validate`: every problem at once, exit codes, token lengths, no tracebacks."""

import json
import shutil
from pathlib import Path

import pytest

from finetune.validate import DataValidationError, load_and_validate, main

DATA = Path(__file__).parent / "assets" / "data"
BAD = DATA / "bad_rows.jsonl"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """config.json + tokenizer only: validation never needs weights."""
    from finetune.tiny import tiny_config
    from finetune.tokenization import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny2")
    tiny_config(2).save_pretrained(folder)
    build_tiny_tokenizer(2).save_pretrained(folder)
    return folder


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.out, out.err


def test_bad_rows_every_problem_one_line_each(capsys):
    rc, out, err = _run(capsys, BAD, "--model", "cogvlm-chat")
    assert rc == 1
    n_rows = len(BAD.read_text().splitlines())
    problem_lines = [line for line in out.splitlines() if line.startswith(f"{BAD}:")]
    assert [int(line.split(":")[1]) for line in problem_lines] == list(range(1, n_rows + 1))
    for line in problem_lines:  # file:line: field: what; fix
        _, lineno, fld, rest = line.split(":", 3)
        assert lineno.isdigit() and fld.strip() and "; " in rest
    assert f"{n_rows} rows in {BAD}: 0 valid, {n_rows} with errors" in out
    assert "1227 tokens per image" in out
    assert "token lengths need a tokenizer" in out and "--tokenizer-dir" in out


def test_clean_file_with_checkpoint_reports_lengths(capsys, tiny_ckpt):
    rc, out, err = _run(capsys, DATA / "tiny.jsonl", "--model", tiny_ckpt, "--max-length", "40")
    assert rc == 0, out
    assert ": 3 valid, 0 with errors" in out
    line = next(x for x in out.splitlines() if x.startswith("token lengths ("))
    assert "min " in line and "median " in line and "p95 " in line and "max " in line
    assert "at --max-length 40:" in out and "1 rows dropped entirely" in out


def test_truncation_counts_history_drops(tmp_path, capsys, tiny_ckpt):
    long_turn = [{"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "ok"}]
    row = {"messages": long_turn + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    rc, out, _ = _run(capsys, path, "--model", tiny_ckpt, "--max-length", "30")
    assert rc == 0 and "1 rows truncated" in out and "0 rows dropped" in out


def test_max_images_option(tmp_path, capsys):
    shutil.copy(DATA / "images" / "red.png", tmp_path / "a.png")
    row = {"images": ["a.png", "a.png"], "messages": [{"role": "user", "content": "<image> vs <image>"},
                                                      {"role": "assistant", "content": "same"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert _run(capsys, path, "--model", "cogvlm2-llama3-chat-19b")[0] == 1
    assert _run(capsys, path, "--model", "cogvlm2-llama3-chat-19b", "--max-images", "2")[0] == 0


def test_unknown_model_and_missing_file(tmp_path, capsys):
    rc, out, err = _run(capsys, BAD, "--model", "cogvlm-chatt")
    assert rc == 2 and "did you mean" in err.lower()
    rc, out, err = _run(capsys, tmp_path / "nope.jsonl", "--model", "cogvlm-chat")
    assert rc == 1 and "nope.jsonl: file: not found" in out


def test_cogvlm1_folder_without_tokenizer_still_checks(tmp_path, capsys):
    from finetune.tiny import tiny_config

    tiny_config(1).save_pretrained(tmp_path)
    rc, out, _ = _run(capsys, DATA / "tiny.jsonl", "--model", tmp_path)
    assert rc == 0 and "token lengths need a tokenizer" in out and "vicuna" in out.lower()


def test_load_and_validate(tmp_path):
    with pytest.raises(DataValidationError) as info:
        load_and_validate(BAD)
    # one problem per row, the corrupt image of line 6 included (training decodes every image too)
    lines = [x for x in str(info.value).splitlines() if x.startswith(f"{BAD}:")]
    assert [int(x.split(":")[1]) for x in lines] == list(range(1, len(BAD.read_text().splitlines()) + 1))
    assert f"{BAD}:6: images[0]: cannot decode image" in str(info.value)

    mixed = tmp_path / "mixed.jsonl"
    shutil.copytree(DATA / "images", tmp_path / "images")
    mixed.write_text((DATA / "tiny.jsonl").read_text() + BAD.read_text().splitlines()[1] + "\n")
    convs, report = load_and_validate(mixed, skip_invalid=True)
    assert len(convs) == 3 and report.invalid_rows == 1
    assert "1 invalid rows skipped" in str(report)

    convs, report = load_and_validate(DATA / "tiny.jsonl")
    assert len(convs) == 3 and not report and str(report) == ""


def test_cli_dispatch(capsys):
    from finetune.cli import main as cli

    assert cli(["validate", str(BAD), "--model", "cogvlm-chat", "--no-decode"]) == 1
    assert "bad_rows.jsonl:6" not in capsys.readouterr().out  # corrupt image not decoded with --no-decode
