"""The one canonical data format: JSONL, one conversation a line (see data_formats/README.md).

Everything that reads user data goes through `validate_rows`, which collects every problem of every
row before anything fails (docs/conventions.md §8): users fix a file in one pass instead of one error per
run (docs/architecture.md §19.6). `read_jsonl` is the structural pass (images checked for existence);
`validate_rows(check_images=True)` also decodes every image, as training's validation does. Image
paths must stay under the data root unless explicitly allowed. No torch here: plain Python + PIL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import json
import os
import re
import secrets
import threading
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from data_formats.boxes import BOX_FORMATS, check_box, format_boxes, parse_boxes, to_cog

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
BOX_MARKER = "<box>"
# 64 Mpx: far above any training resolution (CogVLM2 uses 1344^2 = 1.8 Mpx), far below what would
# exhaust RAM while decoding. PIL's own global limit is left untouched for other code.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

# Names other formats use, mapped to the converter that reads them (used in hints).
_FOREIGN_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "observation": ""}


class ImageError(ValueError):
    """An image reference that cannot be turned into an RGB picture (missing, corrupt, too large)."""


class ImagePathError(ImageError):
    """An image path outside the data root: refused before anything is opened (no existence leak)."""


OUTSIDE_HINT = ("images must lie under the data file's folder or --image-root (data.image_root); to use images "
                "elsewhere on purpose pass --allow-outside-images (data.allow_outside_images: true)")


@dataclass
class Message:
    """One turn; `content` is plain text, `<image>` / `<box>` markers included."""

    role: Role
    content: str


@dataclass
class Conversation:
    """A validated row. `images` are absolute paths or `data:` URLs, in `<image>` marker order; `videos` holds
    at most one absolute video path (CogVLM2-Video)."""

    id: str
    images: list[str]
    messages: list[Message]
    source: str = ""
    videos: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The canonical row for this conversation (what `cogtune convert` writes)."""
        out: dict[str, Any] = {"id": self.id, "images": list(self.images)}
        if self.videos:
            out["videos"] = list(self.videos)
        out["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return out


@dataclass
class Problem:
    """One thing wrong with one row; `str()` gives `file:line: field: message; hint`."""

    source: str
    field: str
    message: str
    hint: str = ""
    level: Literal["error", "warning"] = "error"
    kind: str = ""  # short stable tag for counting ("missing image", "bad json", ...)

    def __str__(self) -> str:
        msg = f"warning: {self.message}" if self.level == "warning" else self.message
        return f"{self.source}: {self.field}: {msg}" + (f"; {self.hint}" if self.hint else "")


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------


def split_jsonl(text: str) -> list[str]:
    """Lines of a JSONL text, split on "\n" only (as JSONL defines), never on U+2028/U+2029 or other
    characters `str.splitlines` treats as breaks: those are legal inside JSON strings. A leading BOM is
    dropped, so a file saved by Windows tools reads like any other."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_jsonl_lines(path: str | Path) -> tuple[list[str] | None, list[Problem]]:
    """(lines, problems) of a JSONL file, each line decoded on its own.

    Split on b"\n" only, like `split_jsonl`; a line that is not UTF-8 becomes "" (blank, so skipped) plus one
    `file:line` problem, so one bad line costs one row, never the file. None when the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [Problem(str(path), "file", "not found", "check the path", "error", "missing file")]
    except IsADirectoryError:
        return None, [Problem(str(path), "file", "is a folder", "pass the JSONL file (cogtune convert makes one)",
                              "error", "missing file")]
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    lines: list[str] = []
    problems: list[Problem] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            lines.append("")
            problems.append(Problem(f"{path}:{lineno}", "line", f"not UTF-8 text ({exc.reason} at byte {exc.start} "
                                    "of the line)", "save the file as UTF-8", "error", "bad encoding"))
    return lines, problems


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_row(line: str) -> tuple[Any, str | None]:
    """(object, None) or (None, why): one JSON line, never raising for bad input.

    Besides syntax errors this catches nesting deeper than Python's recursion limit (RecursionError)
    and integers with too many digits, so one hostile row is one problem, not a crash.
    """
    try:
        obj = json.loads(line)
        # A lone surrogate can only come from a `\\uD800`-`\\uDFFF` escape; Python keeps it, tokenizers refuse it.
        if _SURROGATE_ESCAPE.search(line):
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return obj, None
    except UnicodeEncodeError:
        return None, "not usable text (a lone surrogate escape such as \\ud800, which no tokenizer can encode)"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "not usable JSON (nested too deeply)"
    except ValueError as exc:  # e.g. an integer with more than 4300 digits
        return None, f"not usable JSON ({exc})"


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _open_bytes(ref: str) -> io.BytesIO | str:
    """A file path, or the decoded bytes of a `data:` URL, for PIL to open."""
    if not ref.startswith("data:"):
        return ref
    header, sep, payload = ref[5:].partition(",")
    if not sep:
        raise ImageError("data URL has no ',' separating the header from the data")
    try:
        raw = base64.b64decode(payload, validate=False) if header.endswith(";base64") else \
            urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL is not valid base64 ({exc})") from None
    return io.BytesIO(raw)


def _describe(ref: str) -> str:
    return ref if not ref.startswith("data:") else ref[:40] + "..."


def image_size(ref: str) -> tuple[int, int]:
    """(width, height) read from the header only (no decode), for box conversion."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_open_bytes(ref)) as im:
                return im.size
    except FileNotFoundError:
        raise ImageError(f"image not found: {_describe(ref)}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"cannot read image {_describe(ref)}: {exc}") from None


def load_image(ref: str, *, draft: bool = False) -> Image.Image:
    """Decode `ref` (path or `data:` URL) into an RGB image; any failure is an `ImageError`.

    Transparent images are composited on white: dropping alpha would show the (often black) colour
    under transparent pixels, which the model never saw in pretraining. `draft=True` (checks only)
    lets JPEGs decode at 1/8 scale: every byte is still read and entropy-decoded, so truncation is
    caught the same, about 3x faster.
    """
    what = _describe(ref)
    try:
        with contextlib.ExitStack() as stack:
            if threading.current_thread() is threading.main_thread():  # catch_warnings is not thread-safe
                stack.enter_context(warnings.catch_warnings())
                # PIL warns (not raises) between its two limits; treat both as errors.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(_open_bytes(ref))
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"image {what} is {w}x{h} = {w * h} pixels, above the {MAX_IMAGE_PIXELS} limit "
                                 "(possible decompression bomb)")
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:  # the warning band, in any thread
                raise Image.DecompressionBombError(f"{w * h} pixels exceed PIL's limit of {Image.MAX_IMAGE_PIXELS}")
            if draft and im.format == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image not found: {what}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {what} is too large (possible decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # UnidentifiedImageError is an OSError
        raise ImageError(f"cannot decode image {what}: {exc}") from None
    try:
        if im.mode in _WIDE_MODES:
            return _wide_to_rgb(im, what)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return im.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError) as exc:  # modes PIL cannot turn into RGB (e.g. LAB)
        raise ImageError(f"cannot convert image {what} (mode {im.mode}) to RGB: {exc}") from None


# Single-channel modes wider than 8 bits: PIL's own convert("RGB") clips them (16-bit grey turns all white,
# float [0, 1] all black), so they are scaled to 8 bits here.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_rgb(im: Image.Image, what: str) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit RGB, scaled instead of clipped.

    I;16*: by bit depth (65535 -> 255). I: as 8-bit when within 0-255, as 16-bit when within 0-65535,
    else by its actual range. F: [0, 1] -> 0-255, values already within 0-255 kept, else the actual range.
    Non-finite float pixels are an error (there is no right grey for NaN).
    """
    import numpy as np

    arr = np.asarray(im).astype(np.float64)
    if arr.size == 0:
        raise ImageError(f"image {what} has no pixels")
    if not np.isfinite(arr).all():
        raise ImageError(f"image {what} (mode {im.mode}) has NaN or infinite pixels; re-export it as 8-bit PNG/JPEG")
    lo, hi = float(arr.min()), float(arr.max())
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and 255 < hi <= 65535):
        scaled = arr / 257.0
    elif (im.mode == "I" and lo >= 0 and hi <= 255) or (im.mode == "F" and lo >= 0 and 1 < hi <= 255):
        scaled = arr
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        scaled = arr * 255.0
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def check_image(ref: str) -> str | None:
    """Why `ref` cannot be used as a training image (decoded as training will), or None."""
    try:
        load_image(ref, draft=True)
    except ImageError as exc:
        return str(exc)
    return None


