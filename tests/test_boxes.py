"""Grounding boxes: conversions to Cog's 000-999 text, parsing, IoU, and the rounding/clamping rule."""

import pytest

from data_formats.boxes import check_box, format_boxes, from_cog, iou, parse_boxes, to_cog


def test_pixel_xyxy_to_cog_and_padding():
    assert to_cog([10, 20, 50, 80], "xyxy", (100, 200)) == (100, 100, 500, 400)
    assert format_boxes([to_cog([0, 0, 5, 8], "xyxy", (100, 100))]) == "[[000,000,050,080]]"


def test_coco_xywh_and_normalised_agree():
    a = to_cog([10, 20, 40, 60], "xywh", (100, 200))
    b = to_cog([0.1, 0.1, 0.5, 0.4], "norm")
    assert a == b == (100, 100, 500, 400)


def test_right_edge_clamps_to_999_and_rounding_is_half_step():
    assert to_cog([0, 0, 1, 1], "norm") == (0, 0, 999, 999)
    assert to_cog([0.0004, 0.0005, 0.5004, 0.5006], "norm") == (0, 0, 500, 501)


@pytest.mark.parametrize("size", [(640, 480), (333, 777), (1344, 1344)])
def test_round_trip_error_is_bounded(size):
    w, h = size
    box = (w * 0.123, h * 0.456, w * 0.789, h * 0.999)
    back = from_cog(to_cog(box, "xyxy", size), "xyxy", size)
    for v, r, side in zip(box, back, (w, h, w, h)):
        assert abs(v - r) <= side * 0.0011  # half a step, or one step at the clamped edge


def test_from_cog_xywh_and_cog_identity():
    assert from_cog((100, 100, 500, 400), "xywh", (100, 200)) == pytest.approx((10, 20, 40, 60))
    assert to_cog([1, 2, 3, 4], "cog") == (1, 2, 3, 4)


def test_multi_box_and_cogagent_forms():
    assert format_boxes([(1, 2, 3, 4), (10, 20, 30, 40)]) == "[[001,002,003,004;010,020,030,040]]"
    assert format_boxes([(1, 2, 3, 4)], style="cogagent") == "box=[[001,002,003,004]]"


def test_parse_boxes_all_forms():
    text = ("a [[001,002,003,004]] b [[010,020,030,040;050,060,070,080]] "
            "CLICK(box=[[100,200,300,400]]) cogcom [[1,2,3,4],[5,6,7,8]] junk [[1,2,3]] [[ 9, 9, 10, 10 ]]")
    assert parse_boxes(text) == [
        [(1, 2, 3, 4)], [(10, 20, 30, 40), (50, 60, 70, 80)], [(100, 200, 300, 400)],
        [(1, 2, 3, 4), (5, 6, 7, 8)], [(9, 9, 10, 10)]]
    assert parse_boxes("no boxes here [1,2,3,4]") == []


def test_parse_round_trip():
    boxes = [to_cog([0.1, 0.2, 0.3, 0.4], "norm"), to_cog([0.5, 0.5, 1.0, 1.0], "norm")]
    assert parse_boxes("the cats " + format_boxes(boxes)) == [boxes]


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


@pytest.mark.parametrize("box,fmt,size,fragment", [
    ([0, 0, 20, 20], "xyxy", (8, 8), "outside"),
    ([5, 0, 2, 4], "xyxy", (8, 8), "x0 < x1"),
    ([0, 0, 0, 4], "xywh", (8, 8), "width and height"),
    ([0, 0, 1.5, 1], "norm", None, "[0, 1]"),
    ([0, 0, 1000, 10], "cog", None, "0-999"),
    ([0, 0, 1], "cog", None, "4 numbers"),
    ([0, 0, 4, 4], "xyxy", None, "image size"),
])
def test_check_box_messages(box, fmt, size, fragment):
    assert fragment in check_box(box, fmt, size)
    with pytest.raises(ValueError):
        to_cog(box, fmt, size)
