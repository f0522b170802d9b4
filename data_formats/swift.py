"""ms-swift dataset rows -> canonical rows.

Two row forms are read: `messages` (role/content, `<image>` markers) + `images`, and the older
`query` / `response` / `history` ([[q, r], ...]) + optional `system` + `images`. Image paths are
relative to `--image-root` (default: the data file's folder).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.sharegpt import image_list, map_turns

_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def convert_row(obj: Any, source: str, base_dir: Path, default_id: str) -> Record:
    """One swift object (either form) -> canonical row."""
    if not isinstance(obj, dict):
        return skip(source, "row", f"is a JSON {type(obj).__name__}; expected an object", "", "bad row")
    if "messages" in obj:
        messages, problems = map_turns(obj["messages"], _ROLES, source, "messages")
        if problems:
            return source, None, problems
    elif "query" in obj:
        messages = []
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
            return skip(source, "history", "expected a list of [query, response] pairs", "", "bad history")
        for q, r in [*history, (obj["query"], obj.get("response"))]:
            messages.append({"role": "user", "content": q})
            if r is not None:
                messages.append({"role": "assistant", "content": r})
        if not all(isinstance(m["content"], str) for m in messages):
            return skip(source, "query", "query/response/history entries must be strings", "", "non-string content")
    else:
        return skip(source, "row", "has neither 'messages' nor 'query'", "", "no turns")
    system = obj.get("system")
    if isinstance(system, str) and system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return source, {"id": str(obj.get("id", default_id)), "images": image_list(obj, base_dir),
                    "messages": messages}, []


def convert(path: Path, *, image_root: Path | None = None) -> Iterator[Record]:
    """Rows of a swift JSON/JSONL file."""
    yield from map_records(path, image_root, convert_row)
