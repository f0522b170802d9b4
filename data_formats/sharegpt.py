"""ShareGPT rows: `conversations` (or `messages`) of {from, value} or {role, content}.

Role names vary between dumps (human/gpt, user/assistant, user/model...), so the mapping is an
option (`--role-map human=user,gpt=assistant`) rather than a guess; unknown roles skip the row with
a message naming the role.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.schema import Problem, resolve_image_ref

DEFAULT_ROLE_MAP: dict[str, str] = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
}


def parse_role_map(spec: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """`human=user,gpt=assistant` -> dict, added on top of `base` (default: the ShareGPT names)."""
    mapping = dict(DEFAULT_ROLE_MAP if base is None else base)
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or value.strip() not in ("system", "user", "assistant"):
            raise ValueError(f"--role-map entry {item!r}: expected NAME=system|user|assistant")
        mapping[key.strip()] = value.strip()
    return mapping


def map_turns(turns: Any, role_map: dict[str, str], source: str, key: str) -> tuple[list[dict], list[Problem]]:
    """Turns with from/value or role/content keys -> canonical messages, with one problem per bad turn."""
    if not isinstance(turns, list) or not turns:
        return [], [Problem(source, key, "missing or empty", "the row needs a list of turns", "error", "no turns")]
    messages: list[dict] = []
    problems: list[Problem] = []
    for i, turn in enumerate(turns):
        fld = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(source, fld, f"is {type(turn).__name__}; expected an object", "", "error",
                                    "bad turn"))
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in role_map:
            known = ", ".join(sorted(role_map))
            problems.append(Problem(source, f"{fld}.from", f"unknown role {role!r}",
                                    f"known: {known}; add it with --role-map {role}=user|assistant|system",
                                    "error", "unknown role"))
            continue
        if not isinstance(text, str):
            problems.append(Problem(source, f"{fld}.value", f"is {type(text).__name__}; expected a string", "",
                                    "error", "non-string content"))
            continue
        messages.append({"role": role_map[role], "content": text})
    return messages, problems


def image_list(obj: dict, base_dir: Path) -> list[str]:
    """`images` (list) or `image` (string or list) -> resolved refs; dicts with a `path` are accepted."""
    raw = obj.get("images", obj.get("image", []))
    if raw is None:
        raw = []
    if isinstance(raw, (str, dict)):
        raw = [raw]
    refs = []
    for ref in raw:
        if isinstance(ref, dict):
            ref = ref.get("path") or ref.get("url") or ""
        refs.append(resolve_image_ref(ref, base_dir) if isinstance(ref, str) and ref else ref)
    return refs


def convert_row(obj: Any, source: str, base_dir: Path, role_map: dict[str, str], default_id: str) -> Record:
    """One ShareGPT/LLaVA object -> canonical row (images resolved against `base_dir`)."""
    if not isinstance(obj, dict):
        return skip(source, "row", f"is a JSON {type(obj).__name__}; expected an object", "", "bad row")
    key = "conversations" if "conversations" in obj else "messages"
    messages, problems = map_turns(obj.get(key), role_map, source, key)
    if problems:
        return source, None, problems
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    rid = obj.get("id", default_id)
    row = {"id": str(rid), "images": image_list(obj, base_dir), "messages": messages}
    for key in ("boxes", "box_format"):  # grounding rows keep their boxes (checked like canonical rows)
        if key in obj:
            row[key] = obj[key]
    return source, row, []


def convert(path: Path, *, image_root: Path | None = None, role_map: str | None = None) -> Iterator[Record]:
    """Rows of a ShareGPT JSON/JSONL file; images relative to `image_root` (default: the file's folder)."""
    mapping = parse_role_map(role_map)
    yield from map_records(path, image_root,
                           lambda obj, src, base, row_id: convert_row(obj, src, base, mapping, row_id))