def check_images_parallel(refs: Iterable[str], workers: int | None = None) -> dict[str, str | None]:
    """`check_image` for each distinct ref, on a thread pool (PIL decodes without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    unique = list(dict.fromkeys(refs))
    workers = workers or min(16, os.cpu_count() or 1)
    if workers <= 1 or len(unique) < 8:
        return {ref: check_image(ref) for ref in unique}
    with ThreadPoolExecutor(workers, thread_name_prefix="cogtune-decode") as pool:
        return dict(zip(unique, pool.map(check_image, unique, chunksize=16), strict=True))


def resolve_image_ref(ref: str, base_dir: Path) -> str:
    """Absolute path (relative refs are relative to `base_dir`), or the `data:` URL unchanged."""
    if ref.startswith("data:"):
        return ref
    if ref.startswith("file://"):
        ref = urllib.parse.unquote(ref[7:])
    path = Path(os.path.expanduser(ref))
    if not path.is_absolute():
        path = base_dir / path
    return str(path.resolve())


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return str(Path(root).resolve())


def outside_roots(resolved: str, roots: Sequence[Path | str]) -> bool:
    """Whether a resolved image path (symlinks followed, `..` collapsed) lies outside every root.

    Only path arithmetic (realpath), nothing is opened, so the answer says nothing about whether the
    file exists. `data:` URLs carry their bytes inline and are never outside.
    """
    if resolved.startswith("data:"):
        return False
    for r in roots:
        root = _real_root(os.path.abspath(r))
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


class _Row:
    """Collects the problems of one row."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def error(self, fld: str, message: str, hint: str = "", kind: str = "") -> None:
        self.problems.append(Problem(self.source, fld, message, hint, "error", kind or message))

    def warn(self, fld: str, message: str, hint: str = "", kind: str = "") -> None:
        self.problems.append(Problem(self.source, fld, message, hint, "warning", kind or message))

    @property
    def ok(self) -> bool:
        return not any(p.level == "error" for p in self.problems)


