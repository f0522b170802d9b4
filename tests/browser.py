"""Headless Chromium for the HTML tests: screenshots, the DOM after scripts ran, console messages, pixel search.

Chromium is Debian's `chromium` package (`.ci/install-browser` installs it in CI). Tests that need it
call `require_chromium()`, which skips with the reason when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSER = "chromium"


def require_chromium() -> str:
    path = shutil.which(BROWSER)
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium, or run .ci/install-browser): "
                    "the HTML pages cannot be checked in a browser")
    return path


def _run(args: list[str], url: str) -> subprocess.CompletedProcess:
    cmd = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--virtual-time-budget=3000", "--enable-logging=stderr", "--v=0",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Every console message the page produced (errors, uncaught exceptions, logs): none are expected."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def screenshot(page: Path, png: Path, size: tuple[int, int], fragment: str = "") -> tuple[np.ndarray, list[str]]:
    """(RGB pixels (H, W, 3) of the rendered page, console messages)."""
    res = _run([f"--window-size={size[0]},{size[1]}", f"--screenshot={png}"], page.resolve().as_uri() + fragment)
    assert png.is_file(), f"chromium wrote no screenshot: {res.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(int), console_messages(res.stderr)


def dom(page: Path, fragment: str = "") -> tuple[str, list[str]]:
    """(the DOM after the page's scripts ran, console messages)."""
    res = _run(["--dump-dom"], page.resolve().as_uri() + fragment)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, console_messages(res.stderr)


def script_error(html: str) -> str | None:
    """The error the page's own hook recorded on <html data-js-error=...>, if any script failed."""
    import re

    tag = re.search(r"<html[^>]*>", html)
    assert tag, "no <html> element in the DOM"
    found = re.search(r'data-js-error="([^"]*)"', tag.group(0))
    return found.group(1) if found else None


def shown(html: str) -> str:
    """The rendered cards only (the DOM also holds the page's data as JSON)."""
    start = html.index('<div id="cards">')
    return html[start:html.index("</main>", start)]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int) -> np.ndarray:
    """Mask of pixels within `tol` of `rgb` in every channel."""
    return (np.abs(pixels - np.asarray(rgb)) <= tol).all(axis=-1)


def _longest_run(mask: np.ndarray) -> np.ndarray:
    """Length of the longest run of True in each row of a 2-D mask."""
    best = np.zeros(mask.shape[0], dtype=int)
    current = np.zeros(mask.shape[0], dtype=int)
    for col in mask.T:
        current = np.where(col, current + 1, 0)
        best = np.maximum(best, current)
    return best


def find_region(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12,
                min_run: int = 20) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1), exclusive ends, of the rows/columns holding an unbroken run of at least
    `min_run` pixels of `rgb`: locates an image on the screenshot by its background colour (anti-aliased
    text never makes such runs)."""
    mask = near(pixels, rgb, tol)
    rows = np.nonzero(_longest_run(mask) >= min_run)[0]
    cols = np.nonzero(_longest_run(mask.T) >= min_run)[0]
    assert len(cols) and len(rows), f"no region of colour {rgb} on the screenshot"
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def runs(line: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> list[float]:
    """Centres of the runs of `rgb`-coloured pixels along a 1-D line of pixels (N, 3)."""
    mask = near(line, rgb, tol)
    centres, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            centres.append((start + i - 1) / 2)
            start = None
    return centres
