"""Print `name==lower-bound` pins for the packages whose oldest release CI tests (see `make test-oldest`).

The lower bounds in pyproject.toml are the single source: the oldest environment installs exactly them.
(Plain text matching, no tomllib: the kit supports Python 3.10.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PINNED = ("transformers", "peft", "accelerate", "trl")


def main() -> int:
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    for name in PINNED:
        low = re.search(rf'^\s*"{name}\s*>=\s*([0-9][0-9A-Za-z.]*)', text, flags=re.MULTILINE)
        if low is None:
            print(f"pyproject.toml: dependency {name!r} has no '>=' lower bound to test", file=sys.stderr)
            return 1
        print(f"{name}=={low.group(1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