def _check_messages(row: _Row, raw: Any, require_answer: bool) -> list[Message]:
    if raw is None:
        row.error("messages", "missing", "every row needs a 'messages' list of {role, content}", "missing messages")
        return []
    if not isinstance(raw, list) or not raw:
        row.error("messages", f"expected a non-empty list, got {type(raw).__name__}",
                  "write [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", ...}]", "bad messages")
        return []
    messages: list[Message] = []
    for i, m in enumerate(raw):
        fld = f"messages[{i}]"
        if not isinstance(m, dict):
            row.error(fld, f"expected an object with role and content, got {type(m).__name__}", "", "bad message")
            continue
        role, content = m.get("role"), m.get("content")
        if role is None and "from" in m:
            row.error(f"{fld}.role", "missing ('from'/'value' keys are ShareGPT/LLaVA style)",
                      "convert the file with `cogtune convert --from sharegpt` (or --from llava)", "unknown role")
            continue
        if role is None:
            row.error(f"{fld}.role", "missing", "use one of: system, user, assistant", "missing role")
            continue
        if role not in ROLES:
            mapped = _FOREIGN_ROLES.get(str(role))
            hint = (f"use '{mapped}' (or convert with `cogtune convert --from sharegpt`)" if mapped
                    else "use one of: system, user, assistant")
            row.error(f"{fld}.role", f"is {role!r}; expected system, user or assistant", hint, "unknown role")
            continue
        if isinstance(content, list):
            row.error(f"{fld}.content", "is a list of content blocks (OpenAI style); expected a string",
                      "convert the file with `cogtune convert --from openai`", "non-string content")
            continue
        if not isinstance(content, str):
            what = "missing" if content is None else f"is {type(content).__name__}; expected a string"
            row.error(f"{fld}.content", what, "put the turn's text in 'content' as a string", "non-string content")
            continue
        if role != "user" and IMAGE_MARKER in content:
            row.error(f"{fld}.content", f"{role} turn contains '{IMAGE_MARKER}'",
                      "images can only be placed in user turns", "image marker outside user turn")
        messages.append(Message(role, content))
    if not row.ok:
        return messages

    # Order: optional system first, then user/assistant alternating, starting with user.
    expected = "user"
    for i, m in enumerate(messages):
        fld = f"messages[{i}].role"
        if m.role == "system":
            if i != 0:
                row.error(fld, "system turn is not the first message",
                          "move it to the start (one system prompt per conversation)", "misplaced system turn")
            continue
        if m.role != expected:
            if i == 0 or (i == 1 and messages[0].role == "system"):
                row.error(fld, "conversation starts with an assistant turn",
                          "the first non-system turn must be 'user'", "roles not alternating")
            else:
                row.error(fld, f"'{m.role}' follows another '{m.role}' turn",
                          "user and assistant must alternate; merge the two turns or add the missing reply",
                          "roles not alternating")
        expected = "assistant" if m.role == "user" else "user"
    if not row.ok or not require_answer:
        return messages
    answers = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not answers:
        row.error("messages", "no assistant turn", "add the answer the model should learn as an assistant turn",
                  "no assistant turn")
    else:
        if messages[-1].role == "user":
            row.error(f"messages[{len(messages) - 1}]", "last user turn has no answer",
                      "remove it or add the assistant reply", "unanswered last turn")
        for i in answers:
            if not messages[i].content.strip():
                row.error(f"messages[{i}].content", "assistant turn is empty",
                          "an empty answer trains the model to stop immediately; fill it in or drop the row",
                          "empty assistant content")
    return messages


