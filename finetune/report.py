"""HTML report of predictions: reference and predicted boxes drawn on each image, IoU per box, exact match per answer.

Written by `cogtune predict ... --report report.html` and by the trainer's generation eval
(`eval_report_stepN.html` in the run folder). Reference boxes are blue, predicted boxes orange; each
predicted box is labelled with its IoU against the reference box it is paired with (boxes of the i-th
`[[...]]` group of the answer are paired with those of the i-th reference group, best IoU first).
Cards sort by correctness or IoU so the failures come first. Same page machinery as `cogtune preview`
(finetune/html_page.py): one self-contained file, no network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_formats.boxes import Box, format_boxes, iou
from finetune.html_page import (
    Card,
    ImageTable,
    Shape,
    Thumb,
    esc,
    figure,
    find_box_texts,
    mark_boxes,
    phrase_before,
    render_page,
    write_page,
)

REFERENCE_COLOUR = "#0072b2"  # blue
PREDICTION_COLOUR = "#e69f00"  # orange


@dataclass
class BoxPair:
    """A reference box and the predicted box paired with it (either may be missing), with their IoU."""

    phrase: str
    reference: Box | None
    prediction: Box | None
    iou: float | None
    click: bool = False  # the prediction was a CogAgent action `box=[[...]]` (its centre is the click point)


def normalize_answer(text: str) -> str:
    """Same folding as `finetune.generation.normalize_answer` (case, whitespace), without importing torch."""
    return " ".join(text.split()).lower()


def pair_boxes(reference: str, prediction: str) -> list[BoxPair]:
    """Pairs group by group (i-th `[[...]]` with i-th); inside a group, greedy best IoU."""
    ref_groups, pred_groups = find_box_texts(reference), find_box_texts(prediction)
    pairs: list[BoxPair] = []
    for g in range(max(len(ref_groups), len(pred_groups))):
        refs = ref_groups[g].boxes if g < len(ref_groups) else []
        preds = pred_groups[g].boxes if g < len(pred_groups) else []
        click = g < len(pred_groups) and pred_groups[g].action
        phrase = phrase_before(reference, ref_groups[g].start) if g < len(ref_groups) else ""
        left = list(range(len(preds)))
        scored = sorted(((iou(r, p), i, j) for i, r in enumerate(refs) for j, p in enumerate(preds)), reverse=True)
        matched: dict[int, tuple[int, float]] = {}
        for value, i, j in scored:
            if i not in matched and j in left:
                matched[i] = (j, value)
                left.remove(j)
        for i, r in enumerate(refs):
            if i in matched:
                j, value = matched[i]
                pairs.append(BoxPair(phrase, r, preds[j], value, click))
            else:
                pairs.append(BoxPair(phrase, r, None, 0.0))
        pairs += [BoxPair(phrase, None, preds[j], None, click) for j in left]
    return pairs


def _answer_html(text: str, colour: str) -> str:
    body, _ = mark_boxes(text, lambda _, __: colour)
    return body


def _pair_table(pairs: list[BoxPair]) -> str:
    if not pairs:
        return ""
    rows = "".join(
        f"<tr><td>{esc(p.phrase)}</td><td>{esc(format_boxes([p.reference])) if p.reference else 'none'}</td>"
        f"<td>{esc(format_boxes([p.prediction])) if p.prediction else 'missing'}</td>"
        f"<td>{'' if p.iou is None else f'{p.iou:.3f}'}</td></tr>" for p in pairs)
    return (f'<table class="boxes"><tr><th>phrase</th><th><span class="sw" style="background:{REFERENCE_COLOUR}">'
            f'</span>reference</th><th><span class="sw" style="background:{PREDICTION_COLOUR}"></span>predicted</th>'
            f"<th>IoU</th></tr>{rows}</table>")


def build_card(conv: Any, prediction: str, images: ImageTable, order: int) -> Card:
    """One row: image with both box sets, question, reference and prediction, IoU per box, exact match."""
    reference = conv.messages[-1].content if conv.messages and conv.messages[-1].role == "assistant" else None
    question = next((m.content for m in reversed(conv.messages[:-1] if reference is not None else conv.messages)
                     if m.role == "user"), "")
    pairs = pair_boxes(reference or "", prediction)
    # Reference lines wider and under the predicted ones: a perfect prediction shows both colours.
    shapes = [Shape(p.reference, REFERENCE_COLOUR, p.phrase or "reference", width=5) for p in pairs if p.reference]
    shapes += [Shape(p.prediction, PREDICTION_COLOUR, "extra" if p.iou is None else f"IoU {p.iou:.2f}",
                     point=p.click, width=2, below=True) for p in pairs if p.prediction]
    thumb = images.add(conv.images[0]) if conv.images else None
    fig = figure(thumb, shapes) if thumb else (figure(Thumb(None, None, "no image"), []) if pairs else "")
    ref_ious = [p.iou for p in pairs if p.reference is not None]
    mean_iou = sum(ref_ious) / len(ref_ious) if ref_ious else None
    exact = None if reference is None else normalize_answer(prediction) == normalize_answer(reference)
    badges = []
    if exact is not None:
        badges.append('<span class="badge good">exact match</span>' if exact else
                      '<span class="badge bad">not an exact match</span>')
    if mean_iou is not None:
        good = all(v is not None and v >= 0.5 for v in ref_ious)
        badges.append(f'<span class="badge {"good" if good else "bad"}">IoU {mean_iou:.3f}'
                      f'{" (mean of " + str(len(ref_ious)) + ")" if len(ref_ious) > 1 else ""}</span>')
    head = (f'<h2><span>{esc(conv.id)}</span><span class="src">{esc(getattr(conv, "source", ""))}</span>'
            f'{"".join(badges)}</h2>')
    q_html, _ = mark_boxes(question.replace("<image>", ""))
    texts = (f'<div class="msg"><span class="role">question</span>{q_html}</div>'
             + (f'<div class="msg"><span class="role">reference</span>{_answer_html(reference, REFERENCE_COLOUR)}'
                "</div>" if reference is not None else "")
             + f'<div class="msg"><span class="role">predicted</span>{_answer_html(prediction, PREDICTION_COLOUR)}'
             "</div>")
    body = f'<div class="row">{fig}<div class="conv">{texts}{_pair_table(pairs)}</div></div>'
    failed = exact is False or (mean_iou is not None and mean_iou < 0.5)
    keys = {"exact": None if exact is None else float(exact), "iou": mean_iou, "order": float(order)}
    text = " ".join([str(conv.id), getattr(conv, "source", ""), question, reference or "", prediction])
    line = getattr(conv, "source", "").rpartition(":")[2]
    return Card(head + body, "err" if failed else "ok" if exact or mean_iou is not None else "", keys, text,
                [str(conv.id), line, getattr(conv, "source", "")])


SORTS = {
    "failures": ("failures first (exact match, then IoU)", [("exact", 1), ("iou", 1)]),
    "iou": ("IoU, lowest first", [("iou", 1)]),
    "iou_desc": ("IoU, highest first", [("iou", -1)]),
}


def build_report(convs: Sequence[Any], predictions: Sequence[str], metrics: dict[str, Any] | None = None,
                 title: str = "cogtune predictions", note: str = "", image_px: int = 360) -> str:
    """The report page for rows `convs` (conversations) and their `predictions`, metrics at the top."""
    if len(convs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(convs)} rows")
    images = ImageTable(max_side=image_px)
    cards = [build_card(c, p, images, i) for i, (c, p) in enumerate(zip(convs, predictions))]
    n_exact = sum(c.keys["exact"] == 1.0 for c in cards)
    graded = sum(c.keys["exact"] is not None for c in cards)
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(f'{v:.4f}' if isinstance(v, float) else v)}</td></tr>"
                   for k, v in (metrics or {}).items())
    head = (f"<div>{esc(note)}</div>" if note else "") + (
        f"<div>{len(cards)} rows; exact match {n_exact} of {graded} graded</div>"
        + (f'<table class="metrics">{rows}</table>' if rows else "")
        + f'<div class="legend"><span><span class="sw" style="background:{REFERENCE_COLOUR}"></span>reference '
        f'boxes</span><span><span class="sw" style="background:{PREDICTION_COLOUR}"></span>predicted boxes, '
        "labelled with their IoU</span><span>IoU@0.5 in the metrics counts each row's first box</span></div>")
    return render_page(title, head, cards, images, sorts=SORTS, default_sort="failures")


def write_report(path: str | Path, convs: Sequence[Any], predictions: Sequence[str],
                 metrics: dict[str, Any] | None = None, title: str = "cogtune predictions", note: str = "") -> Path:
    """Build the report and write it atomically to `path`."""
    return write_page(path, build_report(convs, predictions, metrics, title, note))


def write_eval_report(path: str | Path, convs: Sequence[Any], samples: Sequence[dict[str, Any]],
                      metrics: dict[str, Any], step: int) -> Path:
    """The trainer's generation eval as a report. `samples` ({id, prediction, reference}) are in the order of
    the held-out rows that end with an answer, as `finetune.evaluation.generation_eval` takes them."""
    graded = [c for c in convs if c.messages and c.messages[-1].role == "assistant"][:len(samples)]
    for c, s in zip(graded, samples):
        if str(c.id) != str(s["id"]):
            raise ValueError(f"eval sample {s['id']!r} does not match held-out row {c.id!r}")
    return write_report(path, graded, [s["prediction"] for s in samples], metrics,
                        title=f"cogtune eval @ step {step}", note=f"generation eval at step {step}: "
                        f"{len(samples)} held-out rows, greedy decoding")



def report_from_files(path: str | Path, data: str | Path, predictions: str | Path,
                      metrics: dict[str, Any] | None = None, image_root: str | None = None) -> Path:
    """Report from DATA.jsonl and the PRED.jsonl `cogtune predict` wrote for it (rows matched by order and id)."""
    from data_formats.schema import read_jsonl

    convs, problems = read_jsonl(data, image_root, require_answer=False)
    errors = [str(p) for p in problems if p.level == "error"]
    if errors:
        raise ValueError(f"{data}: {len(errors)} error(s), first: {errors[0]}")
    preds = [json.loads(line) for line in Path(predictions).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(preds) != len(convs) or any(str(c.id) != str(p.get("id")) for c, p in zip(convs, preds)):
        raise ValueError(f"{predictions} does not hold one prediction per row of {data}, in order; "
                         "pass the DATA.jsonl it was predicted from")
    return write_report(path, convs, [p["prediction"] for p in preds], metrics, note=f"{data} -> {predictions}")
