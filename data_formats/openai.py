"""OpenAI chat rows (`messages` with content blocks) -> canonical rows.

A content block `{"type": "image_url", "image_url": {"url": ...}}` becomes an `<image>` marker at its
place in the turn (the url is a local path, `file://` URL or `data:` URL); `{"type": "text"}` blocks
are kept; blocks are joined with newlines. `developer` turns are read as `system`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.schema import IMAGE_MARKER, Problem, resolve_image_ref

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def convert_row(obj: Any, source: str, base_dir: Path, default_id: str) -> Record:
    """One OpenAI-style object -> canonical row."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return skip(source, "messages", "missing or not a list", "each row needs a 'messages' list", "no turns")
    messages: list[dict] = []
    images: list[str] = []
    problems: list[Problem] = []
    for i, m in enumerate(obj["messages"]):
        fld = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            problems.append(Problem(source, f"{fld}.role", f"unsupported role {role!r}",
                                    "only system/developer/user/assistant turns can be trained", "error",
                                    "unknown role"))
            continue
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": _ROLES[role], "content": content})
            continue
        if not isinstance(content, list):
            problems.append(Problem(source, f"{fld}.content", f"is {type(content).__name__}; expected a string or "
                                    "a list of blocks", "", "error", "non-string content"))
            continue
        parts: list[str] = []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif kind == "image_url":
                url = block.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or url.startswith(("http://", "https://")):
                    problems.append(Problem(source, f"{fld}.content[{j}].image_url", f"is {url!r}",
                                            "use a local path or a data: URL (download web images first)",
                                            "error", "web URL"))
                    continue
                images.append(resolve_image_ref(url, base_dir))
                parts.append(IMAGE_MARKER)
            else:
                problems.append(Problem(source, f"{fld}.content[{j}]", f"unsupported block type {kind!r}",
                                        "only 'text' and 'image_url' blocks are read", "error", "unsupported block"))
        messages.append({"role": _ROLES[role], "content": "\n".join(parts)})
    if problems:
        return source, None, problems
    return source, {"id": str(obj.get("id", default_id)), "images": images, "messages": messages}, []


def convert(path: Path, *, image_root: Path | None = None) -> Iterator[Record]:
    """Rows of an OpenAI chat JSONL file (fine-tuning format)."""
    yield from map_records(path, image_root, convert_row)
