"""The packages depend one way: data_formats <- finetune <- adapters (docs/conventions.md, "Package boundaries").

`data_formats` reads and converts user data and knows no model; `finetune` holds the model families, the
processor and the trainer; `adapters` ships what training produced (merge, export, chat, predict, the demos).
Every import is read from the source, function-local ones included, so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the kit packages it may import
ALLOWED = {"data_formats": set(), "finetune": {"data_formats"}, "adapters": {"data_formats", "finetune"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level kit package) of every absolute import in a file; relative imports stay in the package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in ALLOWED]
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target != package and target not in allowed:
                    found.append(f"{path.relative_to(root)}:{line}: {package} imports {target}")
    return found


def test_no_import_against_the_declared_direction():
    assert violations() == []


def test_the_check_sees_a_function_local_import_against_the_direction(tmp_path):
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    (tmp_path / "data_formats" / "ok.py").write_text("import json\n")
    (tmp_path / "finetune" / "bad.py").write_text("def f():\n    from adapters.merge import merge_adapter\n")
    (tmp_path / "adapters" / "fine.py").write_text("from finetune.loading import load_model\nfrom . import merge\n")
    assert violations(tmp_path) == ["finetune/bad.py:2: finetune imports adapters"]
