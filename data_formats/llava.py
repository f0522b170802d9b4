"""LLaVA instruction data (`llava_v1_5_mix665k.json` style) -> canonical rows.

Each element: `id`, optional `image` (a path relative to the image folder, `--image-root`),
`conversations` of {from: human|gpt|system, value}. LLaVA puts `<image>` in the first human turn,
which is also the canonical marker, so text passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_formats.common import Record, map_records
from data_formats.sharegpt import convert_row, parse_role_map

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def convert(path: Path, *, image_root: Path | None = None, role_map: str | None = None) -> Iterator[Record]:
    """Rows of a LLaVA JSON/JSONL file; images are relative to `image_root` (default: the file's folder)."""
    roles = parse_role_map(role_map, base=LLAVA_ROLES)
    yield from map_records(path, image_root, lambda obj, src, base, row_id: convert_row(obj, src, base, roles, row_id))
