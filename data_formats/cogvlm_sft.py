"""CogVLM-SFT-311K folder layout -> canonical rows.

    DATASET/images/0001.jpg            (any image extension: matched to its label by file stem)
    DATASET/labels_en/0001.json        {"conversations": [{"role": "user", "content": ...}, ...]}

The official loader hard-codes `labels_en` and `.jpg` (docs/architecture.md §19.6); here the labels folder is an
option (`labels_en` by default when present, else `labels_zh`) and any extension PIL can read is
matched. INPUT may be one such folder or a parent holding several (the 311K release has subsets).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_formats.common import Record, skip
from data_formats.sharegpt import map_turns

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def _dataset_dirs(root: Path) -> list[Path]:
    if (root / "images").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "images").is_dir())


def _labels_dir(folder: Path, labels: str | None) -> Path | None:
    names = [labels] if labels else ["labels_en", "labels_zh", "labels"]
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def convert(path: Path, *, labels: str | None = None) -> Iterator[Record]:
    """Rows of every `images/` + `labels_*/` pair under `path`; unmatched files are reported, not dropped silently."""
    folders = _dataset_dirs(path)
    if not folders:
        yield skip(str(path), "folder", "no 'images/' folder found here or one level below",
                   "expected DATASET/images/*.jpg and DATASET/labels_en/*.json", "bad layout")
        return
    for folder in folders:
        labels_dir = _labels_dir(folder, labels)
        if labels_dir is None:
            yield skip(str(folder), "folder", f"no labels folder ({labels or 'labels_en, labels_zh or labels'})",
                       "pass --labels NAME for another folder name", "bad layout")
            continue
        by_stem: dict[str, list[Path]] = {}
        for img in sorted((folder / "images").iterdir()):
            if img.suffix.lower() in IMAGE_EXTENSIONS:
                by_stem.setdefault(img.stem, []).append(img)
        used: set[str] = set()
        for label in sorted(labels_dir.glob("*.json")):
            source = f"{label}:1"
            images = by_stem.get(label.stem, [])
            used.add(label.stem)
            if not images:
                yield skip(source, "images", f"no image named {label.stem}.* in {folder / 'images'}",
                           "add the image or remove the label", "label without image")
                continue
            if len(images) > 1:
                yield skip(source, "images", f"several images share the stem {label.stem!r}: "
                           + ", ".join(p.name for p in images), "keep one", "ambiguous image")
                continue
            try:
                obj = json.loads(label.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield skip(source, "file", f"not valid JSON ({exc})", "", "bad json")
                continue
            turns = obj.get("conversations") if isinstance(obj, dict) else None
            messages, problems = map_turns(turns, _ROLES, source, "conversations")
            if problems:
                yield source, None, problems
                continue
            rid = f"{folder.name}/{label.stem}"
            yield source, {"id": rid, "images": [str(images[0].resolve())], "messages": messages}, []
        for stem, imgs in sorted(by_stem.items()):
            if stem not in used:
                yield skip(str(imgs[0]), "labels", f"image has no label file {labels_dir.name}/{stem}.json",
                           "add a label or ignore (the image is not used)", "image without label")