def _check_images(row: _Row, raw: Any, messages: list[Message], base_dir: Path, max_images: int | None,
                  check_images: bool | Mapping[str, str | None],
                  roots: Sequence[Path | str] | None = None) -> list[str]:
    """Image refs of a row, resolved; `check_images` may be the results of `check_images_parallel`."""
    if raw is None:
        raw = []
    if isinstance(raw, str):
        row.error("images", "is a string; expected a list", f"write \"images\": [{json.dumps(raw)}]", "bad images")
        return []
    if not isinstance(raw, list):
        row.error("images", f"is {type(raw).__name__}; expected a list of paths", "", "bad images")
        return []
    refs: list[str] = []
    for i, ref in enumerate(raw):
        fld = f"images[{i}]"
        if not isinstance(ref, str) or not ref:
            row.error(fld, f"is {ref!r}; expected a path or data: URL", "", "bad image ref")
            continue
        if ref.startswith(("http://", "https://")):
            row.error(fld, f"is a web URL ({ref})", "download the image and reference the local file", "web URL")
            continue
        try:
            resolved = resolve_image_ref(ref, base_dir)
        except (OSError, ValueError) as exc:  # e.g. a NUL byte in the path
            row.error(fld, f"is not a usable path ({exc})", "", "bad image ref")
            continue
        if roots is not None and outside_roots(resolved, roots):
            where = " or ".join(str(r) for r in roots)
            row.error(fld, f"{ref} lies outside the data root {where}", OUTSIDE_HINT, "image outside data root")
            continue
        refs.append(resolved)
        if not resolved.startswith("data:") and not os.path.isfile(resolved):
            row.error(fld, f"image not found: {resolved}",
                      "paths are relative to the JSONL file's folder unless --image-root is given", "missing image")
        elif check_images:
            why = check_images[resolved] if isinstance(check_images, Mapping) and resolved in check_images \
                else check_image(resolved)
            if why is not None:
                row.error(fld, why, "re-export the image as PNG/JPEG or drop the row", "unreadable image")
    markers = sum(m.content.count(IMAGE_MARKER) for m in messages)
    if markers and markers != len(raw):
        row.error("messages", f"{markers} '{IMAGE_MARKER}' marker(s) but {len(raw)} image(s)",
                  "use one marker per image, or none (images then belong to the first user turn)",
                  "marker/image count mismatch")
    if max_images is not None and len(raw) > max_images:
        row.error("images", f"{len(raw)} images; this model takes at most {max_images} per conversation",
                  "official CogVLM/CogVLM2/CogAgent checkpoints see one image: split the row, or tile the images "
                  "into one picture", "too many images")
    return refs


