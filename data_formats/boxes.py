"""Grounding boxes as CogVLM/CogAgent write them: `[[x0,y0,x1,y1]]` on a 000-999 scale.

Users bring boxes in pixels (xyxy), COCO pixels (xywh) or normalised [0,1] xyxy; the checkpoints read
and write only the text form (docs/architecture.md §19.13). One conversion rule is used everywhere:

    value = clamp(round(fraction * 1000), 0, 999)      fraction = pixel / image side
    fraction = value / 1000                            (the inverse, for evaluation)

so a round trip moves a coordinate by at most half a step (0.05% of the side), except that the
right/bottom edge (fraction 1.0) is clamped to 999, i.e. 0.1% short of the edge. Resizing the image
(e.g. to 490 px) does not change these values: they are proportions.

Text forms:
  one box            `[[102,030,480,777]]`
  several, one phrase `[[102,030,480,777;500,500,900,950]]`  (CogVLM grounding models)
  CogAgent actions   `box=[[102,030,480,777]]`
Pure Python: no torch, no PIL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

Box = tuple[int, int, int, int]
BoxFormat = Literal["xyxy", "xywh", "norm", "cog"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh", "norm", "cog")
SCALE = 1000
MAX_VALUE = 999


def _to_cog_value(fraction: float) -> int:
    return min(MAX_VALUE, max(0, round(fraction * SCALE)))


def check_box(box: Sequence[float], fmt: BoxFormat, image_size: tuple[int, int] | None = None) -> str | None:
    """Why `box` is not a valid box in `fmt`, or None. Used by the validator so that errors say which rule broke."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return f"expected 4 numbers, got {box!r}"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return f"expected 4 numbers, got {box!r}"
    try:
        a, b, c, d = (float(v) for v in box)
    except OverflowError:  # an integer too large for a float
        return f"values out of range, got {box!r}"
    if not all(math.isfinite(v) for v in (a, b, c, d)):
        return f"values must be finite numbers (no NaN or Infinity), got {box!r}"
    if fmt == "xywh":
        if c <= 0 or d <= 0:
            return f"width and height must be > 0, got {box!r}"
        c, d = a + c, b + d
    elif c <= a or d <= b:
        if fmt == "cog" and c >= a and d >= b:
            pass  # a tiny object may round to a zero-width box on the 000-999 grid
        else:
            return f"needs x0 < x1 and y0 < y1, got {box!r}"
    if fmt == "cog":
        if any(v != int(v) for v in box):
            return f"cog boxes are integers 0-999, got {box!r}"
        if min(a, b, c, d) < 0 or max(a, b, c, d) > MAX_VALUE:
            return f"cog values must be within 0-999, got {box!r}"
    elif fmt == "norm":
        if min(a, b, c, d) < 0 or max(a, b, c, d) > 1:
            return f"normalised values must be within [0, 1], got {box!r}"
    else:
        if image_size is None:
            return "pixel boxes need the image size, and the row has no readable image"
        w, h = image_size
        if min(a, b) < 0 or c > w or d > h:
            return f"box {box!r} ({fmt}) lies outside the {w}x{h} image"
    return None


def to_cog(box: Sequence[float], fmt: BoxFormat = "xyxy", image_size: tuple[int, int] | None = None) -> Box:
    """Convert one box to Cog's 000-999 integers; pixel formats need `image_size` = (width, height)."""
    problem = check_box(box, fmt, image_size)
    if problem:
        raise ValueError(problem)
    a, b, c, d = (float(v) for v in box)
    if fmt == "cog":
        return (int(a), int(b), int(c), int(d))
    if fmt == "xywh":
        c, d = a + c, b + d
    if fmt in ("xyxy", "xywh"):
        w, h = image_size  # type: ignore[misc]  # checked by check_box
        a, b, c, d = a / w, b / h, c / w, d / h
    return (_to_cog_value(a), _to_cog_value(b), _to_cog_value(c), _to_cog_value(d))


def from_cog(box: Sequence[int], fmt: BoxFormat = "norm", image_size: tuple[int, int] | None = None) -> tuple:
    """Inverse of `to_cog` (value / 1000), for evaluation against pixel or normalised ground truth."""
    a, b, c, d = (v / SCALE for v in box)
    if fmt == "cog":
        return tuple(int(v) for v in box)
    if fmt == "norm":
        return (a, b, c, d)
    if image_size is None:
        raise ValueError(f"converting to {fmt} pixels needs image_size=(width, height)")
    w, h = image_size
    x0, y0, x1, y1 = a * w, b * h, c * w, d * h
    return (x0, y0, x1 - x0, y1 - y0) if fmt == "xywh" else (x0, y0, x1, y1)


def format_box(box: Sequence[int]) -> str:
    """`x0,y0,x1,y1` zero-padded to 3 digits (the checkpoints were trained on exactly this form)."""
    return ",".join(f"{int(v):03d}" for v in box)


def format_boxes(boxes: Sequence[Sequence[int]], style: Literal["cogvlm", "cogagent"] = "cogvlm") -> str:
    """Boxes of one phrase as text: `[[b1;b2]]`, or `box=[[b1]]` for CogAgent actions."""
    if not boxes:
        raise ValueError("format_boxes needs at least one box")
    text = "[[" + ";".join(format_box(b) for b in boxes) + "]]"
    return "box=" + text if style == "cogagent" else text


# `[[...]]` groups whose content is numbers separated by commas, `;` (CogVLM multi-box) or `],[`
# (CogCoM). Spaces are tolerated because generated text sometimes has them.
_GROUP_RE = re.compile(r"\[\[\s*(\d+(?:\s*(?:,|;|\]\s*,\s*\[)\s*\d+)*)\s*\]\]")
_NUM_RE = re.compile(r"\d+")


def parse_boxes(text: str) -> list[list[Box]]:
    """Every `[[...]]` group in `text`, each a list of 4-int boxes; malformed groups are skipped.

    Accepts `[[a,b,c,d]]`, `[[a,b,c,d;e,f,g,h]]`, `[[a,b,c,d],[e,f,g,h]]` and `box=[[...]]`.
    Values are returned as written (not clamped) so that a validator can flag values above 999.
    """
    groups: list[list[Box]] = []
    for match in _GROUP_RE.finditer(text):
        parts = re.split(r"\s*(?:;|\]\s*,\s*\[)\s*", match.group(1))
        group: list[Box] = []
        for part in parts:
            nums = [int(n) for n in _NUM_RE.findall(part)]
            if len(nums) != 4:
                group = []
                break
            group.append((nums[0], nums[1], nums[2], nums[3]))
        if group:
            groups.append(group)
    return groups


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes in the same units (0.0 when either has no area)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0
