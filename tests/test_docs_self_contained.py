"""The repository documents itself: no file points at a document outside it, and every section reference resolves.

Comments and docs cite sections as "docs/architecture.md §8.1" (docs/conventions.md §9). A bare "§N" means
a section of the same document inside docs/*.md, and a section of docs/architecture.md anywhere else (such a
file must name docs/architecture.md so a reader knows where to look). A section exists when the document has
a heading numbered N, e.g. `## 8. Position ids` or `### 8.1 Left padding`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
S = "\u00a7"  # the section sign, escaped where this file shows example references
DEFAULT_DOC = "docs/architecture.md"

# Pointers at documents that are not in the repository. Spelled in pieces so this file does not match itself.
FORBIDDEN = (
    "../" + "shared",
    "/" + "work/",
    "shared" + "/design",
    "shared" + "/reference",
    "user" + "-pains",
    "peers" + ".md",
    "style guide " + S,
    "spec " + S,
)
_FORBIDDEN_RE = re.compile("|".join(re.escape(p) for p in FORBIDDEN), re.IGNORECASE)
_SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
_DOC = re.compile(r"([\w./-]*[\w-]\.md)\b")
_HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
_BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".safetensors", ".bin", ".pt", ".pyc"}
# Where to look when the tree is not a git checkout (e.g. an unpacked archive).
_FALLBACK_DIRS = ("finetune", "adapters", "data_formats", "docs", "recipes", "tests", "bench", ".ci")


def tracked_files(root: Path = ROOT) -> list[Path]:
    """Files git tracks (untracked run outputs may mention anything); the source folders without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
        names = [n for n in out.stdout.decode().split("\0") if n]
        if names:
            return [root / n for n in names if (root / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    files = [p for p in root.iterdir() if p.is_file()]
    for d in _FALLBACK_DIRS:
        if (root / d).is_dir():
            files += [p for p in (root / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files


def read_text(path: Path) -> str | None:
    """The file's text, or None for binary files."""
    if path.suffix.lower() in _BINARY_SUFFIXES:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def sections(text: str) -> set[str]:
    """Numbers of a markdown document's numbered headings ("8", "8.1", ...)."""
    return set(_HEADING.findall(text))


def _resolve_doc(name: str, source: Path, root: Path) -> Path | None:
    for base in (root, source.parent):
        candidate = (base / name).resolve()
        if candidate.is_file():
            return candidate
    return None


def find_problems(path: Path, text: str, root: Path = ROOT) -> list[str]:
    """Every outside pointer and every unresolvable section reference in one file, as `file:line: message`."""
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    is_doc = path.suffix == ".md" and path.parent.name == "docs"
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}
    names_default = DEFAULT_DOC in text
    for lineno, line in enumerate(text.splitlines(), start=1):
        for m in _FORBIDDEN_RE.finditer(line):
            problems.append(f"{rel}:{lineno}: refers to {m.group(0)!r}, a document outside the repository; "
                            f"cite docs/architecture.md, docs/conventions.md or another file in the repository")
        for m in _SECTION.finditer(line):
            number = m.group(1)
            docs_before = _DOC.findall(line[: m.start()])
            if docs_before:
                doc_name = docs_before[-1]
                target = _resolve_doc(doc_name, path, root)
            elif is_doc:
                doc_name, target = str(rel), path.resolve()
            elif names_default:
                doc_name, target = DEFAULT_DOC, (root / DEFAULT_DOC).resolve()
            else:
                problems.append(f"{rel}:{lineno}: bare '§{number}' in a file that never names {DEFAULT_DOC}; "
                                f"write '{DEFAULT_DOC} §{number}'")
                continue
            if target is None or not target.is_file():
                problems.append(f"{rel}:{lineno}: '§{number}' cites {doc_name}, which does not exist")
                continue
            if target not in cache:
                cache[target] = sections(target.read_text(encoding="utf-8"))
            if number not in cache[target]:
                problems.append(f"{rel}:{lineno}: '{doc_name} §{number}' does not exist (no heading numbered "
                                f"{number} in {doc_name})")
    return problems


def test_no_file_refers_outside_the_repository_and_every_section_exists():
    files = tracked_files()
    assert any(p.name == "architecture.md" for p in files), "docs/architecture.md is missing from the file list"
    problems = []
    for path in files:
        text = read_text(path)
        if text is not None:
            problems += find_problems(path, text)
    assert not problems, "\n".join(problems)


def test_section_numbers_are_unique_per_document():
    for doc in sorted((ROOT / "docs").glob("*.md")):
        numbers = _HEADING.findall(doc.read_text(encoding="utf-8"))
        dupes = sorted({n for n in numbers if numbers.count(n) > 1})
        assert not dupes, f"{doc.relative_to(ROOT)}: section numbers used twice: {dupes}"


def test_code_cites_architecture_sections():
    """The model code points at the architecture document (the comments are the map into it)."""
    text = (ROOT / "finetune" / "models" / "cogvlm" / "modeling.py").read_text(encoding="utf-8")
    assert DEFAULT_DOC in text
    assert len(_SECTION.findall(text)) >= 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"# see docs/architecture.md {S}8.1\n", None),
        (f"# see docs/architecture.md {S}99\n", f"docs/architecture.md {S}99' does not exist"),
        (f"# (docs/architecture.md {S}7, {S}8.3)\n", None),
        (f"# (docs/architecture.md {S}7, {S}42)\n", f"{S}42' does not exist"),
        (f"# (docs/conventions.md {S}5)\n", None),
        (f"# (docs/missing.md {S}1)\n", "which does not exist"),
        (f"# quirk ({S}8)\n", "never names docs/architecture.md"),
        (f'"""Cites docs/architecture.md."""\n# quirk ({S}8)\n', None),
        (f'"""Cites docs/architecture.md."""\n# quirk ({S}77)\n', f"{S}77' does not exist"),
        ("# as the " + "spec " + f"{S}1.3 says\n", "outside the repository"),
        ("# (" + "user" + "-pains C5)\n", "outside the repository"),
        ("p = '../" + "shared" + "/configs'\n", "outside the repository"),
        ("DEFAULT = Path('/" + "work/x')\n", "outside the repository"),
        ("# (Style Guide " + f"{S}9.8)\n", "outside the repository"),
    ],
)
def test_checker_flags_bad_references(tmp_path, text, expected):
    """The checker itself: outside pointers and dangling or undeclared section references are reported."""
    (tmp_path / "docs").mkdir()
    headings = ["# Title", "## 7. Routing", "## 8. Positions", "### 8.1 Left", "### 8.3 Derived"]
    (tmp_path / "docs" / "architecture.md").write_text("\n\n".join(headings) + "\n")
    (tmp_path / "docs" / "conventions.md").write_text("## 5. Targets\n")
    source = tmp_path / "finetune" / "mod.py"
    source.parent.mkdir()
    source.write_text(text)
    problems = find_problems(source, text, root=tmp_path)
    if expected is None:
        assert problems == []
    else:
        assert problems and any(expected in p for p in problems), problems


def test_bare_sections_in_a_doc_refer_to_the_doc_itself(tmp_path):
    doc = tmp_path / "docs" / "guide.md"
    doc.parent.mkdir()
    doc.write_text(f"## 1. One\n\nSee {S}1 and {S}2.\n")
    problems = find_problems(doc, doc.read_text(), root=tmp_path)
    assert len(problems) == 1 and f"{S}2' does not exist" in problems[0]
