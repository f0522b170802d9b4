"""Canonical schema: reading, every-problem validation, images, boxes in rows."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_formats import schema
from data_formats.schema import ImageError, load_image, read_jsonl, validate_rows, write_jsonl

DATA = Path(__file__).parent / "assets" / "data"


def _rows(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _png(tmp_path, name="a.png", size=(8, 8), mode="RGB", color=(255, 0, 0)):
    Image.new(mode, size, color).save(tmp_path / name)
    return tmp_path / name


def test_tiny_fixture_reads_clean():
    convs, problems = read_jsonl(DATA / "tiny.jsonl")
    assert problems == []
    assert [c.id for c in convs] == ["caption", "multi-turn", "text-only"]
    assert convs[0].images == [str((DATA / "images" / "red.png").resolve())]
    assert convs[0].source.endswith("tiny.jsonl:1")
    assert convs[1].messages[0].role == "system"
    assert convs[1].messages[-1].content == "It fills the picture [[000,000,999,999]]."
    assert convs[2].images == []


def test_bad_rows_one_problem_per_row():
    path = DATA / "bad_rows.jsonl"
    convs, problems = validate_rows(path.read_text().splitlines(), path=path)
    assert convs == []
    lines = [int(p.source.rsplit(":", 1)[1]) for p in problems]
    n_rows = len(path.read_text().splitlines())
    assert sorted(lines) == list(range(1, n_rows + 1)), [str(p) for p in problems]
    for p in problems:
        text = str(p)
        assert text.startswith(f"{path}:") and "; " in text and "\n" not in text


def test_problem_str_format():
    p = schema.Problem("f.jsonl:3", "messages[0].role", "is 'gpt'", "use 'assistant'")
    assert str(p) == "f.jsonl:3: messages[0].role: is 'gpt'; use 'assistant'"
    w = schema.Problem("f.jsonl:3", "id", "duplicate", "", "warning")
    assert str(w) == "f.jsonl:3: id: warning: duplicate"


def test_several_problems_in_one_row_all_reported(tmp_path):
    path = _rows(tmp_path, [{"images": ["x.png", "y.png"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": ""}]}])
    _, problems = validate_rows(path.read_text().splitlines(), path=path, max_images=1)
    fields = sorted(p.field for p in problems)
    assert fields == ["images", "images[0]", "images[1]", "messages", "messages[1].content"]


def test_images_without_markers_and_text_only_are_valid(tmp_path):
    _png(tmp_path)
    path = _rows(tmp_path, [
        {"id": "a", "images": ["a.png"], "messages": [{"role": "user", "content": "What?"},
                                                      {"role": "assistant", "content": "Red."}]},
        {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}])
    convs, problems = read_jsonl(path)
    assert problems == [] and [c.id for c in convs] == ["a", "7"]


def test_image_root_and_absolute_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    img = _png(tmp_path / "imgs")
    row = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}]}
    path = _rows(tmp_path, [{**row, "images": ["a.png"]}, {**row, "images": [str(img)]}])
    convs, problems = read_jsonl(path, image_root=tmp_path / "imgs")
    assert problems == [] and all(c.images == [str(img.resolve())] for c in convs)


def test_duplicate_id_is_a_warning(tmp_path):
    row = {"id": "x", "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "x"}]}
    convs, problems = read_jsonl(_rows(tmp_path, [row, row]))
    assert len(convs) == 2 and [p.level for p in problems] == ["warning"]


def test_require_answer_off_for_prediction(tmp_path):
    path = _rows(tmp_path, [{"messages": [{"role": "user", "content": "?"}]}])
    assert read_jsonl(path)[1][0].field == "messages"
    convs, problems = read_jsonl(path, require_answer=False)
    assert len(convs) == 1 and problems == []


def test_boxes_rendered_in_every_format(tmp_path):
    _png(tmp_path, size=(200, 100))
    base = {"images": ["a.png"], "messages": [{"role": "user", "content": "Find <box> and the dogs"},
                                              {"role": "assistant", "content": "Dogs: <box>"}]}
    rows = [
        {**base, "box_format": "xyxy", "boxes": [[20, 10, 100, 50], [[0, 0, 20, 10], [100, 50, 200, 100]]]},
        {**base, "box_format": "xywh", "boxes": [[20, 10, 80, 40], [[0, 0, 20, 10], [100, 50, 100, 50]]]},
        {**base, "box_format": "norm", "boxes": [[0.1, 0.1, 0.5, 0.5], [[0, 0, 0.1, 0.1], [0.5, 0.5, 1, 1]]]},
        {**base, "box_format": "cog", "boxes": [[100, 100, 500, 500], [[0, 0, 100, 100], [500, 500, 999, 999]]]},
    ]
    convs, problems = read_jsonl(_rows(tmp_path, rows))
    assert problems == []
    for c in convs:
        assert c.messages[0].content == "Find [[100,100,500,500]] and the dogs"
        assert c.messages[1].content == "Dogs: [[000,000,100,100;500,500,999,999]]"


@pytest.mark.parametrize("extra,fragment", [
    ({"boxes": [[0, 0, 1, 1]]}, "box_format"),
    ({"boxes": [[0, 0, 1, 1]], "box_format": "pixels"}, "box_format"),
    ({"boxes": [], "box_format": "norm"}, "0 box entries but 1"),
    ({"boxes": [[0, 0, 2, 1]], "box_format": "norm"}, "[0, 1]"),
])
def test_box_problems(tmp_path, extra, fragment):
    row = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "<box>"}], **extra}
    _, problems = read_jsonl(_rows(tmp_path, [row]))
    assert len(problems) == 1 and fragment in str(problems[0])


def test_file_level_problems(tmp_path):
    assert read_jsonl(tmp_path / "nope.jsonl")[1][0].message == "not found"
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "\xe9"}\n')
    assert "UTF-8" in read_jsonl(bad)[1][0].message


# ---- images ----

def test_load_image_rgba_composited_on_white(tmp_path):
    path = _png(tmp_path, mode="RGBA", color=(255, 0, 0, 0))
    im = load_image(str(path))
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_load_image_data_url_and_grayscale(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (3, 2), 128).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    im = load_image(url)
    assert im.mode == "RGB" and im.size == (3, 2) and im.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("ref", ["images/nope.png", "images/corrupt.png", "images/truncated.png"])
def test_load_image_errors(ref):
    with pytest.raises(ImageError):
        load_image(str(DATA / ref))


def test_load_image_bad_data_url():
    with pytest.raises(ImageError):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError):
        load_image("data:nocomma")


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    path = _png(tmp_path, size=(64, 64))
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit: 2x -> error, 1x -> warning
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 10**9)
    with pytest.raises(ImageError, match="too large"):
        load_image(str(path))


def test_truncated_image_reported_by_validation():
    row = {"images": ["images/truncated.png"], "messages": [{"role": "user", "content": "?"},
                                                           {"role": "assistant", "content": "x"}]}
    _, problems = validate_rows([json.dumps(row)], path=DATA / "x.jsonl")
    assert len(problems) == 1 and problems[0].field == "images[0]" and "decode" in problems[0].message
    _, problems = validate_rows([json.dumps(row)], path=DATA / "x.jsonl", check_images=False)
    assert problems == []


def test_write_jsonl_atomic(tmp_path):
    out = tmp_path / "sub" / "o.jsonl"

    def rows():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(out, rows())
    assert not out.exists() and not out.parent.exists()  # no temp file, not even the folder made for it
    assert write_jsonl(out, [{"a": "é"}]) == 1 and json.loads(out.read_text()) == {"a": "é"}


def test_schema_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, data_formats.schema, data_formats.boxes, data_formats.convert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"
