"""Video datasets -> canonical rows with a `videos` field (CogVLM2-Video).

Two layouts:

* ``llava-video``: LLaVA-Video / ShareGPT style JSON or JSONL, one object per clip with a `video` path (string,
  or a one-element list) and `conversations` (`from`/`value`) or `messages`. LLaVA-Video writes the clip's
  marker as `<image>` in the first human turn; it becomes `<video>` (the marker is optional: the clip always sits
  right after BOS).
* ``video-folder``: a folder of clips with captions, for the caption model. A caption is the text file next to
  the clip (`clip.mp4` + `clip.txt`), or a line of `metadata.jsonl` / `captions.jsonl` in the folder
  (`{"file_name": "clip.mp4", "caption": "..."}`; `video`/`path` and `text` are accepted too). Each clip becomes
  one turn: the prompt (`--prompt`, default the caption model's "Please describe this video in detail.") and the
  caption as the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.schema import IMAGE_MARKER, VIDEO_MARKER, loads_row, resolve_image_ref
from data_formats.sharegpt import convert_row, parse_role_map

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")
CAPTION_PROMPT = "Please describe this video in detail."


def _video_row(obj: Any, source: str, base: Path, roles: dict[str, str], row_id: str) -> Record:
    source, row, problems = convert_row(obj, source, base, roles, row_id)
    if row is None:
        return source, row, problems
    raw = obj.get("video", obj.get("videos"))
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        return skip(source, "video", f"is {json.dumps(raw)[:60]}; expected one video path",
                    "each row needs \"video\": \"path/to/clip.mp4\"", "bad videos")
    row["videos"] = [resolve_image_ref(raw, base)]
    if not obj.get("image") and not obj.get("images"):
        row["images"] = []
        for m in row["messages"]:  # LLaVA-Video marks the clip with <image>
            m["content"] = m["content"].replace(IMAGE_MARKER, VIDEO_MARKER)
    return source, row, []


def convert_llava_video(path: Path, *, image_root: Path | None = None,
                        role_map: str | None = None) -> Iterator[Record]:
    """Rows of a LLaVA-Video / ShareGPT-with-video file; video paths relative to `image_root` or the file's folder."""
    roles = parse_role_map(role_map, base=LLAVA_ROLES)
    yield from map_records(path, image_root, lambda obj, src, base, rid: _video_row(obj, src, base, roles, rid))


def _metadata_captions(folder: Path) -> tuple[dict[str, tuple[str, str]], list[Record]]:
    """{file name: (caption, source)} from metadata.jsonl / captions.jsonl, and records for bad lines."""
    found: dict[str, tuple[str, str]] = {}
    bad: list[Record] = []
    for name in ("metadata.jsonl", "captions.jsonl"):
        meta = folder / name
        if not meta.is_file():
            continue
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            source = f"{meta}:{lineno}"
            obj, why = loads_row(line)
            key = next((obj.get(k) for k in ("file_name", "video", "path") if isinstance(obj, dict) and obj.get(k)),
                       None) if why is None else None
            text = next((obj.get(k) for k in ("caption", "text") if isinstance(obj, dict)
                         and isinstance(obj.get(k), str)), None) if why is None else None
            if why is not None or not isinstance(key, str) or not text:
                bad.append(skip(source, "line", why or "needs \"file_name\" and \"caption\"",
                                "one {\"file_name\": ..., \"caption\": ...} object per line", "bad caption"))
                continue
            found[key] = (text, source)
    return found, bad


def convert_video_folder(folder: Path, *, prompt: str | None = None) -> Iterator[Record]:
    """One caption row per clip of `folder` (recursively), in path order; clips without a caption are reported."""
    if not folder.is_dir():
        yield skip(str(folder), "file", "is not a folder", "pass the folder that holds the clips", "bad input")
        return
    captions, bad = _metadata_captions(folder)
    yield from bad
    question = prompt or CAPTION_PROMPT
    for clip in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        rel = clip.relative_to(folder).as_posix()
        source = str(clip)
        if rel in captions:
            text, source = captions[rel]
        elif clip.with_suffix(".txt").is_file():
            text = clip.with_suffix(".txt").read_text(encoding="utf-8").strip()
        else:
            yield skip(source, "caption", "no caption for this clip",
                       f"add {clip.with_suffix('.txt').name} next to it or a metadata.jsonl line", "no caption")
            continue
        if not text.strip():
            yield skip(source, "caption", "caption is empty", "write the caption or remove the clip", "empty caption")
            continue
        row = {"id": clip.relative_to(folder).with_suffix("").as_posix(), "images": [],
               "videos": [str(clip.resolve())],
               "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": text.strip()}]}
        yield source, row, []
