"""Hugging Face `datasets` data (a `save_to_disk` folder, or parquet files) -> canonical rows.

Images in the dataset (PIL images, `{"bytes", "path"}` dicts, raw bytes or paths) are written as PNG
files into `OUT_images/` next to the output JSONL, so the result is an ordinary cogtune dataset that
no longer needs `datasets` to read. Text comes from, in this order of preference:
  - a `messages`/`conversations` column (role/content or from/value turns; typed content blocks
    `{"type": "image"}` / `{"type": "text", "text": ...}` as in HF chat datasets become `<image>`
    markers and text), or
  - a question column and an answer column (`--question-column`, `--answer-column`, or detected
    from common names); with no question column, `--prompt` gives the fixed user turn (captioning).
An answer column holding a list (several captions or VQA answers) uses its first entry.
Row ids are `NAME-INDEX`; problems are reported as `INPUT[INDEX]` (0-based row index).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_formats.common import Record, skip
from data_formats.schema import IMAGE_MARKER, Problem, resolve_image_ref
from data_formats.sharegpt import DEFAULT_ROLE_MAP

IMAGE_NAMES = ("image", "images", "img", "image_path", "file_name", "picture")
MESSAGE_NAMES = ("messages", "conversations", "conversation")
QUESTION_NAMES = ("question", "query", "prompt", "instruction", "input", "user")
ANSWER_NAMES = ("answer", "answers", "response", "caption", "captions", "output", "completion", "label", "text",
                "assistant")


def _load(path: Path, split: str | None) -> Any:
    import datasets  # heavy; only this converter needs it

    if path.is_file() and path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            chosen = split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
            if chosen not in ds:
                raise ValueError(f"{path} holds splits {names}; choose one with --split")
            ds = ds[chosen]
        return ds
    files = sorted(str(p) for p in path.rglob("*.parquet"))
    if split:
        files = [f for f in files if split in Path(f).name or f"/{split}/" in f]
    if not files:
        raise ValueError(f"{path}: no save_to_disk dataset and no *.parquet files found")
    return datasets.Dataset.from_parquet(files)


def _feature_is_image(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return isinstance(inner, datasets.Image)


def _pick(columns: list[str], explicit: str | None, names: tuple[str, ...], what: str) -> str | None:
    if explicit:
        if explicit not in columns:
            raise ValueError(f"--{what}-column {explicit!r} is not a column; columns: {', '.join(columns)}")
        return explicit
    return next((c for c in names if c in columns), None)


def _save_image(value: Any, dest: Path, input_dir: Path) -> str:
    """Write one image value as PNG (or resolve a path) and return its absolute path."""
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image dict has neither bytes nor path")
    if isinstance(value, str):
        return resolve_image_ref(value, input_dir)
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    if not isinstance(value, Image.Image):
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    value.save(dest, format="PNG")
    return str(dest.resolve())


def _turns(value: Any, source: str, col: str) -> tuple[list[dict], int, list[Problem]]:
    """Messages from a turns column; returns (messages, number of image blocks seen, problems)."""
    messages: list[dict] = []
    n_image_blocks = 0
    problems: list[Problem] = []
    for i, turn in enumerate(value or []):
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in DEFAULT_ROLE_MAP:
            problems.append(Problem(source, f"{col}[{i}].role", f"unknown role {role!r}", "", "error", "unknown role"))
            continue
        if isinstance(content, list):
            parts = []
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "image":
                    parts.append(IMAGE_MARKER)
                    n_image_blocks += 1
                elif kind == "text" and isinstance(block.get("text"), str):
                    parts.append(block["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            problems.append(Problem(source, f"{col}[{i}].content", f"is {type(content).__name__}; expected text", "",
                                    "error", "non-string content"))
            continue
        messages.append({"role": DEFAULT_ROLE_MAP[role], "content": content})
    return messages, n_image_blocks, problems


def convert(path: Path, *, out_path: Path, split: str | None = None, image_column: str | None = None,
            messages_column: str | None = None, question_column: str | None = None,
            answer_column: str | None = None, prompt: str | None = None) -> Iterator[Record]:
    """Rows of a datasets folder or parquet file(s); images go to `<out stem>_images/`."""
    try:
        ds = _load(path, split)
        columns = list(ds.column_names)
        img_col = image_column or next((c for c in columns if _feature_is_image(ds.features[c])), None)
        img_col = _pick(columns, img_col, IMAGE_NAMES, "image")
        msg_col = _pick(columns, messages_column, MESSAGE_NAMES, "messages")
        q_col = a_col = None
        if msg_col is None:
            q_col = _pick(columns, question_column, QUESTION_NAMES, "question")
            a_col = _pick(columns, answer_column, ANSWER_NAMES, "answer")
            if a_col is None or (q_col is None and prompt is None):
                raise ValueError(f"cannot tell which columns hold the text (columns: {', '.join(columns)}); pass "
                                 "--messages-column, or --answer-column with --question-column or --prompt")
    except (ValueError, FileNotFoundError, OSError) as exc:
        yield skip(str(path), "dataset", str(exc), "", "unreadable dataset")
        return
    image_dir = out_path.parent / f"{out_path.stem}_images"
    for i, row in enumerate(ds):
        source = f"{path}[{i}]"
        images: list[str] = []
        raw = row.get(img_col) if img_col else None
        values = raw if isinstance(raw, list) else ([] if raw is None else [raw])
        try:
            for k, value in enumerate(values):
                suffix = f"-{k}" if len(values) > 1 else ""
                images.append(_save_image(value, image_dir / f"{i:07d}{suffix}.png", path.parent))
        except (ValueError, OSError) as exc:
            yield skip(source, img_col or "image", f"cannot read image: {exc}", "", "unreadable image")
            continue
        if msg_col:
            messages, _, problems = _turns(row[msg_col], source, msg_col)
            if problems:
                yield source, None, problems
                continue
        else:
            answer = row[a_col]
            if isinstance(answer, list):
                answer = answer[0] if answer else None
            question = row[q_col] if q_col else prompt
            if not isinstance(answer, str) or not isinstance(question, str):
                yield skip(source, a_col if not isinstance(answer, str) else (q_col or "prompt"),
                           "expected text", "", "non-string content")
                continue
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rid = str(row["id"]) if isinstance(row.get("id"), (str, int)) else f"{path.stem}-{i}"
        yield source, {"id": rid, "images": images, "messages": messages}, []
