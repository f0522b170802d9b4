"""Writing files the way users expect: atomically (readers never see half a file) and with the modes the user's
umask gives a new file (temporary files from mkstemp/mkdtemp and safetensors' writer are owner-only).

Light on purpose (no torch): the HTML preview and the data tools import it too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask round trip elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write to a temporary file beside `path`, then rename; the file gets 0666 minus the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def respect_umask(path: str | Path) -> None:
    """chmod `path` (and, for a folder, everything the kit wrote under it) to 0666/0777 minus the umask.

    Executable files keep their x bits (minus the umask). Symlinks are left alone.
    """
    mask = current_umask()
    path = Path(path)
    todo = [path]
    if path.is_dir() and not path.is_symlink():
        todo += list(path.rglob("*"))
    for p in todo:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        elif p.is_file():
            executable = p.stat().st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)
