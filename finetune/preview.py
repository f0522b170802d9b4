"""`cogtune preview DATA.jsonl --out preview.html`: look at your data, boxes drawn, before you train.

One card per row: the image with every box of the row drawn where the model will read it (the row's
`box_format` converted to Cog's 000-999 values exactly as training does, then to pixels with
`data_formats.boxes.from_cog`), each box labelled with its phrase; the conversation with the image span
and the loss (labelled) turns marked; the row's `file:line` and every validation problem. With `--model`
(a checkpoint folder, or a family name plus `--tokenizer-dir`) the card shows the tokens exactly as
encoded for training: image span, prompt, labelled tokens, the count, and whether `--max-length` drops
turns or the whole row. `--recipe` takes model, max_length, template and data options from a recipe.

A video row (CogVLM2-Video) shows the first frames the model samples from its clip (`--model`: the checkpoint's
sampling; else one frame a second, the `chat` template's), each captioned with its time in the clip.

The page is one self-contained HTML file (images embedded as small JPEGs, no network), paged so that
10k rows stay usable. Filters (`--filter`, repeatable, all must hold): errors, warnings, problems,
valid, boxes, no-boxes, images, truncated (needs a tokenizer), id=GLOB, text=WORDS, lines=A-B.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_formats.boxes import BOX_FORMATS, Box, check_box, format_boxes, parse_boxes, to_cog
from data_formats.schema import (
    BOX_MARKER,
    IMAGE_MARKER,
    Conversation,
    Problem,
    note_duplicate_id,
    parse_row,
    resolve_image_ref,
)

from .html_page import PALETTE, Card, ImageTable, Shape, Thumb, esc, figure, mark_boxes, phrase_before, render_page

VIDEO_FRAMES_SHOWN = 4  # the first sampled frames of a video row shown on its card

FILTERS = ("errors", "warnings", "problems", "valid", "boxes", "no-boxes", "images", "truncated", "id=GLOB",
           "text=WORDS", "lines=A-B")


@dataclass
class RowBox:
    """One box of a row: its phrase, its 000-999 value (None when it cannot be converted) and how it was written."""

    group: int  # phrase index (colour)
    phrase: str
    cog: Box | None
    written: str
    problem: str = ""


@dataclass
class RowView:
    """Everything a card shows about one row."""

    source: str
    line: int
    obj: Any
    conv: Conversation | None
    problems: list[Problem]
    texts: list[tuple[str, str]] = field(default_factory=list)  # (role, content with boxes as Cog text)
    boxes: list[RowBox] = field(default_factory=list)
    tokens: int | None = None
    dropped_turns: int = 0
    too_long: str = ""
    encoded: Any = None
    thumbs: list[Thumb] = field(default_factory=list)
    frame_notes: list[str] = field(default_factory=list)  # a caption per thumb of a video frame ("" for images)

    @property
    def has_errors(self) -> bool:
        return any(p.level == "error" for p in self.problems)

    @property
    def has_warnings(self) -> bool:
        return any(p.level == "warning" for p in self.problems)


# --------------------------------------------------------------------------------------------------
# Boxes of a row, as the model will read them
# --------------------------------------------------------------------------------------------------

_MARK_RE = re.compile(r"<box>|(?:box=)?\[\[.*?\]\]", re.S)


def row_boxes(obj: dict, image_size: tuple[int, int] | None) -> tuple[list[tuple[str, str]], list[RowBox]]:
    """(messages with `<box>` replaced by Cog text, every box of the row in text order).

    The same conversion as validation (`to_cog` with the row's `box_format`; an entry that is a list of
    boxes is one phrase, rendered `[[b1;b2]]`). Boxes that cannot be converted keep their `<box>` marker
    and carry the reason, so a broken row still shows what can be shown.
    """
    raw_msgs = obj.get("messages") if isinstance(obj.get("messages"), list) else []
    entries = obj.get("boxes") if isinstance(obj.get("boxes"), list) else []
    fmt = obj.get("box_format")
    texts: list[tuple[str, str]] = []
    boxes: list[RowBox] = []
    k = 0
    for m in raw_msgs:
        if not isinstance(m, dict):
            texts.append(("(not an object)", json.dumps(m)[:500]))
            continue
        role = str(m.get("role", m.get("from", "(no role)")))
        if not isinstance(m.get("content"), str):
            texts.append((role, f"(content is {json.dumps(m.get('content'))[:500]})"))
            continue
        content, out, pos = m["content"], "", 0
        for match in _MARK_RE.finditer(content):
            out += content[pos:match.start()]
            pos = match.end()
            phrase = phrase_before(out + content[match.start():], len(out))
            group = len({b.group for b in boxes})
            if match.group(0) == BOX_MARKER:
                if k >= len(entries):
                    boxes.append(RowBox(group, phrase, None, "<box>", "no entry left in 'boxes' for this marker"))
                    out += BOX_MARKER
                    continue
                entry, k = entries[k], k + 1
                members = entry if (isinstance(entry, list) and entry and isinstance(entry[0], (list, tuple))) \
                    else [entry]
                cogs = []
                for box in members:
                    why = (f"box_format is {fmt!r}; expected one of {', '.join(BOX_FORMATS)}" if fmt not in BOX_FORMATS
                           else check_box(box, fmt, image_size))
                    cog = None if why else to_cog(box, fmt, image_size)
                    cogs.append(cog)
                    boxes.append(RowBox(group, phrase, cog, f"{fmt} {json.dumps(box)}", why or ""))
                out += format_boxes(cogs) if all(c is not None for c in cogs) else BOX_MARKER
            else:
                groups = parse_boxes(match.group(0))
                if not groups:  # `[[...]]` that is not a box: plain text
                    out += match.group(0)
                    continue
                for box in (b for g in groups for b in g):
                    bad = max(box) > 999 or box[0] > box[2] or box[1] > box[3]
                    boxes.append(RowBox(group, phrase, None if bad else box, "text " + format_boxes([box]),
                                        "values must be 000-999 with x0<=x1, y0<=y1" if bad else ""))
                out += match.group(0)
        texts.append((role, out + content[pos:]))
    return texts, boxes


# --------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------


@dataclass
class Options:
    """What `cogtune preview` was asked for (CLI flags, or a recipe's data section)."""

    image_root: str | None = None
    max_images: int | None = 1
    max_length: int | None = 2048
    last_turn_only: bool = False
    filters: list[str] = field(default_factory=list)
    rows: int = 0


def check_filters(filters: list[str]) -> list[str]:
    """Every unknown or malformed filter, each with the fix."""
    bad = []
    for f in filters:
        name, sep, value = f.partition("=")
        if sep and name in ("id", "text") and value:
            continue
        if sep and name == "lines":
            a, dash, b = value.partition("-")
            if a.isdigit() and (not dash or b.isdigit()):
                continue
            bad.append(f"--filter {f}: lines takes A-B or A (line numbers)")
            continue
        if not sep and f in FILTERS:
            continue
        bad.append(f"--filter {f}: unknown filter; use one of {', '.join(FILTERS)}")
    return bad


def _cheap_match(f: str, view: RowView) -> bool | None:
    """Whether the row passes filter `f`, or None when the filter needs token counts."""
    name, _, value = f.partition("=")
    if f == "errors":
        return view.has_errors
    if f == "warnings":
        return view.has_warnings
    if f == "problems":
        return bool(view.problems)
    if f == "valid":
        return not view.has_errors
    if f == "boxes":
        return bool(view.boxes)
    if f == "no-boxes":
        return not view.boxes
    if f == "images":
        return bool(view.obj.get("images")) if isinstance(view.obj, dict) else False
    if name == "id":
        rid = view.obj.get("id", "") if isinstance(view.obj, dict) else ""
        return fnmatch.fnmatchcase(str(rid), value)
    if name == "text":
        blob = " ".join(t for _, t in view.texts).lower()
        return all(w in blob for w in value.lower().split())
    if name == "lines":
        a, _, b = value.partition("-")
        return int(a) <= view.line <= int(b or a)
    return None  # truncated


def _encode(view: RowView, info: Any, opts: Options) -> None:
    """Token count, turns dropped at max_length (or why the row is dropped), and the encoded row to show."""
    from .models.cogvlm.processing import RowTooLong

    processor = info.processor.with_settings(last_turn_only=opts.last_turn_only, max_length=None,
                                             allow_multi_image=opts.max_images is None or opts.max_images > 1)
    try:
        full = processor.encode(view.conv)
    except ValueError as exc:
        view.problems.append(Problem(view.source, "row", f"cannot be encoded: {exc}", "", "error", "encode error"))
        return
    view.tokens, view.encoded = len(full), full
    if opts.max_length is not None and len(full) > opts.max_length:
        try:
            view.encoded = processor.with_settings(max_length=opts.max_length).encode(view.conv)
            view.dropped_turns = view.encoded.dropped_turns
        except RowTooLong as exc:
            view.too_long = f"the last turn alone needs {exc.length} tokens"


def _add_images(view: RowView, base_dir: Path, images: ImageTable) -> None:
    """Thumbnails of the row's images; an image that does not decode becomes a problem on the card.

    Validation checks that every image exists; decoding (slow) is done once, here, for the rows shown.
    """
    raw = view.obj.get("images") if isinstance(view.obj, dict) else None
    if not isinstance(raw, list):
        return
    reported = {p.field for p in view.problems}
    for i, ref in enumerate(raw):
        if not isinstance(ref, str) or not ref or ref.startswith(("http://", "https://")):
            continue
        thumb = images.add(resolve_image_ref(ref, base_dir))
        view.thumbs.append(thumb)
        view.frame_notes.append("")
        if thumb.error and f"images[{i}]" not in reported:
            view.problems.append(Problem(view.source, f"images[{i}]", thumb.error,
                                         "re-export the image as PNG/JPEG or drop the row", "error",
                                         "unreadable image"))


def _add_video_frames(view: RowView, base_dir: Path, images: ImageTable, info: Any = None) -> None:
    """The first VIDEO_FRAMES_SHOWN frames the model samples from the row's video, as thumbnails; a video that does
    not decode becomes a problem on the card."""
    raw = view.obj.get("videos") if isinstance(view.obj, dict) else None
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str) or not raw[0]:
        return
    from PIL import Image

    from .models.cogvlm2_video.video import FrameSampling, VideoDecodeError, decode_frames, probe_video, sample_indices

    path = resolve_image_ref(raw[0], base_dir)
    sampling = getattr(getattr(info, "processor", None), "sampling", None) or FrameSampling.for_template("chat")
    try:
        clip = probe_video(path)
        picked = sample_indices(clip, sampling)
        shown = picked[:VIDEO_FRAMES_SHOWN]
        frames = decode_frames(path, shown)  # (T, H, W, 3) uint8
    except (VideoDecodeError, OSError) as exc:
        view.thumbs.append(Thumb(None, None, str(exc)))
        view.frame_notes.append("video")
        if "videos[0]" not in {p.field for p in view.problems}:
            view.problems.append(Problem(view.source, "videos[0]", str(exc), "re-encode the clip (e.g. H.264 MP4) "
                                         "or drop the row", "error", "unreadable video"))
        return
    for k, (index, frame) in enumerate(zip(shown, frames)):
        view.thumbs.append(images.add_image(f"{path}#frame={index}", Image.fromarray(frame)))
        view.frame_notes.append(f"frame {k + 1} of {len(picked)} sampled, {clip.timestamps[index]:.1f} s")


