"""Converters, each on a small fixture written from the format's public documentation."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_formats.convert import main
from data_formats.schema import read_jsonl

DATA = Path(__file__).parent / "assets" / "data"
RED = str((DATA / "images" / "red.png").resolve())
BLUE = str((DATA / "images" / "blue.png").resolve())


def _convert(tmp_path, capsys, fmt, src, *extra):
    out = tmp_path / "out.jsonl"
    rc = main(["--from", fmt, str(src), "--out", str(out), "--quiet", *extra])
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    # every written row is valid canonical data (the fixtures' images lie outside tmp_path)
    convs, problems = read_jsonl(out, allow_outside_images=True) if out.exists() else ([], [])
    assert problems == [] and len(convs) == len(rows)
    return rc, rows, captured.out, captured.err


def test_llava(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "llava", DATA / "llava.json")
    assert rc == 0
    assert rows[0] == {"id": "000000033471", "images": [RED], "messages": [
        {"role": "user", "content": "<image>\nWhat colour is the square?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "Is it large?"},
        {"role": "assistant", "content": "No, it is tiny."}]}
    assert rows[1]["images"] == []
    assert "2 rows written" in out and "2 skipped (unknown role: 1, missing image: 1)" in out
    # each skipped row is reported at the line where its element starts in the JSON array
    assert f"{DATA / 'llava.json'}:37: conversations[1].from: unknown role 'robot'" in err
    assert f"{DATA / 'llava.json'}:51: images[0]: image not found" in err


def test_llava_role_map_and_image_root(tmp_path, capsys):
    shutil.copy(DATA / "llava.json", tmp_path / "llava.json")
    _, rows, out, _ = _convert(tmp_path, capsys, "llava", tmp_path / "llava.json", "--image-root", str(DATA),
                               "--role-map", "robot=assistant")
    assert len(rows) == 3 and rows[0]["images"] == [RED]


def test_sharegpt(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "sharegpt", DATA / "sharegpt.jsonl")
    assert rows[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[0]["images"] == [BLUE]
    assert rows[1]["id"] == "s2" and rows[2]["messages"][1]["role"] == "assistant"
    assert "sharegpt.jsonl:4: conversations[1].from: unknown role 'chatbot'" in err
    _, rows, _, _ = _convert(tmp_path, capsys, "sharegpt", DATA / "sharegpt.jsonl", "--role-map", "chatbot=assistant")
    assert len(rows) == 4


def test_cogvlm_sft_any_extension(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "cogvlm-sft", DATA / "cogvlm_sft")
    assert [r["id"] for r in rows] == ["cogvlm_sft/0001", "cogvlm_sft/0002"]
    assert rows[1]["images"][0].endswith("0002.jpg")
    assert "label without image: 1" in out and "image without label: 1" in out
    assert "0003.json:1: images: no image named 0003.*" in err


def test_cogvlm_sft_parent_folder_and_zh_labels(tmp_path, capsys):
    root = tmp_path / "311k"
    shutil.copytree(DATA / "cogvlm_sft", root / "subset_a")
    (root / "subset_a" / "labels_en").rename(root / "subset_a" / "labels_zh")
    _, rows, _, _ = _convert(tmp_path, capsys, "cogvlm-sft", root)
    assert [r["id"] for r in rows] == ["subset_a/0001", "subset_a/0002"]
    # images under the output folder are written relative to it
    assert rows[0]["images"] == ["311k/subset_a/images/0001.png"]


def test_swift_both_row_forms(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "swift", DATA / "swift.jsonl")
    assert rows[0]["messages"][0]["role"] == "system" and rows[0]["images"] == [RED]
    assert rows[1]["messages"] == [
        {"role": "system", "content": "Answer in two words."},
        {"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Still blue."}]
    assert rows[2]["messages"][1]["content"] == "杭州。"
    assert "swift.jsonl:4: messages: no assistant turn" in err


def test_openai_content_blocks(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "openai", DATA / "openai.jsonl")
    assert rows[0]["messages"][0] == {"role": "system", "content": "Describe images."}
    assert rows[0]["messages"][1]["content"] == "What is this?\n<image>" and rows[0]["images"] == [RED]
    assert rows[1]["images"][0].startswith("data:image/png;base64,")
    assert rows[1]["messages"][1]["content"] == "Red."
    assert "openai.jsonl:3: messages[0].content[0].image_url" in err and "web URL: 1" in out


def test_glm_image_on_user_turn(tmp_path, capsys):
    rc, rows, out, err = _convert(tmp_path, capsys, "glm", DATA / "glm.jsonl")
    assert rows[0]["images"] == [RED] and "<image>" not in rows[0]["messages"][0]["content"]
    assert rows[1]["messages"][2]["content"] == "<image>What is here?"  # image on a later turn gets a marker
    assert "box=[[100,200,300,400]]" in rows[2]["messages"][1]["content"]
    assert "glm.jsonl:4: messages[0].role: unsupported role 'observation'" in err


def test_hf_save_to_disk_question_answer(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4), (i * 60, 0, 0)) for i in range(3)],
                                     "question": ["What colour?", "How big?", None],
                                     "answer": ["Red.", "Tiny.", "x"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    rc, rows, out, err = _convert(tmp_path, capsys, "hf", tmp_path / "ds")
    assert [r["messages"][0]["content"] for r in rows] == ["What colour?", "How big?"]
    assert rows[0]["images"] == ["out_images/0000000.png"]
    assert Image.open(tmp_path / "out_images" / "0000001.png").getpixel((0, 0)) == (60, 0, 0)
    assert "ds[2]" in err and "1 skipped" in out


def test_hf_parquet_messages_with_typed_blocks(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({
        "images": [[Image.new("RGB", (4, 4), (0, 0, 255))]],
        "messages": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]]})
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    rc, rows, out, err = _convert(tmp_path, capsys, "hf", tmp_path / "train.parquet")
    assert rows[0]["messages"] == [{"role": "user", "content": "<image>\nColour?"},
                                   {"role": "assistant", "content": "Blue."}]
    assert len(rows[0]["images"]) == 1


def test_hf_caption_needs_prompt(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4))], "caption": [["A black square.", "Dark."]]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "caps"))
    rc, rows, out, err = _convert(tmp_path, capsys, "hf", tmp_path / "caps")
    assert rows == [] and rc == 1 and "--prompt" in err
    rc, rows, out, err = _convert(tmp_path, capsys, "hf", tmp_path / "caps", "--prompt", "Describe the image.")
    assert rows[0]["messages"][1]["content"] == "A black square." and rows[0]["images"]


def test_bad_json_array_reports_position(tmp_path, capsys):
    src = tmp_path / "broken.json"
    good = '{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}'
    src.write_text('[\n ' + good + ',\n {"id": 2, "conversations": [\n]')
    rc, rows, out, err = _convert(tmp_path, capsys, "llava", src)
    assert f"{src}:4: file: not valid JSON" in err
    # rows after the break were never read: a partial result is not published (exit 1, no file)
    assert rc == 1 and rows == [] and not (tmp_path / "out.jsonl").exists() and "could not be read to the end" in err


def test_missing_input(tmp_path, capsys):
    assert main(["--from", "llava", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
