"""Mind2Web-style GUI action records -> CogAgent chat rows ("Plan: ... Next Action: ... Grounded Operation: ...").

One record is one step of a web task: the screenshot, the task, the actions already taken, the target element with
its bounding box and the operation (CLICK, TYPE or SELECT, with a value for the last two). Accepted fields (JSONL
or a JSON array; the Mind2Web names in brackets are read too):

    id                 optional; default `<file stem>-<n>`
    image              screenshot path, relative to the file's folder (or --image-root)     [screenshot]
    task               what the user wants done                                                [confirmed_task]
    history            list of earlier actions as text, oldest first (optional)               [action_reprs]
    target             {"bbox": [x, y, w, h] in pixels, "text": "Search", "tag": "input"}      [pos_candidates[0]]
                       (Mind2Web's "bounding_box_rect" string "x,y,w,h" is read as the bbox)
    bbox_format        "xywh" (default, Mind2Web), "xyxy" pixels, or "norm" ([0,1] xyxy)
    operation          {"op": "CLICK"|"TYPE"|"SELECT", "value": "..."}                          [operation]
    plan               optional plan text; default: the next action sentence
    image_size         optional [width, height]; read from the image when absent (pixel boxes need it)

Row written (cogtune schema; the box is on CogAgent's 000-999 scale, docs/architecture.md box rule)::

    user:      <image>What steps do I need to take to "<task>"?(with grounding)
               History steps: 0. <h0> 1. <h1> ...              (only when there is a history)
    assistant: Plan: <plan> Next Action: <action> Grounded Operation: [<tag>] <text> -> <OP>[: <value>] at the box
               [[x0,y0,x1,y1]]

`finetune.gui_metrics` reads the same "Grounded Operation" form back to score predictions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.boxes import check_box, format_box, to_cog
from data_formats.common import Record, map_records, skip

OPS = ("CLICK", "TYPE", "SELECT")
QUESTION = 'What steps do I need to take to "{task}"?(with grounding)'


def _first(obj: dict[str, Any], *names: str) -> Any:
    for name in names:
        if obj.get(name) not in (None, "", []):
            return obj[name]
    return None


def _target(obj: dict[str, Any]) -> dict[str, Any] | None:
    target = obj.get("target")
    if target is None and isinstance(obj.get("pos_candidates"), list) and obj["pos_candidates"]:
        target = obj["pos_candidates"][0]
    if not isinstance(target, dict):
        return None
    attrs = target.get("attributes") if isinstance(target.get("attributes"), dict) else {}
    bbox = target.get("bbox", attrs.get("bounding_box_rect"))
    if isinstance(bbox, str):
        try:
            bbox = [float(v) for v in bbox.split(",")]
        except ValueError:
            bbox = None
    return {"bbox": bbox, "text": str(target.get("text") or attrs.get("text") or "").strip(),
            "tag": str(target.get("tag") or "").strip()}


def action_text(op: str, value: str, tag: str, text: str) -> str:
    """The natural-language next action, e.g. `Type "shoes" into the search box.`"""
    what = f"the {tag} element" if tag else "the element"
    if text:
        what += f' "{text}"'
    if op == "CLICK":
        return f"Click on {what}."
    if op == "TYPE":
        return f'Type "{value}" into {what}.'
    return f'Select "{value}" in {what}.'


def grounded_operation(op: str, value: str, tag: str, text: str, box: tuple[int, int, int, int]) -> str:
    """`[tag] text -> OP[: value] at the box [[x0,y0,x1,y1]]` (value omitted for CLICK)."""
    element = (f"[{tag}] " if tag else "") + text
    action = op if op == "CLICK" else f"{op}: {value}"
    return f"{element} -> {action} at the box [[{format_box(box)}]]".strip()


def convert_row(obj: Any, source: str, base: Path, row_id: str, image_size: Any = None) -> Record:
    """One record -> (source, row, problems); every problem of the record is reported at once."""
    if not isinstance(obj, dict):
        return skip(source, "row", f"expected a JSON object, found {type(obj).__name__}")
    problems = []
    task = _first(obj, "task", "confirmed_task")
    image = _first(obj, "image", "screenshot", "img_filename")
    op_obj = obj.get("operation") if isinstance(obj.get("operation"), dict) else {}
    op = str(op_obj.get("op") or obj.get("op") or "").upper()
    value = str(op_obj.get("value") if op_obj.get("value") is not None else obj.get("value") or "")
    target = _target(obj)
    if not isinstance(task, str):
        problems.append(("task", "no task text", 'add "task": "<what the user wants done>"'))
    if not isinstance(image, str):
        problems.append(("image", "no screenshot path", 'add "image": "<path of the screenshot>"'))
    if op not in OPS:
        problems.append(("operation", f"operation {op or '(missing)'!r} is not one of {', '.join(OPS)}",
                         'write "operation": {"op": "CLICK"} (or TYPE / SELECT with a "value")'))
    elif op != "CLICK" and not value:
        problems.append(("operation", f"{op} needs a value", 'add "value": "<text typed or option chosen>"'))
    fmt = obj.get("bbox_format", "xywh")
    if target is None or target["bbox"] is None:
        problems.append(("target", "no target element bbox", 'add "target": {"bbox": [x, y, w, h], "text": "..."}'))
    elif fmt not in ("xywh", "xyxy", "norm"):
        problems.append(("bbox_format", f"unknown bbox_format {fmt!r}", "use xywh (Mind2Web), xyxy or norm"))
    if problems:
        return source, None, [_problem(source, *p) for p in problems]
    size = obj.get("image_size") or image_size
    path = Path(image) if Path(image).is_absolute() else base / image
    if fmt != "norm" and size is None:
        try:
            from PIL import Image

            with Image.open(path) as im:
                size = im.size
        except OSError as err:
            return skip(source, "image", f"cannot read {path} for its size ({err})",
                        'fix the path, or give "image_size": [width, height]')
    why = check_box(target["bbox"], fmt, tuple(size) if size else None)
    if why:
        return skip(source, "target.bbox", why, "the bbox must lie inside the screenshot")
    box = to_cog(target["bbox"], fmt, tuple(size) if size else None)
    history = obj.get("history", obj.get("action_reprs")) or []
    if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
        return skip(source, "history", "history must be a list of strings", "write earlier actions as text")
    question = QUESTION.format(task=task.strip())
    if history:
        question += "\nHistory steps: " + " ".join(f"{i}. {h.strip()}" for i, h in enumerate(history))
    action = action_text(op, value, target["tag"], target["text"])
    plan = str(obj.get("plan") or action).strip()
    answer = (f"Plan: {plan} Next Action: {action} Grounded Operation: "
              f"{grounded_operation(op, value, target['tag'], target['text'], box)}")
    row = {"id": str(obj.get("id") or obj.get("action_uid") or row_id), "images": [str(path)],
           "messages": [{"role": "user", "content": "<image>" + question},
                        {"role": "assistant", "content": answer}]}
    return source, row, []


def _problem(source: str, fld: str, message: str, hint: str):
    from data_formats.schema import Problem

    return Problem(source, fld, message, hint, "error", message.split(" ")[0] + " " + fld)


def convert(path: Path, *, image_root: Path | None = None) -> Iterator[Record]:
    """Rows of a Mind2Web-style JSON/JSONL file; screenshots relative to `image_root` (default: the file's folder)."""
    yield from map_records(path, image_root, convert_row)
