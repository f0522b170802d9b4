"""Predictions report: box pairing and IoU, failures first, `predict --report`, the eval report; in Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from data_formats.boxes import iou
from data_formats.schema import Conversation, Message, read_jsonl
from finetune.html_page import display_size
from finetune.report import PREDICTION_COLOUR, REFERENCE_COLOUR, build_report, pair_boxes, write_eval_report

from . import browser

DATA = Path(__file__).parent / "assets" / "data" / "tiny.jsonl"


def test_pairs_group_by_group_best_iou_first():
    ref = "a cat[[100,100,200,200]] and dogs[[500,500,600,600;700,700,800,800]]"
    pred = "a cat[[110,100,200,200]] and dogs[[700,700,800,790;100,900,150,950;500,500,600,600]]"
    pairs = pair_boxes(ref, pred)
    got = [(p.phrase, p.reference, p.prediction) for p in pairs]
    assert got == [("a cat", (100, 100, 200, 200), (110, 100, 200, 200)),
                   ("and dogs", (500, 500, 600, 600), (500, 500, 600, 600)),
                   ("and dogs", (700, 700, 800, 800), (700, 700, 800, 790)),
                   ("and dogs", None, (100, 900, 150, 950))]
    assert [p.iou for p in pairs] == [pytest.approx(0.9), 1.0, pytest.approx(iou((700, 700, 800, 800),
                                                                                 (700, 700, 800, 790))), None]
    missed = pair_boxes("x[[1,2,3,4]] y[[5,6,7,8]]", "x[[1,2,3,4]]")
    assert [(p.reference, p.prediction, p.iou) for p in missed] == [((1, 2, 3, 4), (1, 2, 3, 4), 1.0),
                                                                      ((5, 6, 7, 8), None, 0.0)]
    click = pair_boxes("CLICK(box=[[1,2,30,40]])", "CLICK(box=[[1,2,30,40]], element_info='Go')")
    assert click[0].click and click[0].iou == 1.0


def _rows(folder: Path) -> tuple[list[Conversation], list[str]]:
    """Three rows: a wrong box (the reference at A, the prediction at B), a perfect box, and a wrong text answer."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (300, 150), (240, 220, 180)).save(folder / "miss.png")
    Image.new("RGB", (600, 300), (185, 240, 225)).save(folder / "hit.png")
    q = Message("user", "<image>Where is the cat?")
    convs = [Conversation("miss", [str(folder / "miss.png")], [q, Message("assistant", "the cat[[100,400,400,700]]")],
                          "d.jsonl:1"),
             Conversation("text", [], [Message("user", "2+2?"), Message("assistant", "4")], "d.jsonl:2"),
             Conversation("hit", [str(folder / "hit.png")], [q, Message("assistant", "the cat[[500,100,900,500]]")],
                          "d.jsonl:3")]
    return convs, ["the cat[[600,200,900,500]]", "5", "The  cat[[500,100,900,500]]"]


MISS_REF, MISS_PRED, HIT = (0.1, 0.4, 0.4, 0.7), (0.6, 0.2, 0.9, 0.5), (0.5, 0.1, 0.9, 0.5)


def _edges(px, region, frac, colour, tol=40):
    """(left/right edge run centres along the box's middle row, top/bottom along a column), screen pixels."""
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    rgb = browser.hex_rgb(colour)
    ymid = int(y0 + (frac[1] + frac[3]) / 2 * h)
    xcut = int(x0 + frac[2] * w - 8)
    across = [c + x0 for c in browser.runs(px[ymid, x0:x1], rgb, tol)]
    down = [c + y0 for c in browser.runs(px[y0:y1, xcut], rgb, tol)]
    expect_x = (x0 + frac[0] * w, x0 + frac[2] * w)
    expect_y = (y0 + frac[1] * h, y0 + frac[3] * h)
    return across, down, expect_x, expect_y