def _check_videos(row: _Row, raw: Any, messages: list[Message], base_dir: Path, has_images: bool,
                  roots: Sequence[Path | str] | None) -> list[str]:
    """The row's video path (a list of at most one), resolved and checked for existence under the data root.

    Whether it decodes (and its duration, fps, frame count) is checked by `cogtune validate`, which has the
    decoder; this module stays free of it.
    """
    markers = sum(m.content.count(VIDEO_MARKER) for m in messages)
    if raw is None:
        if markers:
            row.error("messages", f"{markers} '{VIDEO_MARKER}' marker(s) but no 'videos' field",
                      "add \"videos\": [\"path/to/clip.mp4\"] or remove the marker", "marker/video count mismatch")
        return []
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        row.error("videos", f"is {json.dumps(raw)[:60]}; expected a list with one video path",
                  f"write \"videos\": [{json.dumps(raw if isinstance(raw, str) else 'clip.mp4')}]", "bad videos")
        return []
    if len(raw) > 1:
        row.error("videos", f"{len(raw)} videos; CogVLM2-Video takes one video per conversation",
                  "split the row, one video each", "too many videos")
    if has_images and raw:
        row.error("videos", "the row has both images and a video", "CogVLM2-Video takes a video, the image models "
                  "an image: keep one of them", "images and video")
    if markers > 1 or (markers and markers != len(raw)):
        row.error("messages", f"{markers} '{VIDEO_MARKER}' marker(s) but {len(raw)} video(s)",
                  "use one marker (optional: the video always sits right after BOS) or none",
                  "marker/video count mismatch")
    refs: list[str] = []
    for i, ref in enumerate(raw[:1]):
        fld = f"videos[{i}]"
        if ref.startswith(("http://", "https://", "data:")):
            row.error(fld, f"is not a local file ({ref[:60]})", "download the video and reference the local file",
                      "bad video ref")
            continue
        try:
            resolved = resolve_image_ref(ref, base_dir)
        except (OSError, ValueError) as exc:
            row.error(fld, f"is not a usable path ({exc})", "", "bad video ref")
            continue
        if roots is not None and outside_roots(resolved, roots):
            where = " or ".join(str(r) for r in roots)
            row.error(fld, f"{ref} lies outside the data root {where}", OUTSIDE_HINT.replace("images", "videos", 1),
                      "video outside data root")
            continue
        if not os.path.isfile(resolved):
            row.error(fld, f"video not found: {resolved}",
                      "paths are relative to the JSONL file's folder unless --image-root is given", "missing video")
            continue
        refs.append(resolved)
    return refs


def _render_boxes(row: _Row, obj: dict, messages: list[Message], images: list[str]) -> None:
    """Replace `<box>` markers with Cog text, in order; check boxes already written as text."""
    raw, fmt = obj.get("boxes"), obj.get("box_format")
    markers = sum(m.content.count(BOX_MARKER) for m in messages)
    if raw is None:
        if markers:
            row.error("boxes", f"{markers} '{BOX_MARKER}' marker(s) but no 'boxes' field",
                      "add \"boxes\": [...] and \"box_format\"", "box count mismatch")
    elif not isinstance(raw, list):
        row.error("boxes", f"is {type(raw).__name__}; expected a list", "", "bad boxes")
    elif fmt not in BOX_FORMATS:
        row.error("box_format", f"is {fmt!r}" if fmt is not None else "missing",
                  "say which form the boxes are in: xyxy (pixels), xywh (COCO pixels), norm ([0,1] xyxy) "
                  "or cog (000-999)", "bad box_format")
    elif len(raw) != markers:
        row.error("boxes", f"{len(raw)} box entries but {markers} '{BOX_MARKER}' marker(s)",
                  "write one <box> in the text per entry of 'boxes'", "box count mismatch")
    else:
        size = None
        if fmt in ("xyxy", "xywh"):
            if not images:
                row.error("box_format", f"{fmt} boxes are pixels but the row has no image",
                          "use norm or cog boxes, or add the image", "box out of range")
                return
            if not row.ok:
                return  # the image itself is already reported
            try:
                size = image_size(images[0])
            except ImageError as exc:
                row.error("images[0]", str(exc), "", "unreadable image")
                return
        texts: list[str] = []
        for i, entry in enumerate(raw):
            group = entry if (isinstance(entry, list) and entry and isinstance(entry[0], (list, tuple))) else [entry]
            cog = []
            for j, box in enumerate(group):
                problem = check_box(box, fmt, size)
                fld = f"boxes[{i}]" + (f"[{j}]" if len(group) > 1 else "")
                if problem:
                    row.error(fld, problem, "check box_format and the coordinates", "box out of range")
                else:
                    cog.append(to_cog(box, fmt, size))
            if len(cog) == len(group):
                texts.append(format_boxes(cog))
        if row.ok:
            it = iter(texts)
            for m in messages:
                while BOX_MARKER in m.content:
                    m.content = m.content.replace(BOX_MARKER, next(it), 1)
    for i, m in enumerate(messages):
        for group in parse_boxes(m.content):
            for box in group:
                if max(box) > 999 or box[0] > box[2] or box[1] > box[3]:
                    row.error(f"messages[{i}].content", f"box [[{','.join(map(str, box))}]] is invalid",
                              "Cog boxes are x0,y0,x1,y1 on a 000-999 scale with x0<=x1, y0<=y1; "
                              "use data_formats.boxes.to_cog to convert pixels", "box out of range")


