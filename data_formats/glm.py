"""GLM-4V / CogAgent-9B fine-tuning JSONL -> canonical rows.

Rows are `{"messages": [{"role": "user", "content": ..., "image": PATH}, {"role": "assistant", ...}]}`
with the image attached to a user turn (normally the first). An image on the first user turn needs no
marker (that is the canonical default); an image on a later turn gets an `<image>` marker there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.schema import IMAGE_MARKER, Problem, resolve_image_ref

_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def convert_row(obj: Any, source: str, base_dir: Path, default_id: str) -> Record:
    """One GLM object -> canonical row."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return skip(source, "messages", "missing or not a list", "each row needs a 'messages' list", "no turns")
    messages: list[dict] = []
    images: list[tuple[int, str]] = []
    problems: list[Problem] = []
    for i, m in enumerate(obj["messages"]):
        fld = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            problems.append(Problem(source, f"{fld}.role", f"unsupported role {role!r}",
                                    "tool/observation turns cannot be trained here; drop them", "error",
                                    "unknown role"))
            continue
        content = m.get("content")
        if not isinstance(content, str):
            problems.append(Problem(source, f"{fld}.content", f"is {type(content).__name__}; expected a string", "",
                                    "error", "non-string content"))
            continue
        image = m.get("image")
        if image:
            if not isinstance(image, str):
                problems.append(Problem(source, f"{fld}.image", f"is {image!r}; expected a path", "", "error",
                                        "bad image ref"))
                continue
            images.append((len(messages), resolve_image_ref(image, base_dir)))
        messages.append({"role": _ROLES[role], "content": content})
    if problems:
        return source, None, problems
    first_user = next((k for k, m in enumerate(messages) if m["role"] == "user"), -1)
    if len(images) > 1 or (images and images[0][0] != first_user):
        for k, _ in images:
            messages[k]["content"] = IMAGE_MARKER + messages[k]["content"]
    return source, {"id": str(obj.get("id", default_id)), "images": [ref for _, ref in images],
                    "messages": messages}, []


def convert(path: Path, *, image_root: Path | None = None) -> Iterator[Record]:
    """Rows of a GLM-4V / CogAgent JSONL file."""
    yield from map_records(path, image_root, convert_row)