def read_rows(path: Path, opts: Options, info: Any = None,
              images: ImageTable | None = None) -> tuple[list[RowView], int, dict[str, int]]:
    """Rows of `path` that pass the filters (at most `opts.rows`), the number of rows read, and counts.

    Every row is validated (images checked for existence) and counted; images are decoded into
    `images` and rows encoded (with a tokenizer in `info`) only for the rows kept.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    base_dir = Path(opts.image_root) if opts.image_root is not None else path.parent
    views: list[RowView] = []
    seen: dict[str, str] = {}
    counts = {"rows": 0, "errors": 0, "warnings": 0}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        counts["rows"] += 1
        source = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = Problem(source, "line", f"not valid JSON ({exc.msg} at column {exc.colno})",
                              "each line must be one complete JSON object", "error", "bad json")
            view = RowView(source, lineno, {}, None, [problem], texts=[("line", line[:2000])])
        else:
            conv, problems = parse_row(obj, source, base_dir, default_id=f"{path.stem}-{lineno}",
                                       max_images=opts.max_images, check_images=False, require_answer=True)
            if conv is not None:
                note_duplicate_id(conv.id, source, seen, problems)
            view = RowView(source, lineno, obj, conv, problems)
            size = _first_image_size(obj, base_dir) if isinstance(obj, dict) else None
            if isinstance(obj, dict):
                view.texts, view.boxes = row_boxes(obj, size)
        keep = not (opts.rows and len(views) >= opts.rows)  # later rows are still validated and counted
        keep = keep and all(_cheap_match(f, view) is not False for f in opts.filters)
        if keep and info is not None and info.tokenizer is not None and view.conv is not None:
            _encode(view, info, opts)
        keep = keep and ("truncated" not in opts.filters or bool(view.dropped_turns or view.too_long))
        if keep:
            if images is not None:
                _add_images(view, base_dir, images)
                _add_video_frames(view, base_dir, images, info)
            views.append(view)
        counts["errors"] += view.has_errors
        counts["warnings"] += view.has_warnings and not view.has_errors
    return views, counts["rows"], counts


def _first_image_size(obj: dict, base_dir: Path) -> tuple[int, int] | None:
    images = obj.get("images")
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        return None
    from data_formats.schema import ImageError, image_size

    try:
        return image_size(resolve_image_ref(images[0], base_dir))
    except (ImageError, OSError):
        return None


# --------------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------------


def _colour(group: int) -> str:
    return PALETTE[group % len(PALETTE)]


def _messages_html(view: RowView, opts: Options, n_images: int, image_tokens: int | None) -> str:
    """The conversation as written (boxes as Cog text), loss turns and the image span marked."""
    roles = [r for r, _ in view.texts]
    answers = [i for i, r in enumerate(roles) if r == "assistant"]
    parts = []
    if n_images:
        span = f" &middot; {image_tokens} tokens" if image_tokens else ""
        parts.append(f'<div class="msg"><span class="img">image span{span}, right after BOS</span></div>'
                     if n_images == 1 else
                     f'<div class="msg"><span class="img">{n_images} images (spans at the &lt;image&gt; markers, '
                     f"else after BOS)</span></div>")
    group = 0
    for i, (role, text) in enumerate(view.texts):
        loss = role == "assistant" and (not opts.last_turn_only or i == answers[-1])
        body, n = mark_boxes(text, lambda j, _, first=group: _colour(first + j))
        group += n
        body = body.replace(esc(IMAGE_MARKER), '<span class="img">&lt;image&gt;</span>')
        cls = "msg loss" if loss else f"msg {esc(role)}"
        note = ' title="loss on this turn"' if loss else ""
        parts.append(f'<div class="{cls}"{note}><span class="role">{esc(role)}</span>{body}</div>')
    return "".join(parts)


def _tokens_html(view: RowView, tokenizer: Any, colours: dict[str, str]) -> str:
    """The encoded row as trained: image spans as one chip, special tokens named, labelled tokens marked."""
    from .families import VISION_TOKEN_TYPE

    e = view.encoded
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    segments: list[tuple[tuple[bool, bool, bool], list[int]]] = []
    for tid, ttype, label in zip(e.input_ids, e.token_type_ids, e.labels):
        kind = (ttype == VISION_TOKEN_TYPE, label != -100, tid in special)
        if segments and segments[-1][0] == kind and not kind[2]:
            segments[-1][1].append(tid)
        else:
            segments.append((kind, [tid]))
    out = []
    for (image, loss, sp), ids in segments:
        if image:
            piece = f'<span class="img">image span &middot; {len(ids)} tokens</span>'
        elif sp:
            piece = f'<span class="sp">{esc(tokenizer.convert_ids_to_tokens(ids[0]))}</span>'
        else:
            text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            piece, _ = mark_boxes(text, lambda _, boxes: colours.get(format_boxes(boxes), PALETTE[0]))
        out.append(f'<span class="loss" title="{len(ids)} labelled token(s)">{piece}</span>' if loss else piece)
    return '<div class="tok">' + "".join(out) + "</div>"


def _problems_html(problems: list[Problem]) -> str:
    if not problems:
        return ""
    items = "".join(f'<li class="{"w" if p.level == "warning" else "e"}">{esc(p.field)}: '
                    f'{esc(("warning: " if p.level == "warning" else "") + p.message)}'
                    f'{esc("; " + p.hint) if p.hint else ""}</li>' for p in problems)
    return f'<ul class="problems">{items}</ul>'


def build_card(view: RowView, opts: Options, info: Any = None) -> Card:
    """The card of one row (see the module docstring for what it shows)."""
    obj = view.obj if isinstance(view.obj, dict) else {}
    thumbs = view.thumbs
    rid = str(obj.get("id", f"{Path(view.source.rsplit(':', 1)[0]).stem}-{view.line}"))
    shapes = [Shape(b.cog, _colour(b.group), b.phrase or f"box {i + 1}") for i, b in enumerate(view.boxes)
              if b.cog is not None]
    notes = view.frame_notes + [""] * (len(thumbs) - len(view.frame_notes))
    n_images = sum(not n for n in notes)
    figs = []
    for i, (th, note) in enumerate(zip(thumbs, notes)):
        size = f"{th.size[0]}&times;{th.size[1]} px" if th.size else ""
        caption = f"{note}: {size}" if note else f"image {i + 1}: {size}" if n_images > 1 else size
        figs.append(figure(th, shapes if i == 0 and not note else [], caption))
    if not thumbs and view.boxes:
        figs.append(figure(Thumb(None, None, "boxes but no image"), []))
    image_tokens = info.image_tokens if info is not None else None

    badges = []
    if view.has_errors:
        badges.append('<span class="badge bad">errors: not trained</span>')
    if view.boxes:
        badges.append(f'<span class="badge">{len(view.boxes)} box{"es" if len(view.boxes) > 1 else ""}</span>')
    if view.tokens is not None:
        badges.append(f'<span class="badge">{view.tokens} tokens</span>')
        if view.too_long:
            badges.append(f'<span class="badge bad">dropped at max_length {opts.max_length}: '
                          f"{esc(view.too_long)}</span>")
        elif view.dropped_turns:
            badges.append(f'<span class="badge warn">over max_length {opts.max_length}: oldest '
                          f'{view.dropped_turns} turn{"s" if view.dropped_turns > 1 else ""} dropped</span>')
        elif opts.max_length is not None:
            badges.append(f'<span class="badge good">fits max_length {opts.max_length}</span>')
    head = (f'<h2><span>{esc(rid)}</span><span class="src">{esc(view.source)}</span>{"".join(badges)}</h2>'
            + _problems_html(view.problems))

    written = _messages_html(view, opts, n_images, image_tokens)
    if view.encoded is not None and info is not None:
        colours = {format_boxes([b.cog]): _colour(b.group) for b in view.boxes if b.cog is not None}
        for b in view.boxes:  # whole multi-box groups too
            members = [x.cog for x in view.boxes if x.group == b.group]
            if all(c is not None for c in members):
                colours[format_boxes(members)] = _colour(b.group)
        note = (f" ({view.dropped_turns} oldest turn(s) dropped to fit max_length {opts.max_length})"
                if view.dropped_turns else "")
        what = "tokens (the row is dropped: too long)" if view.too_long else "tokens as trained"
        conv_html = (f"<div><b>{what}</b>{note}</div>{_tokens_html(view, info.tokenizer, colours)}"
                     f"<details><summary>as written</summary>{written}</details>")
    else:
        conv_html = written
    table = ""
    if view.boxes:
        why = any(b.problem for b in view.boxes)
        size = f" on {thumbs[0].size[0]}&times;{thumbs[0].size[1]}" if thumbs and thumbs[0].size else ""
        rows = "".join(
            f'<tr><td><span class="sw" style="background:{_colour(b.group)}"></span>{esc(b.phrase)}</td>'
            f"<td>{esc(b.written)}</td><td>{esc(format_boxes([b.cog])) if b.cog else ''}</td>"
            f'<td class="p">{_pixels(b.cog, thumbs[0].size if thumbs else None)}</td>'
            + (f'<td class="e">{esc(b.problem)}</td>' if why else "") + "</tr>" for b in view.boxes)
        table = ('<table class="boxes"><tr><th>phrase</th><th>in the row</th><th>model reads</th>'
                 f"<th>pixels x0, y0, x1, y1{size}</th>{'<th>not drawn</th>' if why else ''}</tr>{rows}</table>")
    body = f'<div class="row">{"".join(figs)}<div class="conv">{conv_html}{table}</div></div>'
    cls = "err" if view.has_errors or view.too_long else "warn" if view.has_warnings or view.dropped_turns else "ok"
    keys: dict[str, float | None] = {
        "problems": 0 if cls == "err" else 1 if cls == "warn" else 2,
        "tokens": view.tokens,
    }
    text = " ".join([rid, view.source, *(t for _, t in view.texts), *(str(p) for p in view.problems)])
    return Card(head + body, cls, keys, text, [str(view.line), rid, view.source])


def _pixels(cog: Box | None, size: tuple[int, int] | None) -> str:
    if cog is None or size is None:
        return ""
    from .html_page import box_pixels

    return ", ".join(f"{v:.2f}" for v in box_pixels(cog, size))


# --------------------------------------------------------------------------------------------------
# Page and command line
# --------------------------------------------------------------------------------------------------


def build_preview(data: str | Path, opts: Options, info: Any = None, image_px: int = 360,
                  page_size: int = 25) -> tuple[str, dict[str, int]]:
    """(the HTML page, counts: rows read, cards, rows with errors / warnings)."""
    path = Path(data)
    images = ImageTable(max_side=image_px)
    views, total, counts = read_rows(path, opts, info, images)
    cards = [build_card(v, opts, info) for v in views]
    legend = ('<div class="legend"><span><span class="msg loss">green</span> loss (labelled) turns/tokens</span>'
              '<span><span class="img">image span</span> where the image tokens go</span>'
              "<span>boxes: one colour per phrase, drawn at the pixels the model reads "
              "(box value / 1000 &times; image side)</span></div>")
    if info is None:
        model = "no --model: token counts and truncation not shown"
    elif info.tokenizer is None:
        model = f"model {esc(info.name)}: {esc(info.tokenizer_note)}"
    else:
        model = (f"model {esc(info.name)}: template '{esc(info.template_version)}', {info.image_tokens} tokens "
                 f"per image, max_length {opts.max_length}" + (", loss on the last turn only"
                                                              if opts.last_turn_only else ""))
    filt = f"; filters: {esc(' '.join(opts.filters))}" if opts.filters else ""
    head = (f"<div>{esc(path)}: {total} rows, {counts['errors']} with errors, {counts['warnings']} with warnings "
            f"only; {len(cards)} shown{filt}</div><div>{model}</div>{legend}")
    sorts = {"problems": ("problems first", [("problems", 1)])}
    if info is not None and info.tokenizer is not None:
        sorts["longest"] = ("longest first", [("tokens", -1)])
    page = render_page(f"cogtune preview: {path.name}", head, cards, images, sorts=sorts, page_size=page_size)
    counts.update({"cards": len(cards), "read": total})
    return page, counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogtune preview", description=__doc__.split("\n")[0],
                                epilog="filters: " + ", ".join(FILTERS))
    p.add_argument("data", metavar="DATA.jsonl", nargs="?", help="default: the recipe's data.train_path")
    p.add_argument("--out", required=True, help="HTML file to write (self-contained)")
    p.add_argument("--model", help="checkpoint folder or family name: adds token counts and truncation")
    p.add_argument("--recipe", help="recipe YAML: model, max_length, template, image_root and loss mode from it")
    p.add_argument("--tokenizer-dir", help="tokenizer folder (CogVLM1 checkpoints ship none)")
    p.add_argument("--template", help="prompt template (base/chat/vqa); default: the model's")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the recipe's, else 2048)")
    p.add_argument("--last-turn-only", action="store_true", default=None, help="loss on the last answer only")
    p.add_argument("--rows", type=int, default=0, help="show at most N rows (default: all)")
    p.add_argument("--filter", action="append", default=[], metavar="F", help="only rows matching F (repeatable)")
    p.add_argument("--image-root", help="folder relative image paths refer to (default: the JSONL's folder)")
    p.add_argument("--max-images", type=int, default=None, help="images allowed per row (default 1; 0 = no limit)")
    p.add_argument("--image-px", type=int, default=360, help="largest side of the embedded images (default 360)")
    p.add_argument("--page-size", type=int, default=25, help="cards per page (default 25)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options(rows=max(0, args.rows), filters=list(args.filter))
    model, tokenizer_dir, template = args.model, args.tokenizer_dir, args.template
    problems = check_filters(opts.filters)
    if args.recipe:
        from .config import ConfigError, load_recipe

        try:
            cfg = load_recipe(args.recipe)
        except ConfigError as exc:
            problems.append(str(exc))
        else:
            args.data = args.data or cfg.data.train_path
            model = model or cfg.model.checkpoint_dir or None
            tokenizer_dir = tokenizer_dir or cfg.model.tokenizer_dir
            template = template or cfg.data.template_version
            opts.max_length, opts.last_turn_only = cfg.data.max_length, cfg.data.last_turn_only
            opts.image_root = cfg.data.image_root
            opts.max_images = None if cfg.data.allow_multi_image else 1
    if args.max_length is not None:
        opts.max_length = args.max_length
    if args.last_turn_only:
        opts.last_turn_only = True
    if args.image_root:
        opts.image_root = args.image_root
    if args.max_images is not None:
        opts.max_images = None if args.max_images <= 0 else args.max_images
    if "truncated" in opts.filters and not model:
        problems.append("--filter truncated: needs token counts; add --model (and --tokenizer-dir if it has none)")
    if not args.data:
        problems.append("no data: give DATA.jsonl, or --recipe RECIPE.yaml to use its data.train_path")
    elif not Path(args.data).is_file():
        problems.append(f"{args.data}: not found (or not a file); pass the cogtune JSONL file")
    if problems:
        print("\n".join(f"cogtune preview: {p}" for p in problems), file=sys.stderr)
        return 2
    info = None
    if model:
        from .validate import resolve_model

        try:
            info = resolve_model(model, tokenizer_dir, template)
            if template and info.tokenizer is not None:
                from .models.cogvlm.processing import get_template

                get_template(template)
        except ValueError as exc:
            print(f"cogtune preview: {exc}", file=sys.stderr)
            return 2
        if info.tokenizer is None:
            print(f"cogtune preview: no token counts: {info.tokenizer_note}", file=sys.stderr)
    try:
        page, counts = build_preview(args.data, opts, info, image_px=args.image_px, page_size=args.page_size)
    except UnicodeDecodeError as exc:
        print(f"cogtune preview: {args.data}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8",
              file=sys.stderr)
        return 2
    from .html_page import write_page

    out = write_page(args.out, page)
    print(f"wrote {out} ({len(page.encode()) / 2**20:.1f} MB): {counts['cards']} of {counts['read']} rows shown; "
          f"{counts['errors']} rows with errors, {counts['warnings']} with warnings only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
