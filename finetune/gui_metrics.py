"""GUI-agent action metrics for CogAgent-style answers ("... Grounded Operation: [tag] text -> OP: value at the box
[[x0,y0,x1,y1]]"), as written by `data_formats.mind2web`.

Per step (Mind2Web's step-level metrics):
  * operation accuracy: the predicted operation (CLICK / TYPE / SELECT) equals the reference's;
  * element accuracy: the predicted box overlaps the reference box with IoU >= 0.5, or the predicted click point
    (a `[[x,y]]` point, or the centre of the predicted box) lies inside the reference box;
  * step success: operation and element right, and for TYPE / SELECT the value equal (case and spacing ignored).
A prediction without a parseable operation or box counts as wrong on what it lacks. Pure Python.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from data_formats.boxes import iou

_OP_RE = re.compile(r"->\s*(CLICK|TYPE|SELECT)\b\s*(?::\s*(.*?))?\s*(?:at the box|at the point|\[\[|$)",
                    re.IGNORECASE | re.DOTALL)
_BOX_RE = re.compile(r"\[\[\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*(\d+)\s*,\s*(\d+)\s*)?\]\]")
MARKER = "Grounded Operation:"


def is_action(text: str) -> bool:
    """True for answers in the grounded-action form (the rows `predict` scores with these metrics)."""
    return MARKER in text


def parse_action(text: str) -> dict[str, Any]:
    """{"op": str | None, "value": str, "box": (x0,y0,x1,y1) | None, "point": (x,y) | None} from an answer."""
    part = text.split(MARKER, 1)[1] if MARKER in text else text
    m = _OP_RE.search(part)
    op = m.group(1).upper() if m else None
    value = (m.group(2) or "").strip() if m else ""
    box = point = None
    b = _BOX_RE.search(part)
    if b:
        nums = [int(v) for v in b.groups() if v is not None]
        if len(nums) == 4:
            box = tuple(nums)
            point = ((nums[0] + nums[2]) / 2, (nums[1] + nums[3]) / 2)
        else:
            point = (nums[0], nums[1])
    return {"op": op, "value": value, "box": box, "point": point}


def _same_value(a: str, b: str) -> bool:
    return " ".join(a.lower().split()).strip("\"'") == " ".join(b.lower().split()).strip("\"'")


def score_step(prediction: str, reference: str) -> dict[str, bool]:
    """The three step metrics for one prediction against its reference answer."""
    pred, ref = parse_action(prediction), parse_action(reference)
    op_ok = pred["op"] is not None and pred["op"] == ref["op"]
    element_ok = False
    if ref["box"] is not None:
        x0, y0, x1, y1 = ref["box"]
        if pred["box"] is not None and iou(pred["box"], ref["box"]) >= 0.5:
            element_ok = True
        elif pred["point"] is not None:
            px, py = pred["point"]
            element_ok = x0 <= px <= x1 and y0 <= py <= y1
    value_ok = ref["op"] == "CLICK" or _same_value(pred["value"], ref["value"])
    return {"op": op_ok, "element": element_ok, "step": op_ok and element_ok and value_ok}


def score_actions(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Operation accuracy, element accuracy and step success over the rows whose reference is an action."""
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if is_action(r)]
    n = len(pairs)
    steps = [score_step(p, r) for p, r in pairs]
    rate = (lambda key: sum(s[key] for s in steps) / n) if n else (lambda key: 0.0)
    return {"action_rows": n, "operation_accuracy": rate("op"), "element_accuracy": rate("element"),
            "step_success": rate("step")}
