"""Helpers the converters share: reading JSON/JSONL with line numbers, and the record type they yield."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_formats.schema import Problem, loads_row, split_jsonl

# What every converter yields: (file:line, canonical row or None when skipped, problems of that row).
Record = tuple[str, dict[str, Any] | None, list[Problem]]


def skip(source: str, fld: str, message: str, hint: str = "", kind: str = "") -> Record:
    """A record for a row that cannot be converted."""
    return source, None, [Problem(source, fld, message, hint, "error", kind or message)]


def iter_json_records(path: Path) -> Iterator[tuple[str, Any, list[Problem]]]:
    """(file:line, object, problems) for each row of a JSONL file or of a top-level JSON array.

    LLaVA and ShareGPT ship one big JSON array; line numbers are still reported (the line where each
    element starts) so that skipped rows can be found in an editor. Problems with field `file` mean
    the rest of the file could not be read (not UTF-8, a broken array): the conversion is incomplete.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        yield f"{path}:{line}", None, [Problem(f"{path}:{line}", "file", f"not UTF-8 text ({exc.reason} at byte "
                                               f"{exc.start})", "save the file as UTF-8", "error", "bad encoding")]
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    stripped = text.lstrip()
    if not stripped.startswith("["):
        for lineno, line in enumerate(split_jsonl(text), start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            obj, why = loads_row(line)
            if why is None:
                yield source, obj, []
            else:
                yield source, None, [Problem(source, "line", why, "each line must be one complete JSON object",
                                             "error", "bad json")]
        return
    decoder = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        source = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # One broken element makes the rest of the array unreadable; say where it broke.
            yield source, None, [Problem(f"{path}:{exc.lineno}", "file", f"not valid JSON ({exc.msg})",
                                         "fix the file at this position; rows after it were not read",
                                         "error", "bad json")]
            return
        except (RecursionError, ValueError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            yield source, None, [Problem(source, "file", f"not usable JSON ({why})",
                                         "fix the element starting here; rows after it were not read",
                                         "error", "bad json")]
            return
        yield source, obj, []


def map_records(path: Path, image_root: Path | None,
                convert_row: Callable[[Any, str, Path, str], Record]) -> Iterator[Record]:
    """Every record of a JSON/JSONL file through `convert_row(obj, source, base_dir, default_id)`.

    Records that could not be read pass through as their problems; ids default to `<file stem>-<n>`.
    """
    base_dir = image_root or path.parent
    for n, (source, obj, problems) in enumerate(iter_json_records(path)):
        if problems:
            yield source, None, problems
            continue
        yield convert_row(obj, source, base_dir, f"{path.stem}-{n}")