def parse_row(obj: Any, source: str, base_dir: Path, *, default_id: str = "", max_images: int | None = None,
              check_images: bool = False, require_answer: bool = True, roots: Sequence[Path | str] | None = (),
              allow_outside_images: bool = False) -> tuple[Conversation | None, list[Problem]]:
    """Check one decoded JSON row; the Conversation is None when the row has any error.

    Image paths must resolve under one of `roots` (default: `base_dir`) unless `allow_outside_images`;
    others are refused before anything is opened.
    """
    row = _Row(source)
    try:
        return _parse_row(row, obj, base_dir, default_id, max_images, check_images, require_answer, roots,
                          allow_outside_images)
    except RecursionError:  # a value nested almost to the limit json.loads allows
        row.error("row", "nested too deeply", "rows are flat objects of strings and lists", "bad row")
        return None, row.problems


def _parse_row(row: _Row, obj: Any, base_dir: Path, default_id: str, max_images: int | None, check_images: bool,
               require_answer: bool, roots: Sequence[Path | str] | None,
               allow_outside_images: bool) -> tuple[Conversation | None, list[Problem]]:
    source = row.source
    if not isinstance(obj, dict):
        row.error("row", f"is a JSON {type(obj).__name__}; expected an object", "one JSON object per line", "bad row")
        return None, row.problems
    if "messages" not in obj:
        for key, fmt in (("conversations", "llava or sharegpt"), ("query", "swift")):
            if key in obj:
                row.error("messages", f"missing (row has '{key}', {fmt} style)",
                          f"convert the file with `cogtune convert --from {fmt.split()[0]}`", "foreign format")
                return None, row.problems
    rid = obj.get("id", default_id)
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        row.error("id", f"is {rid!r}; expected a non-empty string", "", "bad id")
    if "image" in obj and "images" not in obj:
        row.error("image", "single 'image' key; expected 'images' (a list)",
                  f"write \"images\": [{json.dumps(obj['image'])}]", "bad images")
    messages = _check_messages(row, obj.get("messages"), require_answer)
    if allow_outside_images:
        roots = None
    elif not roots:
        roots = (base_dir,)
    images = _check_images(row, obj.get("images"), messages, base_dir, max_images, check_images, roots)
    videos = _check_videos(row, obj.get("videos"), messages, base_dir, bool(obj.get("images")), roots)
    _render_boxes(row, obj, messages, images)
    if not row.ok:
        return None, row.problems
    return Conversation(str(rid), images, messages, source, videos), row.problems


def _decode_candidates(objs: Iterable[Any], base_dir: Path, allow_outside_images: bool) -> Iterator[str]:
    """Resolved refs that the row checks would decode: existing files under the root, and data: URLs."""
    for obj in objs:
        raw = obj.get("images") if isinstance(obj, dict) else None
        for ref in raw if isinstance(raw, list) else []:
            if not isinstance(ref, str) or not ref or ref.startswith(("http://", "https://")):
                continue
            try:
                resolved = resolve_image_ref(ref, base_dir)
            except (OSError, ValueError):
                continue
            if allow_outside_images or not outside_roots(resolved, (base_dir,)):
                if resolved.startswith("data:") or os.path.isfile(resolved):
                    yield resolved


