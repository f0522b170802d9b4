"""Preference rows (DPO and the other offline preference losses): a prompt, a chosen and a rejected answer.

A row is the canonical SFT row without the final answer, plus the two answers to compare:

    {"id": "p-1", "images": ["cat.jpg"], "messages": [{"role": "user", "content": "<image>What is it?"}],
     "chosen": "A cat.", "rejected": "A dog."}

The prompt turns are checked by the very same rules as SFT rows (`schema.parse_row` with
`require_answer=False`), so images, markers, roles and boxes behave identically; on top of that the
prompt must end with a user turn and `chosen` / `rejected` must be different, non-empty strings. Every
problem of every row is reported at once as `file:line: field: message; hint`.

Converters read the RLAIF-V layout (`image`, `question`, `chosen`, `rejected`) and a ShareGPT-style
pair layout (`conversations` of from/value turns ending with a human turn, plus `chosen` / `rejected`
given as strings or as `{"from": "gpt", "value": ...}` turns).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from data_formats.common import Record, map_records, skip
from data_formats.schema import (
    Conversation,
    Problem,
    _decode_candidates,
    check_images_parallel,
    loads_row,
    note_duplicate_id,
    parse_lines,
    parse_row,
    resolve_image_ref,
    split_jsonl,
)
from data_formats.sharegpt import map_turns, parse_role_map


@dataclass
class PreferencePair:
    """A validated preference row: the prompt conversation (ending with a user turn) and two answers."""

    prompt: Conversation
    chosen: str
    rejected: str

    @property
    def id(self) -> str:
        return self.prompt.id

    @property
    def images(self) -> list[str]:
        return self.prompt.images

    def to_json(self) -> dict[str, Any]:
        """The canonical preference row (what the converters write)."""
        row = self.prompt.to_json()
        row.update(chosen=self.chosen, rejected=self.rejected)
        return row


def _answer_problems(obj: dict, source: str) -> list[Problem]:
    problems: list[Problem] = []
    for key in ("chosen", "rejected"):
        value = obj.get(key)
        if value is None:
            problems.append(Problem(source, key, "missing", f"every preference row needs '{key}' (a string)",
                                    "error", f"missing {key}"))
        elif not isinstance(value, str):
            problems.append(Problem(source, key, f"is {type(value).__name__}; expected a string",
                                    "write the answer text itself (not a list of turns)", "error", f"bad {key}"))
        elif not value.strip():
            problems.append(Problem(source, key, "is empty", "fill in the answer or drop the row", "error",
                                    f"empty {key}"))
    if not problems and obj["chosen"].strip() == obj["rejected"].strip():
        problems.append(Problem(source, "rejected", "is the same text as 'chosen'",
                                "a pair with identical answers carries no preference; drop the row", "error",
                                "identical answers"))
    return problems


def parse_pair(obj: Any, source: str, base_dir: Path, *, default_id: str = "", max_images: int | None = 1,
               check_images: Any = False, allow_outside_images: bool = False,
               roots: Sequence[Path | str] | None = ()) -> tuple[PreferencePair | None, list[Problem]]:
    """Check one decoded preference row; the pair is None when the row has any error.

    `check_images` and `roots` mean what they mean for `schema.parse_row`."""
    if not isinstance(obj, dict):
        return None, [Problem(source, "row", f"is a JSON {type(obj).__name__}; expected an object",
                              "one JSON object per line", "error", "bad row")]
    conv, problems = parse_row(obj, source, base_dir, default_id=default_id, max_images=max_images,
                               check_images=check_images, require_answer=False, roots=roots,
                               allow_outside_images=allow_outside_images)
    # SFT hints name the SFT converters; a preference row's ShareGPT-style turns convert with the pair converter
    problems = [replace(p, hint=p.hint.replace("--from sharegpt` (or --from llava)", "--from sharegpt-pairs`")
                        .replace("--from sharegpt`", "--from sharegpt-pairs`")) for p in problems]
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        problems.append(Problem(source, f"messages[{len(msgs) - 1}]", "prompt ends with an assistant turn",
                                "the prompt turns end with the user turn that 'chosen' and 'rejected' answer; "
                                "move the last answer into 'chosen'", "error", "prompt ends with answer"))
    problems.extend(_answer_problems(obj, source))
    if conv is None or any(p.level == "error" for p in problems):
        return None, problems
    return PreferencePair(conv, obj["chosen"], obj["rejected"]), problems


def validate_pairs(lines: Iterable[str], *, path: str | Path, image_root: str | Path | None = None,
                   max_images: int | None = 1, check_images: bool = True,
                   allow_outside_images: bool = False) -> tuple[list[PreferencePair], list[Problem]]:
    """Every line of a preference JSONL file: the valid pairs and every problem found (nothing raised)."""
    path = Path(path)
    base_dir = Path(image_root) if image_root is not None else path.parent
    pairs: list[PreferencePair] = []
    seen: dict[str, str] = {}
    parsed, problems = parse_lines(lines, path)
    checked: Any = check_images
    if check_images:  # every distinct image decoded once, in parallel, as for SFT rows
        checked = check_images_parallel(_decode_candidates((obj for _, _, obj in parsed), base_dir,
                                                           allow_outside_images))
    for lineno, source, obj in parsed:
        pair, row_problems = parse_pair(obj, source, base_dir, default_id=f"{path.stem}-{lineno}",
                                        max_images=max_images, check_images=checked,
                                        allow_outside_images=allow_outside_images)
        problems.extend(row_problems)
        if pair is None:
            continue
        note_duplicate_id(pair.id, source, seen, problems)
        pairs.append(pair)
    return pairs, problems


def read_pairs(path: str | Path, image_root: str | Path | None = None, *, max_images: int | None = 1,
               check_images: bool = False,
               allow_outside_images: bool = False) -> tuple[list[PreferencePair], list[Problem]]:
    """Read a preference JSONL file: the valid pairs and every problem (images checked for existence)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [Problem(str(path), "file", "not found", "check the path", "error", "missing file")]
    except UnicodeDecodeError as exc:
        return [], [Problem(str(path), "file", f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                            "save the file as UTF-8", "error", "bad encoding")]
    return validate_pairs(split_jsonl(text), path=path, image_root=image_root, max_images=max_images,
                          check_images=check_images, allow_outside_images=allow_outside_images)


