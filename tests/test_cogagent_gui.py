"""Mind2Web-style converter (fixture tests/assets/data/mind2web.jsonl) and the GUI action metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_formats import mind2web
from data_formats.boxes import parse_boxes
from data_formats.schema import parse_row
from finetune.gui_metrics import parse_action, score_actions, score_step

FIXTURE = Path(__file__).resolve().parent / "assets" / "data" / "mind2web.jsonl"


@pytest.fixture(scope="module")
def records():
    return list(mind2web.convert(FIXTURE))


def test_converter_writes_cogagent_plan_action_and_grounded_box(records):
    rows = {row["id"]: row for _, row, _ in records if row}
    first = rows["step-0"]
    user, answer = (m["content"] for m in first["messages"])
    assert user == '<image>What steps do I need to take to "Find running shoes under $50"?(with grounding)'
    assert answer == ('Plan: 1. Search for running shoes. 2. Filter by price. Next Action: Type "running shoes" into '
                      'the input element "Search". Grounded Operation: [input] Search -> TYPE: running shoes at the '
                      'box [[250,050,750,100]]')  # xywh 320,36,640,36 on 1280x720 -> 000-999
    second = rows["step-1"]["messages"]
    assert second[0]["content"].endswith("\nHistory steps: 0. [input] Search -> TYPE: running shoes")
    assert second[1]["content"].endswith("Grounded Operation: [button] Go -> CLICK at the box [[759,050,809,100]]")
    assert second[1]["content"].startswith('Plan: Click on the button element "Go". Next Action: Click on')
    # Mind2Web's own field names; the pixel size comes from the screenshot file (8 x 6 px).
    native = rows["m2w-7"]
    assert native["images"][0].endswith("images/blue.png")
    assert parse_boxes(native["messages"][1]["content"]) == [[(250, 167, 750, 500)]]
    assert "-> SELECT: Price: low to high" in native["messages"][1]["content"]
    for row in rows.values():  # every converted row passes the schema check (what `cogtune validate` runs)
        conv, problems = parse_row(row, "x", FIXTURE.parent, check_images=True)
        assert conv is not None and not [p for p in problems if p.level == "error"]


def test_converter_reports_a_bad_record_with_its_line(records):
    bad = [(src, probs) for src, row, probs in records if row is None]
    assert len(bad) == 1
    src, probs = bad[0]
    assert src.endswith("mind2web.jsonl:4") and "TYPE needs a value" in probs[0].message


def test_converted_answer_scores_perfectly_against_itself(records):
    answers = [row["messages"][1]["content"] for _, row, _ in records if row]
    assert score_actions(answers, answers) == {"action_rows": 3, "operation_accuracy": 1.0,
                                               "element_accuracy": 1.0, "step_success": 1.0}


def test_step_metrics():
    ref = "Plan: x Next Action: y Grounded Operation: [input] Search -> TYPE: shoes at the box [[100,100,300,200]]"
    assert parse_action(ref) == {"op": "TYPE", "value": "shoes", "box": (100, 100, 300, 200), "point": (200.0, 150.0)}
    # overlapping box, same value (case/space ignored): success
    assert score_step("Grounded Operation: -> TYPE:  Shoes at the box [[110,100,300,210]]", ref) == \
        {"op": True, "element": True, "step": True}
    # small box whose centre is inside the target (IoU < 0.5): element right; wrong value: step fails
    assert score_step("Grounded Operation: -> TYPE: boots at the box [[190,140,210,160]]", ref) == \
        {"op": True, "element": True, "step": False}
    # a click point inside the box, wrong operation
    assert score_step("Grounded Operation: [input] Search -> CLICK at the point [[150,120]]", ref) == \
        {"op": False, "element": True, "step": False}
    # box elsewhere; no action at all
    assert score_step("Grounded Operation: -> TYPE: shoes at the box [[600,600,700,700]]", ref)["element"] is False
    assert score_step("I do not know", ref) == {"op": False, "element": False, "step": False}
    click = "Grounded Operation: [button] Go -> CLICK at the box [[759,050,809,100]]"
    assert score_step("Grounded Operation: -> CLICK at the box [[760,052,808,099]]", click)["step"] is True
    metrics = score_actions(["Grounded Operation: -> CLICK at the box [[760,052,808,099]]", "nothing", "free"],
                            [click, ref, "a plain answer"])
    assert metrics == {"action_rows": 2, "operation_accuracy": 0.5, "element_accuracy": 0.5, "step_success": 0.5}


def test_predict_scores_gui_rows_with_action_metrics(records, tmp_path):
    import json
    import shutil

    from adapters.predict import InferenceModel, metrics_path, predict
    from finetune.tiny import make_tiny

    base = make_tiny(1, tmp_path / "base", seed=0, family="cogagent")
    (tmp_path / "images").mkdir()
    for name in ("red.png", "blue.png"):
        shutil.copy(FIXTURE.parent / "images" / name, tmp_path / "images" / name)
    rows = [row for _, row, _ in records if row]
    for row in rows:
        row["images"] = ["images/" + Path(row["images"][0]).name]
    data = tmp_path / "gui.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = predict(InferenceModel(base, []), data, tmp_path / "pred.jsonl", batch_size=2, max_new_tokens=4,
                      log=lambda *_: None)
    assert metrics["action_rows"] == 3
    for key in ("operation_accuracy", "element_accuracy", "step_success"):
        assert 0.0 <= metrics[key] <= 1.0
    assert json.loads(metrics_path(tmp_path / "pred.jsonl").read_text())["action_rows"] == 3