def parse_lines(lines: Iterable[str], path: str | Path) -> tuple[list[tuple[int, str, Any]], list[Problem]]:
    """([(line number, "file:line", object)], problems) of JSONL lines: blank lines skipped, each bad line one
    problem. Shared by the SFT and preference validators."""
    parsed: list[tuple[int, str, Any]] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        obj, why = loads_row(line)
        if why is None:
            parsed.append((lineno, source, obj))
        else:
            problems.append(Problem(source, "line", why, "each line must be one complete JSON object", "error",
                                    "bad json"))
    return parsed, problems


def note_duplicate_id(row_id: str, source: str, seen: dict[str, str], problems: list[Problem]) -> None:
    """Record `row_id` as seen at `source`, or add a warning naming where it was first seen."""
    if row_id in seen:
        problems.append(Problem(source, "id", f"duplicate id {row_id!r} (first at {seen[row_id]})",
                                "ids should be unique so that predictions can be matched", "warning",
                                "duplicate id"))
    else:
        seen[row_id] = source


def validate_rows(lines: Iterable[str], *, path: str | Path, image_root: str | Path | None = None,
                  max_images: int | None = 1, check_images: bool = True, require_answer: bool = True,
                  allow_outside_images: bool = False) -> tuple[list[Conversation], list[Problem]]:
    """Check every line of a canonical JSONL file; returns the valid rows and every problem found.

    Nothing is raised for bad data: JSON errors, roles, contents, images (existence, and decoding
    when `check_images`), `<image>` marker counts, the image limit (`max_images`, None = no limit),
    boxes, missing/empty answers and turn order are all reported, each as its own `Problem`.
    Image paths must lie under the data root (`image_root`, default the file's folder) unless
    `allow_outside_images`. `lines` should come from `split_jsonl` (split on "\n" only).
    """
    path = Path(path)
    base_dir = Path(image_root) if image_root is not None else path.parent
    conversations: list[Conversation] = []
    seen: dict[str, str] = {}
    parsed, problems = parse_lines(lines, path)
    checked: bool | dict[str, str | None] = check_images
    if check_images:  # decode every distinct image once, in parallel, before the row checks read the results
        checked = check_images_parallel(_decode_candidates((obj for _, _, obj in parsed), base_dir,
                                                           allow_outside_images))
    for lineno, source, obj in parsed:
        conv, row_problems = parse_row(obj, source, base_dir, default_id=f"{path.stem}-{lineno}",
                                       max_images=max_images, check_images=checked,
                                       require_answer=require_answer, allow_outside_images=allow_outside_images)
        problems.extend(row_problems)
        if conv is None:
            continue
        note_duplicate_id(conv.id, source, seen, problems)
        conversations.append(conv)
    return conversations, problems


def read_jsonl(path: str | Path, image_root: str | Path | None = None, *, max_images: int | None = None,
               check_images: bool = False, require_answer: bool = True,
               allow_outside_images: bool = False) -> tuple[list[Conversation], list[Problem]]:
    """Read a canonical JSONL file: the valid rows, and every problem (images checked for existence only)."""
    lines, bad_lines = read_jsonl_lines(path)
    if lines is None:
        return [], bad_lines
    convs, problems = validate_rows(lines, path=path, image_root=image_root, max_images=max_images,
                                    check_images=check_images, require_answer=require_answer,
                                    allow_outside_images=allow_outside_images)
    return convs, bad_lines + problems


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically and return how many; publish only a complete, non-empty result.

    Rows go to a hidden temporary file in the same folder, which replaces `path` (os.replace) only once
    every row is written and there is at least one: an interruption, an exception from `rows`, or zero
    rows leave an existing `path` untouched (and no empty file). The file gets the usual permissions
    (0666 minus the umask), like any file the user creates.
    """
    path = Path(path)
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    n = 0
    published = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        if n:
            os.replace(tmp, path)
            published = True
    finally:
        if tmp.exists():
            tmp.unlink()
        if not published:
            for d in missing:  # folders made for this file only (innermost first)
                try:
                    d.rmdir()
                except OSError:
                    break
    return n


__all__ = ["Conversation", "IMAGE_MARKER", "BOX_MARKER", "ImageError", "ImagePathError", "Message", "Problem",
           "image_size", "load_image", "loads_row", "outside_roots", "parse_row", "read_jsonl", "resolve_image_ref",
           "note_duplicate_id", "parse_lines", "read_jsonl_lines", "split_jsonl", "validate_rows", "write_jsonl"]