def is_preference_row(obj: Any) -> bool:
    """True for a row that carries `chosen` / `rejected` (so SFT tools can say it is the wrong kind)."""
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


def is_preference_file(path: str | Path, sample: int = 50) -> bool:
    """True when the first readable JSONL rows (up to `sample`) are mostly preference rows.

    `cogtune validate` and `cogtune check` use it to pick the preference checks; a file that cannot be read
    is not one (the SFT checks then report why)."""
    try:
        with open(path, encoding="utf-8") as fh:
            rows = []
            for line in fh:
                if line.strip():
                    obj, why = loads_row(line)
                    if why is None:
                        rows.append(obj)
                if len(rows) >= sample:
                    break
    except (OSError, UnicodeDecodeError):
        return False
    return bool(rows) and 2 * sum(is_preference_row(r) for r in rows) > len(rows)


# ---------------------------------------------------------------------------------------------
# Converters
# ---------------------------------------------------------------------------------------------


def _images(raw: Any, base_dir: Path) -> list[Any]:
    if raw is None:
        return []
    raw = [raw] if isinstance(raw, (str, dict)) else raw
    refs = []
    for ref in raw if isinstance(raw, list) else [raw]:
        if isinstance(ref, dict):
            ref = ref.get("path") or ""
        refs.append(resolve_image_ref(ref, base_dir) if isinstance(ref, str) and ref else ref)
    return refs


def rlaif_v_row(obj: Any, source: str, base_dir: Path, default_id: str) -> Record:
    """One RLAIF-V object (`image`, `question`, `chosen`, `rejected`; optional `idx`/`id`) -> canonical row.

    RLAIF-V's question carries no image marker: the image goes to the (only) user turn, as for SFT rows.
    Answers are copied as they are; the canonical validation then checks them.
    """
    if not isinstance(obj, dict):
        return skip(source, "row", f"is a JSON {type(obj).__name__}; expected an object", "", "bad row")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        return skip(source, "question", "missing or not a string", "RLAIF-V rows need a 'question'",
                    "missing question")
    rid = obj.get("id", obj.get("idx", default_id))
    row = {"id": str(rid), "images": _images(obj.get("image", obj.get("images")), base_dir),
           "messages": [{"role": "user", "content": question}],
           "chosen": obj.get("chosen"), "rejected": obj.get("rejected")}
    return source, row, []


def _answer_text(value: Any) -> Any:
    """`"text"`, `{"from": "gpt", "value": "text"}` or `[{...}]` (one turn) -> "text"; anything else unchanged."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        return value.get("value", value.get("content"))
    return value


def sharegpt_pair_row(obj: Any, source: str, base_dir: Path, default_id: str,
                      role_map: dict[str, str] | None = None) -> Record:
    """One ShareGPT-style pair (`conversations` ending with a human turn + `chosen` / `rejected`) -> row."""
    if not isinstance(obj, dict):
        return skip(source, "row", f"is a JSON {type(obj).__name__}; expected an object", "", "bad row")
    key = "conversations" if "conversations" in obj else "messages"
    messages, problems = map_turns(obj.get(key), role_map or parse_role_map(None), source, key)
    if problems:
        return source, None, problems
    system = obj.get("system")
    if isinstance(system, str) and system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    row = {"id": str(obj.get("id", default_id)), "images": _images(obj.get("images", obj.get("image")), base_dir),
           "messages": messages, "chosen": _answer_text(obj.get("chosen")),
           "rejected": _answer_text(obj.get("rejected"))}
    return source, row, []


FORMATS = ("rlaif-v", "sharegpt-pairs")


def records(fmt: str, path: Path, *, image_root: Path | None = None, role_map: str | None = None) -> Iterator[Record]:
    """Unchecked canonical preference rows of an RLAIF-V (`fmt="rlaif-v"`) or ShareGPT pair
    (`fmt="sharegpt-pairs"`) JSON/JSONL file: (file:line, row or None, problems). `cogtune convert` checks
    them with `parse_pair` against its image roots."""
    if fmt == "rlaif-v":
        to_row = rlaif_v_row
    elif fmt == "sharegpt-pairs":
        mapping = parse_role_map(role_map)

        def to_row(obj: Any, src: str, base: Path, rid: str) -> Record:
            return sharegpt_pair_row(obj, src, base, rid, mapping)
    else:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return map_records(path, image_root, to_row)


def convert(fmt: str, path: Path, *, image_root: Path | None = None, role_map: str | None = None,
            allow_outside_images: bool = False) -> Iterator[tuple[str, PreferencePair | None, list[Problem]]]:
    """`records`, each checked by `parse_pair`: (file:line, pair or None, problems)."""
    base_dir = image_root or path.parent
    for source, row, problems in records(fmt, path, image_root=image_root, role_map=role_map):
        if row is None:
            yield source, None, problems
            continue
        pair, more = parse_pair(row, source, base_dir, allow_outside_images=allow_outside_images)
        yield source, pair, problems + more


__all__ = ["FORMATS", "PreferencePair", "convert", "is_preference_file", "is_preference_row", "parse_pair",
           "read_pairs", "records", "rlaif_v_row", "sharegpt_pair_row", "validate_pairs"]