def test_report_in_chromium(tmp_path):
    browser.require_chromium()
    convs, preds = _rows(tmp_path / "img")
    out = tmp_path / "report.html"
    out.write_text(build_report(convs, preds, {"n": 3, "exact_match": 1 / 3}))
    png = tmp_path / "report.png"
    px, console = browser.screenshot(out, png, (1000, 1300))
    assert console == []
    miss = browser.find_region(px, (240, 220, 180))
    assert (miss[2] - miss[0], miss[3] - miss[1]) == display_size((300, 150))
    for frac, colour in ((MISS_REF, REFERENCE_COLOUR), (MISS_PRED, PREDICTION_COLOUR)):
        across, down, ex, ey = _edges(px, miss, frac, colour)
        assert across == [pytest.approx(ex[0], abs=2), pytest.approx(ex[1], abs=2)], (colour, across, ex)
        assert down == [pytest.approx(ey[0], abs=2), pytest.approx(ey[1], abs=2)], (colour, down, ey)
    # A perfect prediction: the thin predicted line runs inside the wider reference line, both visible.
    hit = browser.find_region(px, (185, 240, 225))
    assert (hit[2] - hit[0], hit[3] - hit[1]) == display_size((600, 300))
    across, down, ex, ey = _edges(px, hit, HIT, PREDICTION_COLOUR)
    assert across == [pytest.approx(ex[0], abs=2), pytest.approx(ex[1], abs=2)]
    ref_across, _, _, _ = _edges(px, hit, HIT, REFERENCE_COLOUR)
    assert len(ref_across) == 4 and all(min(abs(c - e) for e in ex) <= 3 for c in ref_across)

    html, console = browser.dom(out)
    assert console == [] and browser.script_error(html) is None
    assert "exact_match</td><td>0.3333" in html  # metrics at the top
    html = browser.shown(html)
    order = re.findall(r'<h2><span>(\w+)</span>', html)
    assert order == ["miss", "text", "hit"]  # failures first: not exact, lowest IoU
    assert "IoU 0.00" in html and "IoU 1.00" in html
    assert html.count("not an exact match") == 2 and html.count(">exact match<") == 1  # whitespace/case folded
    html, _ = browser.dom(out, "#sort=iou_desc")
    assert re.findall(r'<h2><span>(\w+)</span>', html) == ["hit", "miss", "text"]  # no boxes: last


def test_predict_writes_a_report(tiny_checkpoints, tmp_path, capsys):
    from adapters.predict import main

    out, report = tmp_path / "pred.jsonl", tmp_path / "report.html"
    assert main([str(DATA), "--model", str(tiny_checkpoints[2]), "--out", str(out), "--report", str(report),
                 "--max-new-tokens", "2"]) == 0
    page = report.read_text()
    data = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.S).group(1))
    assert sorted(c["a"][0] for c in data["cards"]) == ["caption", "multi-turn", "text-only"]
    preds = {r["id"]: r["prediction"] for r in map(json.loads, out.read_text().splitlines())}
    assert all(preds[c["a"][0]].lower() in c["t"] for c in data["cards"])
    assert "exact_match" in page and f"wrote report {report}" in capsys.readouterr().out


def test_eval_callback_writes_a_report_each_eval(tmp_path):
    from finetune.callbacks import EvalCallback
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
    from finetune.tokenization import build_tiny_tokenizer

    from .conftest import build_tiny_model

    model, tok = build_tiny_model(2), build_tiny_tokenizer(2)
    convs, problems = read_jsonl(DATA)
    assert not [p for p in problems if p.level == "error"]
    collator = CogVLMCollator(CogVLMProcessor.from_config(model.config, tok, template_version="chat"))
    cfg = SimpleNamespace(eval=SimpleNamespace(eval_steps=3, generation_rows=2, max_new_tokens=2, log_predictions=0))
    cb = EvalCallback(cfg, [collator.encode(c) for c in convs], convs, collator, tmp_path, log=lambda *_: None)
    for step in (3, 6):
        cb.on_step_end(None, SimpleNamespace(global_step=step, is_world_process_zero=True), None, model=model)
    for step in (3, 6):
        page = (tmp_path / f"eval_report_step{step}.html").read_text()
        assert f"cogtune eval @ step {step}" in page and "eval_loss" in page
        data = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.S).group(1))
        assert [c["a"][0] for c in sorted(data["cards"], key=lambda c: c["k"]["order"])] == ["caption", "multi-turn"]
    with pytest.raises(ValueError, match="does not match held-out row"):
        write_eval_report(tmp_path / "x.html", convs, [{"id": "nope", "prediction": "", "reference": ""}], {}, 1)
