"""cogtune preview: boxes converted to pixels as the model reads them, cards, filters, tokens; checked in Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from data_formats.boxes import from_cog, to_cog
from finetune.html_page import PALETTE, box_pixels, display_size, find_box_texts, phrase_before
from finetune.preview import Options, build_preview, main, read_rows, row_boxes

from . import browser

ROOT = Path(__file__).resolve().parents[1]
OBJECT = (40, 120, 60)  # the drawn object every test box surrounds
# Fractions of the image side of the test rectangle: the box of every form below must land here.
RECT = (0.1, 0.4, 0.4, 0.7)


# ---------------------------------------------------------------------------------------------
# Box forms -> the pixels the model reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,box,size", [
    ("xyxy", [30, 60, 120, 105], (300, 150)),
    ("xywh", [60, 120, 180, 90], (600, 300)),
    ("norm", [0.1, 0.4, 0.4, 0.7], (300, 150)),
    ("cog", [100, 400, 400, 700], (640, 480)),
])
def test_every_box_form_lands_on_the_same_pixels(fmt, box, size):
    """A box written in any accepted form becomes the same 000-999 text and the same pixels on the image."""
    obj = {"messages": [{"role": "user", "content": "Where is the cat?"},
                        {"role": "assistant", "content": "the cat <box>."}], "boxes": [box], "box_format": fmt}
    texts, boxes = row_boxes(obj, size)
    assert texts[1] == ("assistant", "the cat [[100,400,400,700]].")
    assert [(b.cog, b.phrase, b.problem) for b in boxes] == [((100, 400, 400, 700), "the cat", "")]
    w, h = size
    assert box_pixels(boxes[0].cog, size) == pytest.approx((0.1 * w, 0.4 * h, 0.4 * w, 0.7 * h))


def test_pixels_follow_the_cog_rounding_not_the_input():
    """The preview shows where the model reads the box: after rounding to the 000-999 grid, not the raw input."""
    size = (7, 3)
    texts, boxes = row_boxes({"messages": [{"role": "assistant", "content": "x<box>"}], "boxes": [[1, 1, 7, 3]],
                              "box_format": "xyxy"}, size)
    cog = to_cog([1, 1, 7, 3], "xyxy", size)
    assert boxes[0].cog == cog == (143, 333, 999, 999)
    assert box_pixels(cog, size) == pytest.approx(from_cog(cog, "xyxy", size))
    assert box_pixels(cog, size)[2] == pytest.approx(7 * 0.999)  # the right edge clamped to 999, as trained


def test_text_boxes_multi_box_groups_and_cogagent_actions():
    obj = {"messages": [
        {"role": "user", "content": "Find them."},
        {"role": "assistant", "content": "a cat[[010,020,300,400]] and two dogs <box>; a bird[[1,2,3,4],[5,6,7,8]]"},
        {"role": "user", "content": "Click search."},
        {"role": "assistant", "content": "CLICK(box=[[100,200,300,400]], element_info='Search')"}],
        "boxes": [[[0.5, 0.5, 0.6, 0.6], [0.7, 0.7, 0.9, 0.9]]], "box_format": "norm"}
    texts, boxes = row_boxes(obj, None)
    assert texts[1][1] == "a cat[[010,020,300,400]] and two dogs [[500,500,600,600;700,700,900,900]]; " \
                          "a bird[[1,2,3,4],[5,6,7,8]]"
    got = [(b.group, b.phrase, b.cog) for b in boxes]
    assert got == [(0, "a cat", (10, 20, 300, 400)), (1, "and two dogs", (500, 500, 600, 600)),
                   (1, "and two dogs", (700, 700, 900, 900)), (2, "a bird", (1, 2, 3, 4)),
                   (2, "a bird", (5, 6, 7, 8)), (3, "CLICK Search", (100, 200, 300, 400))]
    assert [b.action for b in find_box_texts(texts[3][1])] == [True]
    assert phrase_before("no box here", 11) == "no box here"


def test_boxes_that_cannot_be_converted_say_why_and_are_not_drawn():
    obj = {"messages": [{"role": "assistant", "content": "a <box> b <box> c <box> d [[500,100,400,200]]"}],
           "boxes": [[0, 0, 10, 10], [0, 0, 400, 10]], "box_format": "xyxy"}
    texts, boxes = row_boxes(obj, (100, 50))
    assert [b.cog for b in boxes] == [(0, 0, 100, 200), None, None, None]
    assert "outside the 100x50 image" in boxes[1].problem
    assert "no entry left" in boxes[2].problem
    assert "000-999" in boxes[3].problem
    assert texts[0][1].startswith("a [[000,000,100,200]] b <box> c <box>")
    _, boxes = row_boxes({"messages": [{"role": "assistant", "content": "<box>"}], "boxes": [[1, 2, 3, 4]]}, None)
    assert "box_format is None" in boxes[0].problem


def test_display_size_fits_and_enlarges_small_images():
    assert display_size((720, 360)) == (360, 180)
    assert display_size((300, 150)) == (300, 150)
    assert display_size((8, 6)) == (240, 180)  # x30, pixels kept sharp


# ---------------------------------------------------------------------------------------------
# Rows, filters, tokens
# ---------------------------------------------------------------------------------------------


def _image(path: Path, size: tuple[int, int], bg: tuple[int, int, int], rects=()) -> str:
    im = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(im)
    for fx0, fy0, fx1, fy1 in rects:  # objects exactly where RECT-like boxes point
        w, h = size
        draw.rectangle([round(fx0 * w), round(fy0 * h), round(fx1 * w) - 1, round(fy1 * h) - 1], fill=OBJECT)
    im.save(path)
    return path.name


def _row(rid, image, content, boxes=None, fmt=None):
    row = {"id": rid, "images": [image] if image else [], "messages": [
        {"role": "user", "content": "<image>Where is it?"}, {"role": "assistant", "content": content}]}
    if boxes is not None:
        row.update(boxes=boxes, box_format=fmt)
    return row


# (id, background colour, image size, answer, boxes, box_format): one row per box form, each image a
# distinct background so the screenshot test can find it. Every box surrounds the object at RECT.
BROWSER_ROWS = [
    ("multi", (240, 220, 180), (300, 150), "the cat <box>, dogs <box>.",
     [[30, 60, 120, 105], [[150, 15, 210, 45], [225, 90, 285, 135]]], "xyxy"),
    ("xyxy", (180, 215, 240), (300, 150), "the cat <box>.", [[30, 60, 120, 105]], "xyxy"),
    ("xywh", (215, 240, 180), (600, 300), "the cat <box>.", [[60, 120, 180, 90]], "xywh"),
    ("norm", (240, 190, 225), (300, 150), "the cat <box>.", [list(RECT)], "norm"),
    ("cog", (205, 185, 250), (300, 150), "the cat <box>.", [[100, 400, 400, 700]], "cog"),
    ("text", (185, 240, 225), (300, 150), "the cat [[100,400,400,700]].", None, None),
    ("small", (245, 245, 160), (10, 5), "the cat [[100,400,400,700]].", None, None),
]
DOGS = [(0.5, 0.1, 0.7, 0.3), (0.75, 0.6, 0.95, 0.9)]


def write_browser_data(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for rid, bg, size, content, boxes, fmt in BROWSER_ROWS:
        rects = [] if rid == "small" else [RECT, *(DOGS if rid == "multi" else [])]
        rows.append(_row(rid, _image(folder / f"{rid}.png", size, bg, rects), content, boxes, fmt))
    bad = _image(folder / "outside.png", (300, 150), (170, 170, 170), [RECT])
    rows.append(_row("outside", bad, "the cat <box>.", [[30, 60, 400, 105]], "xyxy"))  # a problem: not drawn
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cards_show_problems_and_file_line(tmp_path):
    path = write_browser_data(tmp_path)
    with path.open("a") as fh:
        fh.write('{"id": "broken", "messages": [\n')
        fh.write(json.dumps(_row("xyxy", "xyxy.png", "again")) + "\n")  # same image, same id
    page, counts = build_preview(path, Options())
    assert counts == {"rows": 10, "errors": 2, "warnings": 1, "cards": 10, "read": 10}
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.S).group(1))
    cards = {c["a"][1]: c for c in data["cards"]}
    outside = cards["outside"]["h"]
    assert f"{path}:8" in outside and "lies outside the 300x150 image" in outside and "errors: not trained" in outside
    assert "not valid JSON" in cards["data-9"]["h"] and f"{path}:9" in cards["data-9"]["h"]
    assert "warning: duplicate id &#x27;xyxy&#x27; (first at" in data["cards"][9]["h"]
    assert len(data["images"]) == 8  # the image two rows share is embedded once
    assert "<script" not in page.split('id="page-data">')[1].split("</script>")[0]  # data cannot close its element


def test_filters_rows_and_bad_filters(tmp_path, capsys):
    path = write_browser_data(tmp_path)
    views, total, _ = read_rows(path, Options(filters=["errors"]))
    assert total == 8 and [v.obj["id"] for v in views] == ["outside"]
    views, _, _ = read_rows(path, Options(filters=["boxes", "id=x*"]))
    assert [v.obj["id"] for v in views] == ["xyxy", "xywh"]
    views, _, _ = read_rows(path, Options(filters=["lines=2-3", "text=cat"], rows=1))
    assert [v.line for v in views] == [2]
    assert main([str(path), "--out", str(tmp_path / "p.html"), "--filter", "bogus", "--filter", "lines=x"]) == 2
    err = capsys.readouterr().err
    assert "--filter bogus: unknown filter; use one of errors" in err and "--filter lines=x: lines takes A-B" in err
    assert not (tmp_path / "p.html").exists()
    assert main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "p.html")]) == 2
    assert "nope.jsonl: not found" in capsys.readouterr().err


def test_tokens_and_truncation_with_a_model(tiny_checkpoints, tmp_path, capsys):
    from finetune.validate import resolve_model

    data = ROOT / "tests" / "assets" / "data" / "tiny.jsonl"
    info = resolve_model(str(tiny_checkpoints[2]), None, None)
    full = {v.obj["id"]: v for v in read_rows(data, Options(max_length=None), info)[0]}
    conv = full["multi-turn"].conv
    assert info.processor.template_version == "chat" and info.processor.image_tokens == info.image_tokens
    assert full["multi-turn"].tokens == len(info.processor.encode(conv))
    limit = full["multi-turn"].tokens - 1  # one token short: the oldest turn must go
    views = {v.obj["id"]: v for v in read_rows(data, Options(max_length=limit, filters=["truncated"]), info)[0]}
    assert list(views) == ["multi-turn"] and views["multi-turn"].dropped_turns == 1
    out = tmp_path / "p.html"
    assert main([str(data), "--out", str(out), "--model", str(tiny_checkpoints[2]), "--max-length", "20"]) == 0
    page = out.read_text()
    assert "dropped at max_length 20: the last turn alone needs" in page and "tokens as trained" in page
    assert "fits max_length 20" in page  # the short text-only row
    assert "3 of 3 rows shown" in capsys.readouterr().out


def test_preview_without_model_does_not_import_torch(tmp_path):
    path = write_browser_data(tmp_path)
    code = (f"import sys; from finetune.cli import main; rc = main(['preview', {str(path)!r}, '--out', "
            f"{str(tmp_path / 'p.html')!r}]); print(rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout.strip().endswith("0 NO-TORCH"), res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# In a real browser
# ---------------------------------------------------------------------------------------------


def _check_box(px, region, frac, colour, label_left=True):
    """The box for `frac` (fractions of the image) is drawn at those pixels of the image region, in `colour`."""
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    ex0, ey0, ex1, ey1 = x0 + frac[0] * w, y0 + frac[1] * h, x0 + frac[2] * w, y0 + frac[3] * h
    rgb = browser.hex_rgb(colour)
    ymid = int((ey0 + ey1) / 2)
    across = browser.runs(px[ymid, x0:x1], rgb)  # left and right edges, nothing else on this line
    assert [c + x0 for c in across] == [pytest.approx(ex0, abs=2), pytest.approx(ex1, abs=2)], (frac, across)
    xcut = int(ex1 - 6) if label_left else int((ex0 + ex1) / 2)  # clear of the phrase label at the top-left
    down = browser.runs(px[y0:y1, xcut], rgb)
    assert [c + y0 for c in down] == [pytest.approx(ey0, abs=2), pytest.approx(ey1, abs=2)], (frac, down)
    return int((ex0 + ex1) / 2), ymid


def test_preview_in_chromium(tiny_checkpoints, tmp_path, monkeypatch):
    browser.require_chromium()
    monkeypatch.chdir(tmp_path)  # short relative paths on the cards (the README screenshot comes from here)
    write_browser_data(tmp_path / "data")
    (tmp_path / "cogvlm2-tiny").symlink_to(tiny_checkpoints[2])
    out = tmp_path / "preview.html"
    assert main(["data/data.jsonl", "--out", "preview.html", "--model", "cogvlm2-tiny"]) == 0
    png = tmp_path / "preview.png"
    px, console = browser.screenshot(out, png, (1000, 2900))
    assert console == []
    for rid, bg, size, *_ in BROWSER_ROWS:
        region = browser.find_region(px, bg)
        assert (region[2] - region[0], region[3] - region[1]) == pytest.approx(display_size(size), abs=1), rid
        cx, cy = _check_box(px, region, RECT, PALETTE[0])
        if rid != "small":
            assert browser.near(px[cy, cx], OBJECT, 14), (rid, px[cy, cx])  # the box sits on the object
            assert browser.near(px[cy, region[0] + 5], bg, 14), rid  # and nothing is drawn left of it
        if rid == "multi":  # both boxes of the second phrase in the second colour
            for frac in DOGS:
                _check_box(px, region, frac, PALETTE[1])
    html, console = browser.dom(out)
    assert console == [] and browser.script_error(html) is None
    html = browser.shown(html)
    assert html.count('<article id="c') == len(BROWSER_ROWS) + 1
    assert html.count('class="lbl') == 3 + 6  # every drawn box labelled, the bad row's box not drawn
    assert ">the cat<" in html and ">dogs<" in html and "lies outside the 300x150 image" in html
    if os.environ.get("COGTUNE_SAVE_SCREENSHOTS"):  # refresh the README picture: the multi-box card
        Image.open(png).crop((0, 0, 1000, 396)).save(ROOT / "docs" / "img" / "preview.png", optimize=True)


def test_pages_and_go_to_in_chromium(tmp_path):
    browser.require_chromium()
    folder = tmp_path / "data"
    folder.mkdir()
    img = _image(folder / "a.png", (20, 10), (200, 200, 200))
    rows = [_row(f"r{i}", img, f"answer {i}") for i in range(60)]
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "p.html"
    out.write_text(build_preview(path, Options(), page_size=25)[0])
    html, console = browser.dom(out, "#page=3")
    assert console == [] and browser.script_error(html) is None
    html = browser.shown(html)
    ids = re.findall(r'<h2><span>(r\d+)</span>', html)
    assert ids == [f"r{i}" for i in range(50, 60)] and "page 3 of 3 (60 cards)" in html
    html, _ = browser.dom(out, "#go=r31")  # "go to" finds the page holding a row
    assert re.findall(r'<h2><span>(r\d+)</span>', html)[0] == "r25"


def test_preview_of_the_tiny_demo_data(tmp_path):
    from adapters.demo import write_task

    train, _ = write_task(tmp_path, n_train=6, n_eval=1, seed=0)
    page, counts = build_preview(train, Options())
    assert counts["cards"] == 6 and counts["errors"] == counts["warnings"] == 0
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["images"]) == 6 and all(u.startswith("data:image/jpeg;base64,") for u in data["images"])
    assert all('class="msg loss"' in c["h"] and f"{train}:" in c["h"] for c in data["cards"])


def test_recipe_gives_model_data_and_max_length(tiny_checkpoints, tmp_path, capsys):
    data = ROOT / "tests" / "assets" / "data" / "tiny.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  checkpoint_dir: {tiny_checkpoints[2]}\ndata:\n  train_path: {data}\n"
                      "  max_length: 20\n  last_turn_only: true\n")
    out = tmp_path / "p.html"
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 0
    page = out.read_text()
    assert "max_length 20, loss on the last turn only" in page and "dropped at max_length 20" in page
    assert "3 of 3 rows shown" in capsys.readouterr().out
    assert main(["--out", str(out)]) == 2
    assert "no data: give DATA.jsonl, or --recipe" in capsys.readouterr().err
    recipe.write_text("model:\n  checkpoint_dir: x\ndata:\n  train_path: y\nlora:\n  rnak: 4\n")
    assert main(["--recipe", str(recipe), "--out", str(out)]) == 2
    assert "did you mean 'lora.r'?" in capsys.readouterr().err


def test_page_is_written_atomically_with_the_umask(tmp_path):
    from finetune.html_page import write_page

    old = os.umask(0o027)
    try:
        path = write_page(tmp_path / "sub" / "p.html", "<html></html>")
    finally:
        os.umask(old)
    assert path.read_text() == "<html></html>" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["p.html"]  # no temporary file left behind


def test_video_rows_show_their_first_sampled_frames(tmp_path):
    """A CogVLM2-Video row's card shows the frames the model samples (one a second), in order, captioned with their
    time; a clip that does not decode is a problem on its card."""
    import base64
    import io

    from finetune.models.cogvlm2_video.video import write_test_video

    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30), (200, 40, 200)]
    write_test_video(tmp_path / "five.mp4", colours, fps=1, size=(64, 48))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    rows = [{"id": vid, "videos": [f"{vid}.mp4"], "messages": [{"role": "user", "content": "<video>Colours?"},
                                                                 {"role": "assistant", "content": "several"}]}
            for vid in ("five", "broken")]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page, counts = build_preview(path, Options())
    assert counts["cards"] == 2 and counts["errors"] == 1
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.S).group(1))
    five, broken = data["cards"][0]["h"], data["cards"][1]["h"]
    keys = [int(k) for k in re.findall(r'data-k="(\d+)"', five)]
    assert len(keys) == 4  # the first 4 of the 5 sampled frames
    for k, (key, colour) in enumerate(zip(keys, colours)):
        assert f"frame {k + 1} of 5 sampled, {k:.1f} s: 64&times;48 px" in five
        jpeg = base64.b64decode(data["images"][key].split(",", 1)[1])
        pixel = Image.open(io.BytesIO(jpeg)).convert("RGB").getpixel((32, 24))
        assert all(abs(a - b) <= 20 for a, b in zip(pixel, colour)), (k, pixel, colour)
    assert "image span" not in five  # a video is not described as an image
    assert "videos[0]" in broken and "cannot open as a video" in broken and "errors: not trained" in broken
