"""Fault and bad-input sweep: the figures behind docs/reliability.md (issue 14's closing note).

Run from the repository root: `python bench/fault_sweep.py [--keep] [--only bad|faults]`. Everything happens in a
temporary folder (tiny models from `cogtune make-tiny`, synthetic data); nothing outside it is written. Bad inputs
run in this process through `finetune.cli.main` (a subprocess per case costs ~10 s of imports on a loaded CPU);
cases that could exhaust memory or hang, and every SIGKILL, run as subprocesses with a timeout.

Each case is classified:
- clean: non-zero exit, no "Traceback", and the message names the file:line / key / path it is about;
- accepted: a valid (if unusual) input that the command accepted, as documented;
- BAD: a traceback, a wrong success, a wrong refusal, a hang past the timeout, or a user file lost or changed.
Before each case the sandbox's user files (everything under user/: data, images, bases, recipes, notes) are
hashed; after it they must all be present and unchanged ("nothing lost").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PY = sys.executable


@dataclass
class Result:
    """One case's outcome."""

    cat: str
    name: str
    outcome: str  # clean | accepted | BAD
    why: str = ""
    repro: str = ""


@dataclass
class Sweep:
    """Sandbox paths and collected results."""

    root: Path
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def user(self) -> Path:
        return self.root / "user"

    @property
    def out(self) -> Path:
        return self.root / "out"


# ----------------------------------------------------------------------------------------------- running


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_inproc(argv: list[str], timeout: int = 120) -> tuple[object, str]:
    """cogtune VERB ... in this process; returns (exit status | 'timeout' | 'exception', output)."""
    from finetune import cli

    buf = io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    rc: object
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = cli.main(list(argv))
    except _Timeout:
        rc = "timeout"
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code not in (None, 0) and not isinstance(e.code, int):
            buf.write(str(e.code))
    except BaseException:  # noqa: BLE001 - a traceback is what we classify
        rc = "exception"
        buf.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, buf.getvalue()


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


def run_sub(argv: list[str], timeout: int = 180, cwd: Path | None = None, extra_env: dict | None = None):
    """cogtune VERB ... as a subprocess (own session, killed whole on timeout)."""
    e = env()
    e.update(extra_env or {})
    p = subprocess.Popen([PY, "-m", "finetune.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=cwd, env=e, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return "timeout", out


def snapshot(folder: Path) -> dict[str, str]:
    """path -> sha256 of every file under folder (symlinks: their target text)."""
    snap = {}
    for dirpath, dirnames, files in os.walk(folder):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                snap[rel] = "link:" + os.readlink(p)
            else:
                snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def lost(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """User files missing or changed."""
    return [f"{k} {'missing' if k not in after else 'changed'}" for k, v in before.items() if after.get(k) != v]


def classify(rc, out: str, expect: str, names: list[str]) -> tuple[str, str]:
    """clean / accepted / BAD for one command's result."""
    if rc == "timeout":
        return "BAD", "hang: timed out"
    if rc == "exception" or "Traceback (most recent call last)" in out:
        return "BAD", "traceback: " + out.strip().splitlines()[-1][:200] if out.strip() else "exception"
    if expect == "error_or_skip" and rc == 0 and "skipped" in out:
        return "accepted", "row skipped"
    if expect == "ok":
        return ("accepted", "") if rc == 0 else ("BAD", f"refused a valid input (exit {rc}): {_first(out)}")
    if rc == 0:
        return "BAD", f"wrong success (exit 0): {_first(out)}"
    if names and not any(n in out for n in names):
        return "BAD", f"message names none of {names}: {_first(out)}"
    return "clean", _first(out)


def _first(out: str) -> str:
    for line in out.splitlines():
        s = line.strip()
        if s and "%|" not in s:
            return s[:220]
    return ""


def case(sw: Sweep, cat: str, name: str, argv: list[str], expect: str = "error", names: list[str] | None = None,
         sub: bool = False, timeout: int = 120, check=None) -> Result:
    """Run one bad-input case, classify it, verify nothing under user/ was lost."""
    before = snapshot(sw.user)
    t0 = time.time()
    rc, out = run_sub(argv, timeout, cwd=sw.root) if sub else run_inproc(argv, timeout)
    outcome, why = classify(rc, out, expect, names or [])
    if check is not None and outcome != "BAD":
        extra = check(rc, out)
        if extra:
            outcome, why = "BAD", extra
    gone = lost(before, snapshot(sw.user))
    if gone:
        outcome, why = "BAD", "user files lost/changed: " + ", ".join(gone[:5])
    r = Result(cat, name, outcome, why, "cogtune " + " ".join(argv))
    sw.results.append(r)
    mark = "BAD " if outcome == "BAD" else "ok  "
    print(f"  {mark}[{cat}] {name} ({outcome}, {time.time() - t0:.1f}s){': ' + why if outcome == 'BAD' else ''}",
          flush=True)
    return r


# ----------------------------------------------------------------------------------------------- fixtures


def make_png(path: Path, colour=(200, 30, 30), size=56, mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path)
    return path


def good_row(img: str = "img/ok.png", rid: str = "good") -> dict:
    return {"id": rid, "images": [img], "messages": [{"role": "user", "content": "<image>What colour?"},
                                                     {"role": "assistant", "content": "red"}]}


def build(sw: Sweep) -> None:
    """Tiny bases, data, a base recipe."""
    u = sw.user
    for d in ("data", "outside", "recipes", "models"):
        (u / d).mkdir(parents=True, exist_ok=True)
    sw.out.mkdir()
    (sw.root / "tmp").mkdir()
    procs = [subprocess.Popen([PY, "-m", "finetune.cli", "make-tiny", "--family", "cogvlm2", "--out",
                               str(u / "models" / name), "--seed", seed], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT) for name, seed in (("base", "0"), ("base-seed7", "7"))]
    from adapters.demo import write_task

    write_task(u / "data", 16, 4, 0)
    make_png(u / "data" / "img" / "ok.png")
    make_png(u / "outside" / "secret.png")
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("make-tiny failed")
    recipe(sw, "good", sw.out / "recipe-runs" / "good")


def recipe(sw: Sweep, name: str, out_dir: Path, extra: str = "", max_steps: int = 2, save_steps: int = 1000,
           train_path: Path | None = None) -> Path:
    """A tiny recipe file under user/recipes."""
    u = sw.user
    text = f"""model:
  checkpoint_dir: {u / 'models' / 'base'}
  dtype: float32
data:
  train_path: {train_path or u / 'data' / 'train.jsonl'}
  max_length: 64
  num_workers: 0
lora:
  targets: [experts]
  r: 4
  lora_alpha: 8
  lora_dropout: 0.0
train:
  learning_rate: 1.0e-3
  max_steps: {max_steps}
  per_device_train_batch_size: 2
  save_steps: {save_steps}
  logging_steps: 1
  report_to: [none]
eval:
  eval_steps: 0
  generation_rows: 0
output:
  dir: {out_dir}
{extra}"""
    p = u / "recipes" / f"{name}.yaml"
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------------------------- bad inputs


def jsonl_cases() -> list[tuple[str, bytes, str]]:
    """(name, second line bytes, expect) -- line 1 is always a good row."""
    def row(**kw) -> dict:
        r = good_row()
        r.update(kw)
        return r

    def msgs(*turns) -> dict:
        return row(messages=[{"role": r, "content": c} for r, c in turns])

    j = lambda o: json.dumps(o).encode()  # noqa: E731
    c: list[tuple[str, bytes, str]] = []
    for role in ("human", "gpt", "bot", "System", "", "tool", "model", "USER"):
        c.append((f"role {role!r}", j(msgs((role, "<image>hi"), ("assistant", "x"))), "error"))
    c.append(("role null", j(row(messages=[{"role": None, "content": "hi"}, {"role": "assistant", "content": "x"}])),
              "error"))
    c.append(("role int", j(row(messages=[{"role": 5, "content": "hi"}, {"role": "assistant", "content": "x"}])),
              "error"))
    c += [
        ("no messages", j({"id": "x", "images": ["img/ok.png"]}), "error"),
        ("messages empty", j(row(messages=[])), "error"),
        ("messages string", j(row(messages="hi")), "error"),
        ("messages dict", j(row(messages={"role": "user", "content": "hi"})), "error"),
        ("turn without role", j(row(messages=[{"content": "hi"}, {"role": "assistant", "content": "x"}])), "error"),
        ("turn without content", j(row(messages=[{"role": "user"}, {"role": "assistant", "content": "x"}])), "error"),
        ("turn is string", j(row(messages=["hi", {"role": "assistant", "content": "x"}])), "error"),
        ("row is list", j([1, 2]), "error"),
        ("row is string", j("hello"), "error"),
        ("row is number", b"42", "error"),
        ("row is null", b"null", "error"),
        ("content int", j(msgs(("user", 5), ("assistant", "x"))), "error"),
        ("content list", j(msgs(("user", ["a"]), ("assistant", "x"))), "error"),
        ("content null", j(msgs(("user", None), ("assistant", "x"))), "error"),
        ("images string", j(row(images="img/ok.png")), "error"),
        ("images dict", j(row(images={"a": 1})), "error"),
        ("images [1]", j(row(images=[1])), "error"),
        ("images [null]", j(row(images=[None])), "error"),
        ("id list", j(row(id=[1])), "error"),
        ("starts with assistant", j(msgs(("assistant", "x"), ("user", "<image>hi"))), "error"),
        ("ends with user", j(msgs(("user", "<image>hi"), ("assistant", "x"), ("user", "more"))), "error"),
        ("two users in a row", j(msgs(("user", "<image>a"), ("user", "b"), ("assistant", "x"))), "error"),
        ("empty assistant", j(msgs(("user", "<image>hi"), ("assistant", ""))), "error"),
        ("system not first", j(msgs(("user", "<image>hi"), ("system", "s"), ("assistant", "x"))), "error"),
        ("2 markers 1 image", j(msgs(("user", "<image><image>hi"), ("assistant", "x"))), "error"),
        ("2 images over --max-images", j(row(images=["img/ok.png", "img/ok.png"],
                                              messages=[{"role": "user", "content": "<image><image>a"},
                                                        {"role": "assistant", "content": "x"}])), "error"),
        ("web URL image", j(row(images=["https://example.com/a.png"])), "error"),
        ("bad data: URL", j(row(images=["data:image/png;base64,!!!notbase64"])), "error"),
        ("missing image", j(row(images=["img/nope.png"])), "error"),
    ]
    box = lambda b, fmt="xyxy": row(boxes=b, box_format=fmt, messages=[  # noqa: E731
        {"role": "user", "content": "<image>where?"}, {"role": "assistant", "content": "here <box>"}])
    c += [
        ("box NaN", json.dumps(box([[float("nan"), 1, 2, 3]])).encode(), "error"),
        ("box Infinity", json.dumps(box([[1, 1, float("inf"), 3]])).encode(), "error"),
        ("box -Infinity", json.dumps(box([[float("-inf"), 1, 2, 3]])).encode(), "error"),
        ("box negative", j(box([[-5, 1, 20, 30]])), "error"),
        ("box inverted", j(box([[30, 30, 10, 10]])), "error"),
        ("box 3 values", j(box([[1, 2, 3]])), "error"),
        ("box strings", j(box([["a", "b", "c", "d"]])), "error"),
        ("box not a list", j(box("1,2,3,4")), "error"),
        ("box huge int 10**400",
         j(box([[1, 1, 2, 2]])).replace(b"[[1, 1, 2, 2]]", b"[[1, 1, 2, " + b"9" * 400 + b"]]"),
         "error"),
        ("box beyond image", j(box([[10, 10, 5000, 5000]])), "error"),
        ("box_format unknown", j(box([[1, 1, 20, 20]], fmt="yxyx?")), "error"),
        ("box marker without boxes", j(msgs(("user", "<image>where?"), ("assistant", "here <box>"))), "error"),
        ("boxes without marker", j(row(boxes=[[1, 1, 20, 20]], box_format="xyxy")), "error"),
    ]
    deep = b'{"id": "d", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    c += [
        ("truncated line", j(good_row())[:-7], "error"),
        ("trailing comma", j(good_row())[:-1] + b",}", "error"),
        ("single quotes", repr(good_row()).encode(), "error"),
        ("unquoted key", b'{id: 1, "messages": []}', "error"),
        ("deep nesting 100000", deep, "error"),
        ("deep nesting 5000", b'{"id": "d", "x": ' + b"[" * 5000 + b"]" * 5000 + b', "messages": []}', "error"),
        ("extra key huge int 10**5000", j(good_row())[:-1] + b', "n": ' + b"9" * 5000 + b"}", "error_or_ok"),
        ("id huge int 10**5000", j(good_row()).replace(b'"good"', b"9" * 5000), "error_or_ok"),
        ("non-UTF-8 bytes", j(good_row())[:-10] + b"\xff\xfe\xc3" + j(good_row())[-10:], "error"),
        ("lone surrogate escape", j(msgs(("user", "<image>hi"), ("assistant", "x"))).replace(b'"x"', b'"\\ud800"'),
         "error_or_ok"),
        ("NUL byte in line", j(good_row())[:5] + b"\x00" + j(good_row())[5:], "error"),
        ("pretty-printed object", json.dumps(good_row(), indent=1).encode(), "error"),
        ("garbage text", b"this is not json at all", "error"),
    ]
    return c


def bad_inputs(sw: Sweep) -> None:
    """JSONL rows, images, paths, conversion, recipes and folders."""
    u, base = sw.user, str(sw.user / "models" / "base")
    d = u / "data"
    good = json.dumps(good_row()).encode() + b"\n"
    print("bad JSONL rows (cogtune validate)", flush=True)
    for i, (name, line, expect) in enumerate(jsonl_cases()):
        f = d / f"bad_{i:03d}.jsonl"
        f.write_bytes(good + line + b"\n")
        want = "error" if expect.startswith("error") else "ok"
        r = case(sw, "jsonl", name, ["validate", str(f), "--model", base], want, [f"{f.name}:2"])
        if expect == "error_or_ok" and r.outcome == "BAD" and "wrong success" in r.why:
            r.outcome, r.why = "accepted", "accepted (a valid JSON value)"
    # Files accepted on purpose.
    accepted = {
        "BOM at start": b"\xef\xbb\xbf" + good + good,
        "U+2028 inside a string": json.dumps(good_row() | {"note": "a\u2028b\u2029c"}, ensure_ascii=False).encode()
        + b"\n" + good,
        "CRLF line endings": good.replace(b"\n", b"\r\n") * 2,
        "blank lines between rows": good + b"\n   \n" + good,
        "no final newline": good + good[:-1],
        "duplicate ids (warning)": good + good,
        "unknown extra keys": json.dumps(good_row() | {"meta": {"a": [1, 2]}}).encode() + b"\n",
    }
    for name, data in accepted.items():
        f = d / f"ok_{len(sw.results):03d}.jsonl"
        f.write_bytes(data)
        case(sw, "jsonl", name, ["validate", str(f), "--model", base], "ok")
    # Whole-file problems.
    llava = [{"id": "1", "image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                  {"from": "gpt", "value": "x"}]}]
    wholefile = {
        "LLaVA array unconverted": json.dumps(llava, indent=2).encode(),
        "ShareGPT array unconverted": json.dumps([{"conversations": llava[0]["conversations"]}]).encode(),
        "empty file": b"",
        "only blank lines": b"\n\n  \n",
        "not UTF-8 at all": "ÿþ hello".encode("latin-1") * 20,
        "binary (PNG bytes)": (d / "img" / "ok.png").read_bytes(),
    }
    for name, data in wholefile.items():
        f = d / f"whole_{len(sw.results):03d}.jsonl"
        f.write_bytes(data)
        case(sw, "jsonl", name, ["validate", str(f), "--model", base], "error", [f.name])
    sur = d / "surrogate.jsonl"
    sur.write_bytes(good + json.dumps(good_row()).replace('"red"', '"\\ud800"').encode() + b"\n")
    case(sw, "jsonl", "lone surrogate escape in training data (train --skip-invalid)",
         ["train", str(u / "recipes" / "good.yaml"), "--skip-invalid", f"data.train_path={sur}",
          f"output.dir={sw.out / 'surrogate-run'}", "train.max_steps=1"], "error_or_skip", [f"{sur.name}:2"])
    # reliability.md: a non-UTF-8 line is a per-row error that --skip-invalid skips.
    nonutf = d / "nonutf8-line.jsonl"
    nonutf.write_bytes(good + good[:-12] + b"\xff" + good[-12:] + good)
    case(sw, "jsonl", "one non-UTF-8 line in training data (train --skip-invalid skips it)",
         ["train", str(u / "recipes" / "good.yaml"), "--skip-invalid", f"data.train_path={nonutf}",
          f"output.dir={sw.out / 'nonutf8-run'}", "train.max_steps=1"], "ok",
         check=lambda rc, o: "" if "1 invalid row" in o else f"no '1 invalid row(s) skipped' line: {_first(o)}")
    case(sw, "jsonl", "data file missing", ["validate", str(d / "nope.jsonl"), "--model", base], "error",
         ["nope.jsonl"])
    case(sw, "jsonl", "data path is a folder", ["validate", str(d / "img"), "--model", base], "error", ["img"])

    images(sw)
    convert_cases(sw)
    recipes(sw)
    folders(sw)


def images(sw: Sweep) -> None:
    """Bad and unusual images, and paths outside the data root."""
    import numpy as np
    from PIL import Image

    u, base = sw.user, str(sw.user / "models" / "base")
    d = u / "data"
    im = d / "img"
    print("bad images and paths (cogtune validate)", flush=True)
    Image.new("RGB", (64, 64), (0, 90, 200)).save(im / "full.jpg", quality=95)
    full = (im / "full.jpg").read_bytes()
    (im / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (im / "zero.png").write_bytes(b"")
    (im / "text.png").write_bytes(b"hello, I am not a picture\n" * 10)
    (im / "header-only.png").write_bytes((im / "ok.png").read_bytes()[:40])
    Image.fromarray((np.arange(56 * 56).reshape(56, 56) * 19).astype(np.uint16)).save(im / "gray16.png")
    Image.fromarray(np.linspace(0, 1, 56 * 56, dtype=np.float32).reshape(56, 56), mode="F").save(im / "float.tif")
    nan = np.full((56, 56), 0.5, np.float32)
    nan[3, 3] = np.nan
    Image.fromarray(nan, mode="F").save(im / "float-nan.tif")
    Image.new("CMYK", (56, 56), (0, 200, 200, 0)).save(im / "cmyk.jpg")
    Image.new("RGBA", (56, 56), (255, 0, 0, 100)).save(im / "rgba.png")
    Image.new("P", (56, 56)).save(im / "pal.gif")
    Image.new("RGB", (56, 56), (1, 2, 3)).save(im / "pic.webp")
    Image.new("1", (56, 56)).save(im / "bw.bmp")
    # A PNG whose header claims 100000 x 100000 (decompression bomb): valid IHDR, tiny IDAT.
    def chunk(t: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    (im / "bomb.png").write_bytes(bomb)
    (im / "wrong-ext.png").write_bytes(full)  # a JPEG named .png: PIL reads content, fine
    os.symlink(u / "outside" / "secret.png", im / "link-out.png")
    os.symlink(im / "ok.png", im / "link-in.png")
    home_rel = "~/" + os.path.relpath(u / "outside" / "secret.png", os.path.expanduser("~"))
    img_cases = [
        ("truncated JPEG", "img/trunc.jpg", "error"), ("zero-byte PNG", "img/zero.png", "error"),
        ("not an image", "img/text.png", "error"), ("PNG header only", "img/header-only.png", "error"),
        ("float TIFF with NaN", "img/float-nan.tif", "error"), ("huge dimensions header", "img/bomb.png", "error"),
        ("16-bit PNG", "img/gray16.png", "ok"), ("float TIFF", "img/float.tif", "ok"),
        ("CMYK JPEG", "img/cmyk.jpg", "ok"),
        ("RGBA PNG", "img/rgba.png", "ok"), ("palette GIF", "img/pal.gif", "ok"), ("WebP", "img/pic.webp", "ok"),
        ("1-bit BMP", "img/bw.bmp", "ok"), ("JPEG named .png", "img/wrong-ext.png", "ok"),
        ("symlink inside root", "img/link-in.png", "ok"),
        ("../ outside root (exists)", "../outside/secret.png", "error"),
        ("../ outside root (absent)", "../outside/absent.png", "error"),
        ("absolute outside", str(u / "outside" / "secret.png"), "error"),
        ("absolute /etc/passwd", "/etc/passwd", "error"),
        ("/proc/self/environ", "/proc/self/environ", "error"),
        ("file:// outside", "file://" + str(u / "outside" / "secret.png"), "error"),
        ("~/ outside", home_rel, "error"), ("symlink out of root", "img/link-out.png", "error"),
        ("absolute inside root", str(im / "ok.png"), "ok"),
        ("file:// inside root", "file://" + str(im / "ok.png"), "ok"),
    ]
    outs = {}
    for name, ref, expect in img_cases:
        f = d / f"img_{len(sw.results):03d}.jsonl"
        f.write_text(json.dumps(good_row()) + "\n" + json.dumps(good_row(ref, "r2")) + "\n")
        argv = ["validate", str(f), "--model", base]
        case(sw, "images", name, argv, expect, [f"{f.name}:2"])
        if "outside root" in name:
            outs[name] = run_inproc(argv)[1].replace(f.name, "F")
    # Same message whether the outside file exists or not (no existence leak).
    a, b = outs.get("../ outside root (exists)", ""), outs.get("../ outside root (absent)", "")
    leak = [x for x in a.splitlines() if "F:2" in x], [x for x in b.splitlines() if "F:2" in x]
    same = [s.replace("secret", "X") for s in leak[0]] == [s.replace("absent", "X") for s in leak[1]]
    sw.results.append(Result("images", "outside path: same message exists/absent", "clean" if same else "BAD",
                             "" if same else f"messages differ: {leak}"))
    print(f"  {'ok  ' if same else 'BAD '}[images] outside path: same message exists/absent", flush=True)
    # --image-root with an outside path, and the explicit opt-in.
    f = d / "img_root.jsonl"
    f.write_text(json.dumps(good_row("../outside/secret.png")) + "\n")
    case(sw, "images", "../ outside --image-root", ["validate", str(f), "--model", base, "--image-root", str(im)],
         "error", ["img_root.jsonl:1"])
    case(sw, "images", "outside with --allow-outside-images", ["validate", str(f), "--model", base,
                                                               "--allow-outside-images"], "ok")


def convert_cases(sw: Sweep) -> None:
    """cogtune convert with broken inputs; outputs go to out/ (they must not appear on failure)."""
    u = sw.user
    d = u / "data"
    print("bad conversion inputs (cogtune convert)", flush=True)
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]
    cases = {
        "llava: missing conversations": ("llava", json.dumps([{"id": "1", "image": "img/ok.png"}])),
        "llava: JSON array broken halfway": ("llava",
                                             json.dumps([{"image": "img/ok.png", "conversations": conv}] * 3)[:120]),
        "llava: unknown role": ("llava", json.dumps([{"image": "img/ok.png", "conversations": [
            {"from": "alien", "value": "<image>hi"}, {"from": "gpt", "value": "x"}]}])),
        "llava: image outside root": ("llava",
                                      json.dumps([{"image": "../outside/secret.png", "conversations": conv}])),
        "llava: not JSON": ("llava", "garbage {"),
        "llava: deep nesting": ("llava", "[" * 100_000 + "]" * 100_000),
        "sharegpt: values not strings": ("sharegpt", json.dumps([{"conversations": [
            {"from": "human", "value": 5}, {"from": "gpt", "value": None}]}])),
        "openai: messages missing": ("openai", json.dumps({"foo": 1}) + "\n"),
        "swift: empty file": ("swift", ""),
    }
    for i, (name, (fmt, text)) in enumerate(cases.items()):
        src = d / f"conv_{i:02d}.json"
        src.write_text(text)
        out = sw.out / f"conv_{i:02d}.jsonl"

        def no_output(rc, o, out=out):
            return f"output written despite failure: {out}" if rc != 0 and out.exists() else ""
        case(sw, "convert", name, ["convert", "--from", fmt, str(src), "--out", str(out), "--quiet"], "error",
             [src.name], check=no_output)
    case(sw, "convert", "input missing", ["convert", "--from", "llava", str(d / "nope.json"), "--out",
                                          str(sw.out / "x.jsonl")], "error", ["nope.json"])


def recipes(sw: Sweep) -> None:
    """Unknown keys, out-of-range values (issue 14 point 14), YAML bombs."""
    u = sw.user
    print("bad recipes (cogtune train)", flush=True)
    rdir = sw.out / "recipe-runs"
    base_text = (u / "recipes" / "good.yaml").read_text()
    edits = {
        "unknown top-level key": ("trian:\n  max_steps: 2\n", ["trian"]),
        "unknown nested key": (None, ["lora.rr"], ("  r: 4\n", "  rr: 4\n")),
        "wrong type lora.r": (None, ["lora.r"], ("  r: 4\n", "  r: eight\n")),
        "learning_rate string": (None, ["train.learning_rate"], ("learning_rate: 1.0e-3", "learning_rate: fast")),
        "section not a mapping": (None, ["lora"], ("lora:\n", "lora: 5\nxlora:\n")),
    }
    overrides = [
        ("lora.r=0", "lora.r"), ("lora.lora_alpha=0", "lora.lora_alpha"),
        ("lora.lora_dropout=-0.5", "lora.lora_dropout"),
        ("lora.lora_dropout=1.5", "lora.lora_dropout"), ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.save_total_limit=0", "train.save_total_limit"),
        ("train.max_steps=-1 train.num_train_epochs=0", "train.num_train_epochs"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
        ("train.learning_rate=-1", "train.learning_rate"), ("train.learning_rate=nan", "train.learning_rate"),
        ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size"),
        ("data.max_length=0", "data.max_length"), ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.max_steps=-5", "train.max_steps"), ("train.lr_scheduler_type=wobbly", "train.lr_scheduler_type"),
        ("model.dtype=float12", "model.dtype"), ("lora.targets=[nonexistent_module]", "nonexistent_module"),
        ("train.max_nonfinite_steps=-1", "train.max_nonfinite_steps"), ("lora.r=abc", "lora.r"),
        ("no.such.key=1", "no.such.key"), ("lora.r", "lora.r"),
    ]
    for name, spec in edits.items():
        if spec[0] is not None:
            text = base_text + spec[0]
        else:
            old, new = spec[2]
            text = base_text.replace(old, new, 1)
        p = u / "recipes" / f"bad_{len(sw.results):03d}.yaml"
        p.write_text(text)
        case(sw, "recipe", name, ["train", str(p)], "error", spec[1])
    good = u / "recipes" / "good.yaml"
    for i, (ov, key) in enumerate(overrides):
        case(sw, "recipe", f"override {ov}", ["train", str(good), *ov.split(), f"output.dir={rdir / str(i)}"],
             "error", [key])
    # Accepted: num_train_epochs is documented as ignored when max_steps > 0 (trains the 2 steps).
    case(sw, "recipe", "override train.num_train_epochs=0 with max_steps=2", [
        "train", str(good), "train.num_train_epochs=0", f"output.dir={rdir / 'epochs0-maxsteps2'}"], "ok")
    # Files that are not recipes at all.
    raw = {
        "YAML is a list": ("- a\n- b\n", "error"),
        "empty YAML": ("", "error"),
        "YAML syntax error": ("model:\n  checkpoint_dir: [unclosed\n", "error"),
        "tab indentation": ("model:\n\tdtype: float32\n", "error"),
        "not UTF-8": (None, "error"),
    }
    for name, (text, expect) in raw.items():
        p = u / "recipes" / f"raw_{len(sw.results):03d}.yaml"
        if text is None:
            p.write_bytes(b"model:\n  dtype: \xff\xfe\n")
        else:
            p.write_text(text)
        case(sw, "recipe", name, ["train", str(p)], expect, [p.name])
    case(sw, "recipe", "recipe file missing", ["train", str(u / "recipes" / "nope.yaml")], "error", ["nope"])
    # Memory/stack bombs: subprocesses with a timeout.
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for ch in "bcdefghi":
        bomb += f"{ch}: &{ch} [" + ",".join(f"*{prev}" for _ in range(9)) + "]\n"
        prev = ch
    bomb += "model:\n  dtype: *i\n"
    p = u / "recipes" / "alias-bomb.yaml"
    p.write_text(bomb)
    case(sw, "recipe", f"YAML alias bomb ({len(bomb)} bytes)", ["train", str(p)], "error", [p.name], sub=True,
         timeout=90)
    p = u / "recipes" / "deep.yaml"
    p.write_text("model: " + "[" * 50_000 + "]" * 50_000 + "\n")
    case(sw, "recipe", "deep YAML (50000 levels)", ["train", str(p)], "error", [p.name], sub=True, timeout=90)
    p = u / "recipes" / "deep-map.yaml"
    p.write_text("".join("  " * i + f"k{i}:\n" for i in range(3000)) + "  " * 3000 + "v: 1\n")
    case(sw, "recipe", "deep YAML mapping (3000 levels)", ["train", str(p)], "error", [p.name], sub=True, timeout=90)


def folders(sw: Sweep) -> None:
    """Missing/foreign/corrupt checkpoints, file-typed output dir."""
    u = sw.user
    m = u / "models"
    print("bad folders (cogtune train / validate / targets)", flush=True)
    base = m / "base"
    gpt2 = m / "gpt2"
    shutil.copytree(base, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "vocab_size": 10}))
    shards = sorted(base.glob("*.safetensors"))
    corrupt = m / "corrupt-shard"
    shutil.copytree(base, corrupt)
    s = corrupt / shards[0].name
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    over = m / "overwritten-header"
    shutil.copytree(base, over)
    s = over / shards[0].name
    s.write_bytes(b"\xff" * 64 + s.read_bytes()[64:])
    missing = m / "missing-shard"
    shutil.copytree(base, missing)
    (missing / shards[-1].name).unlink()
    badcfg = m / "config-not-json"
    shutil.copytree(base, badcfg)
    (badcfg / "config.json").write_text("{ not json")
    (u / "afile").write_text("I am a file, not a folder\n")
    rd = sw.out / "folder-runs"
    cases = [
        ("checkpoint_dir missing (relative)", "model.checkpoint_dir=no/such/dir", ["no/such/dir"]),
        ("checkpoint_dir Hub-like id", "model.checkpoint_dir=THUDM/cogvlm2-llama3-chat-19B", ["THUDM/cogvlm2"]),
        ("checkpoint_dir GPT-2 config", f"model.checkpoint_dir={gpt2}", ["gpt2"]),
        ("checkpoint_dir corrupt shard", f"model.checkpoint_dir={corrupt}", [shards[0].name]),
        ("checkpoint_dir overwritten header", f"model.checkpoint_dir={over}", [shards[0].name]),
        ("checkpoint_dir missing shard", f"model.checkpoint_dir={missing}", [shards[-1].name]),
        ("checkpoint_dir config not JSON", f"model.checkpoint_dir={badcfg}", ["config.json"]),
        ("checkpoint_dir is a file", f"model.checkpoint_dir={u / 'afile'}", ["afile"]),
        ("tokenizer_dir missing", "model.tokenizer_dir=no/tok", ["no/tok"]),
        ("output.dir is a file", f"output.dir={u / 'afile'}", ["afile"]),
        ("output.dir under a file", f"output.dir={u / 'afile' / 'run'}", ["afile"]),
        ("train_path missing", f"data.train_path={u / 'data' / 'nope.jsonl'}", ["nope.jsonl"]),
        ("train_path is a folder", f"data.train_path={u / 'data'}", ["data"]),
    ]
    good = u / "recipes" / "good.yaml"
    for i, (name, ov, names) in enumerate(cases):
        case(sw, "folders", name, ["train", str(good), ov, f"output.dir={rd / str(i)}" if "output.dir" not in ov
                                   else ov], "error", names)
    for name, folder in (("validate --model GPT-2", gpt2), ("validate --model missing", m / "nope")):
        case(sw, "folders", name, ["validate", str(u / "data" / "train.jsonl"), "--model", str(folder)], "error",
             [folder.name])
    # validate reads config and tokenizer, never weights: a damaged shard is train's business.
    case(sw, "folders", "validate --model with a corrupt shard (weights unused)",
         ["validate", str(u / "data" / "train.jsonl"), "--model", str(corrupt)], "ok")
    case(sw, "folders", "targets on GPT-2 folder", ["targets", str(good), f"model.checkpoint_dir={gpt2}"], "error",
         ["gpt2"])
    if os.geteuid() != 0:
        ro = sw.out / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        case(sw, "folders", "output.dir read-only", ["train", str(good), f"output.dir={ro / 'run'}"], "error",
             ["readonly"])
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------------- faults


def fault(sw: Sweep, name: str, fn, repro: str) -> None:
    """Run one fault: fn() returns '' when every promise held, else what broke; plus nothing-lost."""
    before = snapshot(sw.user)
    t0 = time.time()
    try:
        problem = fn()
    except Exception:  # noqa: BLE001
        problem = "sweep error: " + traceback.format_exc().strip().splitlines()[-1]
    gone = lost(before, snapshot(sw.user))
    if gone:
        problem = (problem + "; " if problem else "") + "user files lost/changed: " + ", ".join(gone[:5])
    sw.results.append(Result("faults", name, "BAD" if problem else "clean", problem, repro))
    tail = ": " + problem if problem else ""
    print(f"  {'BAD ' if problem else 'ok  '}[faults] {name} ({time.time() - t0:.1f}s){tail}", flush=True)


def kill_when(argv: list[str], ready, timeout: float = 240, cwd: Path | None = None,
              extra_env: dict | None = None) -> tuple[str, str]:
    """Start cogtune, SIGKILL it (the main process only) the moment ready() returns a label."""
    e = env()
    e.update(extra_env or {})
    log = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen([PY, "-m", "finetune.cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=e, cwd=cwd)
    t0 = time.time()
    label = ""
    while time.time() - t0 < timeout and p.poll() is None:
        label = ready(p.pid)
        if label:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    if p.poll() is None and not label:
        os.kill(p.pid, signal.SIGKILL)
        label = "timeout"
    p.wait()
    log.seek(0)
    return label or f"finished before the kill point (exit {p.returncode})", log.read()


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def procs_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment mentions text (orphan check)."""
    hits = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                envb = (d / "environ").read_bytes().decode(errors="replace")
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if (text in cmd or text in envb) and ") Z " not in stat:
                hits.append(int(d.name))
    return hits


def faults(sw: Sweep) -> None:
    """SIGKILLs during checkpoint saves and merges, damaged checkpoints, overwrite, convert, divergence."""
    from finetune.run_folder import newest_complete_checkpoint

    u = sw.user
    runs = sw.out / "runs"
    print("faults", flush=True)

    # 1-2. Live SIGKILL of train during a checkpoint save, then --resume auto.
    def live(label: str, step: int, trigger) -> None:
        out = runs / f"live-{label}"
        rec = recipe(sw, f"live-{label}", out, max_steps=4, save_steps=1)
        ck = out / f"checkpoint-{step}"

        def ready(pid):
            if ck.is_dir():
                names = sorted(x.name for x in ck.iterdir())
                if trigger(names):
                    return f"checkpoint-{step} held {names}"
            return ""

        def fn():
            at, log = kill_when(["train", str(rec)], ready)
            sw.notes.append(f"live kill '{label}': killed when {at}")
            if "finished before" in at or at == "timeout":
                return f"kill point not reached: {at}\n{log[-500:]}"
            rc, o = run_sub(["train", str(rec), "--resume", "auto"], timeout=240)
            if rc != 0 or "Traceback" in o:
                return f"resume auto failed (exit {rc}): {o.strip().splitlines()[-3:]}"
            if not (out / "adapter" / "adapter_model.safetensors").is_file():
                return "resume finished without an adapter"
            run = json.loads((out / "run.json").read_text())
            if run.get("status") != "completed":
                return f"run.json status {run.get('status')}"
            return ""
        fault(sw, f"SIGKILL train during save of checkpoint-{step} ({label}), then --resume auto", fn,
              f"cogtune train {rec} (kill -9 when checkpoint-{step} {label}); cogtune train {rec} --resume auto")

    live("folder appears", 2, lambda names: True)
    live("optimizer.pt written, no manifest", 3,
         lambda names: "optimizer.pt" in names and "cogtune-manifest.json" not in names)

    # A complete run to damage deterministically.
    full = runs / "live-folder appears"
    stages = {
        "empty checkpoint folder": lambda ck: [x.unlink() for x in ck.iterdir()],
        "adapter only": lambda ck: [x.unlink() for x in ck.iterdir() if not x.name.startswith("adapter")],
        "adapter+optimizer only": lambda ck: [x.unlink() for x in ck.iterdir()
                                              if not (x.name.startswith("adapter") or x.name == "optimizer.pt")],
        "no trainer_state.json": lambda ck: (ck / "trainer_state.json").unlink(),
        "no manifest (killed before marker)": lambda ck: (ck / "cogtune-manifest.json").unlink(),
        "corrupt adapter bytes": lambda ck: _flip(ck / "adapter_model.safetensors"),
        "missing optimizer.pt": lambda ck: (ck / "optimizer.pt").unlink(),
        "truncated optimizer.pt": lambda ck: _truncate(ck / "optimizer.pt"),
        "missing scheduler.pt": lambda ck: (ck / "scheduler.pt").unlink(),
    }
    for name, damage in stages.items():
        def fn(name=name, damage=damage):
            if not (full / "checkpoint-4").is_dir():
                return "no complete run to damage (the live-kill fault failed)"
            dst = runs / ("det-" + name.replace(" ", "_").replace("/", "_"))
            shutil.copytree(full, dst)
            damage(dst / "checkpoint-4")
            pick, skipped = newest_complete_checkpoint(dst)
            if pick is None or pick.name != "checkpoint-3":
                return f"resume auto would take {pick}, skipped {skipped}"
            if not any(p.name == "checkpoint-4" for p, _ in skipped):
                return "checkpoint-4 not reported as skipped"
            return ""
        fault(sw, f"partial checkpoint-4: {name} -> newest complete is checkpoint-3", fn,
              "python -c 'from finetune.run_folder import newest_complete_checkpoint as n; print(n(RUN))'")

    def det_resume():
        dst = runs / "det-resume"
        if not (full / "checkpoint-4").is_dir():
            return "no complete run"
        shutil.copytree(full, dst)
        shutil.rmtree(dst / "adapter")
        for x in (dst / "checkpoint-4").iterdir():
            if x.name not in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt"):
                x.unlink()
        rec = recipe(sw, "det-resume", dst, max_steps=4, save_steps=1)
        rc, o = run_sub(["train", str(rec), "--resume", "auto"], timeout=240)
        if rc != 0:
            return f"exit {rc}: {o.strip().splitlines()[-3:]}"
        if "checkpoint-4" not in o or not (dst / "adapter" / "adapter_model.safetensors").is_file():
            return "did not say it skipped checkpoint-4, or no adapter"
        return ""
    fault(sw, "--resume auto over a partial newest checkpoint trains on from checkpoint-3", det_resume,
          "delete files of RUN/checkpoint-4; cogtune train RECIPE --resume auto")

    def explicit(what):
        def fn():
            dst = runs / f"explicit-{what}"
            if not (full / "checkpoint-4").is_dir():
                return "no complete run"
            shutil.copytree(full, dst)
            ck = dst / "checkpoint-2"
            if what == "optimizer":
                (ck / "optimizer.pt").unlink()
            else:
                _flip(ck / "adapter_model.safetensors")
            rec = recipe(sw, f"explicit-{what}", dst, max_steps=4, save_steps=1)
            rc, o = run_inproc(["train", str(rec), "--resume", str(ck)], timeout=180)
            verdict, why = classify(rc, o, "error", ["checkpoint-2"])
            return "" if verdict == "clean" else why
        return fn
    fault(sw, "explicit --resume of a checkpoint without optimizer.pt is refused", explicit("optimizer"),
          "rm RUN/checkpoint-2/optimizer.pt; cogtune train RECIPE --resume RUN/checkpoint-2")
    fault(sw, "explicit --resume of a checkpoint with altered adapter bytes is refused", explicit("bytes"),
          "flip bytes in RUN/checkpoint-2/adapter_model.safetensors; cogtune train RECIPE --resume RUN/checkpoint-2")

    def none_complete():
        dst = runs / "none-complete"
        if not (full / "checkpoint-4").is_dir():
            return "no complete run"
        shutil.copytree(full, dst)
        for ck in dst.glob("checkpoint-*"):
            (ck / "cogtune-manifest.json").unlink()
            (ck / "trainer_state.json").unlink()
        before = sorted(x.name for x in dst.iterdir())
        rec = recipe(sw, "none-complete", dst, max_steps=4, save_steps=1)
        rc, o = run_inproc(["train", str(rec), "--resume", "auto"], timeout=180)
        verdict, why = classify(rc, o, "error", ["checkpoint-"])
        if verdict != "clean":
            return why
        gone = sorted(set(before) - {x.name for x in dst.iterdir()} - {"adapter"})
        return f"removed {gone} although no checkpoint was usable" if gone else ""
    fault(sw, "--resume auto with no complete checkpoint stops with the reasons", none_complete,
          "remove trainer_state.json + manifest from every RUN/checkpoint-*; cogtune train RECIPE --resume auto")

    # Overwrite into folders holding user files.
    def overwrite_user():
        folder = u / "my-project"
        (folder / "mydata").mkdir(parents=True)
        (folder / "notes.txt").write_text("my notes\n")
        (folder / "mydata" / "train.jsonl").write_text(json.dumps(good_row()) + "\n")
        (folder / "run.json").write_text('{"status": "completed"}\n')  # looks like an earlier run
        before = snapshot(folder)
        rec = recipe(sw, "overwrite-user", folder, "  overwrite: true\n")
        rc, o = run_inproc(["train", str(rec)], timeout=180)
        gone = [x for x in lost(before, snapshot(folder)) if not x.startswith("run.json")]
        verdict, why = classify(rc, o, "error", ["notes.txt"])
        if verdict == "clean" and "mydata" not in o:
            verdict, why = "BAD", f"message does not list mydata/: {_first(o)}"
        return "; ".join(x for x in [why if verdict != "clean" else "", ", ".join(gone)] if x)
    fault(sw, "output.overwrite=true into a folder with user files: refused, nothing removed", overwrite_user,
          "output.dir=FOLDER (notes.txt, mydata/train.jsonl, run.json) output.overwrite=true; cogtune train RECIPE")

    def overwrite_inputs():
        folder = u / "demo-like"
        shutil.copytree(u / "models" / "base", folder / "base")
        shutil.copytree(u / "data", folder / "data", ignore=shutil.ignore_patterns("bad_*", "whole_*", "img_*", "ok_*",
                                                                                   "conv_*"))
        (folder / "recipe.resolved.yaml").write_text("model: {}\n")
        rec = recipe(sw, "overwrite-inputs", folder, "  overwrite: true\n", train_path=folder / "data" / "train.jsonl")
        rec.write_text(rec.read_text().replace(str(u / "models" / "base"), str(folder / "base")))
        before = snapshot(folder)
        rc, o = run_inproc(["train", str(rec)], timeout=180)
        gone = [x for x in lost(before, snapshot(folder)) if not x.startswith("recipe.resolved")]
        verdict, why = classify(rc, o, "error", ["model.checkpoint_dir"])
        return "; ".join(x for x in [why if verdict != "clean" else "", ", ".join(gone[:5])] if x)
    fault(sw, "output.overwrite=true into a folder holding the run's own base and data: refused", overwrite_inputs,
          "output.dir=FOLDER holding base/ and data/ used by the recipe, output.overwrite=true; cogtune train RECIPE")

    # convert over an existing output with a failing input.
    keep_rows = "".join(json.dumps(good_row(rid=f"k{i}")) + "\n" for i in range(5))
    conv = [{"image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                       {"from": "gpt", "value": "x"}]}]
    bad_sources = {
        "non-UTF-8 input": "ÿþ garbage".encode("latin-1"),
        "empty input": b"",
        "no row converts": json.dumps([{"id": 1}]).encode(),
        "JSON array broken halfway": json.dumps(conv * 4).encode()[:150],
    }
    for name, data in bad_sources.items():
        def fn(name=name, data=data):
            keep = u / "data" / f"keep-{name.replace(' ', '_')}.jsonl"
            keep.write_text(keep_rows)
            src = u / "data" / f"src-{name.replace(' ', '_')}.json"
            src.write_bytes(data)
            before = snapshot(u / "data")
            rc, o = run_inproc(["convert", "--from", "llava", str(src), "--out", str(keep), "--quiet"])
            verdict, why = classify(rc, o, "error", [src.name, keep.name])
            problems = [] if verdict == "clean" else [why]
            if keep.read_text() != keep_rows:
                problems.append(f"{keep.name} changed ({len(keep.read_text().splitlines())} rows)")
            leftovers = set(snapshot(u / "data")) - set(before)
            if leftovers:
                problems.append(f"left behind {sorted(leftovers)}")
            return "; ".join(problems)
        fault(sw, f"convert over an existing 5-row output, {name}: old file byte-identical", fn,
              f"cogtune convert --from llava SRC --out keep.jsonl  (SRC: {name})")

    # Divergence.
    def diverge():
        out = runs / "diverge"
        rec = recipe(sw, "diverge", out, max_steps=4)
        rc, o = run_inproc(["train", str(rec), "train.learning_rate=1e30", "train.max_nonfinite_steps=2"], timeout=240)
        problems = []
        verdict, why = classify(rc, o, "error", ["learning_rate", "learning rate"])
        if verdict != "clean":
            problems.append(why)
        if (out / "adapter").exists():
            problems.append("adapter saved")
        return "; ".join(problems)
    fault(sw, "learning_rate=1e30: run fails, no adapter", diverge,
          "cogtune train RECIPE train.learning_rate=1e30 train.max_nonfinite_steps=2")

    merges(sw, full)


def merges(sw: Sweep, run: Path) -> None:
    """SIGKILL of merge while writing and while verifying; different-seed base; existing output."""
    tmp = sw.root / "tmp"
    xenv = {"TMPDIR": str(tmp)}
    mdir = sw.out / "merged"

    def staging() -> list[str]:
        return sorted(x.name for x in sw.out.iterdir() if x.name.startswith(".merged.")) + \
            sorted(x.name for x in tmp.iterdir() if x.name.startswith("cogtune-merge"))

    def kill_merge(point):
        def fn():
            if not (run / "adapter").is_dir():
                return "no trained run to merge"
            seen = {}

            def ready(pid):
                if point == "writing":
                    if any(x.name.startswith(".merged.partial") for x in sw.out.iterdir()):
                        return "staging folder appeared"
                else:
                    kids = [k for k in children(pid) if b"--probe" in _cmdline(k)]
                    if kids:
                        seen.setdefault("t", time.time())
                        seen["kids"] = kids
                        if point == "verify" or time.time() - seen["t"] > 3:
                            return f"verifier pid {kids} running for {time.time() - seen['t']:.1f}s"
                return ""
            at, log = kill_when(["merge", str(run), "--out", str(mdir)], ready, extra_env=xenv)
            sw.notes.append(f"merge kill '{point}': killed when {at}")
            if "finished before" in at or at == "timeout":
                return f"kill point not reached: {at}: {log[-300:]}"
            problems = []
            for _ in range(20):  # the verifier gets up to 10 s to notice its parent is gone
                orphans = [k for k in seen.get("kids", []) if _alive(k)]
                orphans += [p for p in procs_mentioning(str(mdir)) if p not in orphans]
                if not orphans:
                    break
                time.sleep(0.5)
            if orphans:
                problems.append(f"orphan processes {orphans}")
                for k in orphans:
                    with contextlib.suppress(OSError):
                        os.kill(k, signal.SIGKILL)
            if mdir.exists() and not (mdir / "config.json").is_file():
                problems.append("output exists but incomplete")
            sw.notes.append(f"after merge kill '{point}': staging left {staging()}")
            return "; ".join(problems)
        return fn
    fault(sw, "SIGKILL merge while writing: output absent, no orphan", kill_merge("writing"),
          f"cogtune merge RUN --out OUT (kill -9 when {sw.out}/.merged.partial-* appears)")
    fault(sw, "SIGKILL merge as its verifier starts: output absent, verifier dies with it", kill_merge("verify"),
          "cogtune merge RUN --out OUT (kill -9 the parent the moment its verification child exists)")
    fault(sw, "SIGKILL merge 3 s into verification: output absent, verifier dies with it",
          kill_merge("verify-late"), "cogtune merge RUN --out OUT (kill -9 the parent 3 s after the child starts)")

    def next_merge():
        left = staging()
        rc, o = run_sub(["merge", str(run), "--out", str(mdir)], timeout=300, extra_env=xenv)
        problems = []
        if rc != 0:
            problems.append(f"merge failed (exit {rc}): {o.strip().splitlines()[-2:]}")
        if staging():
            problems.append(f"staging still there: {staging()} (before: {left})")
        if not (mdir / "config.json").is_file():
            problems.append("no merged output")
        return "; ".join(problems)
    fault(sw, "next merge cleans the stale staging and writes the output", next_merge, "cogtune merge RUN --out OUT")

    def exists_no_force():
        if not mdir.is_dir():
            return "no output to protect"
        before = snapshot(mdir)
        rc, o = run_inproc(["merge", str(run), "--out", str(mdir)])
        verdict, why = classify(rc, o, "error", [str(mdir), "--force"])
        problems = [] if verdict == "clean" else [why]
        if snapshot(mdir) != before:
            problems.append("existing output changed")
        return "; ".join(problems)
    fault(sw, "merge over an existing output without --force: refused, output unchanged", exists_no_force,
          "cogtune merge RUN --out EXISTING")

    def other_base():
        out = sw.out / "merged-seed7"
        rc, o = run_inproc(["merge", str(run), "--base", str(sw.user / "models" / "base-seed7"), "--out", str(out)])
        verdict, why = classify(rc, o, "error", ["base-seed7", "fingerprint", "base"])
        problems = [] if verdict == "clean" else [why]
        if out.exists():
            problems.append("output written")
        return "; ".join(problems)
    fault(sw, "merge against a different-seed base (same config.json): refused", other_base,
          "cogtune make-tiny --family cogvlm2 --seed 7 --out B7; cogtune merge RUN --base B7 --out OUT")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        return ") Z " not in Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes((x ^ 0x5A) for x in b[mid:mid + 64])
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


# ----------------------------------------------------------------------------------------------- main


def summary(sw: Sweep, seconds: float) -> str:
    """The summary table (markdown), BAD cases listed below it."""
    cats: dict[str, list[Result]] = {}
    for r in sw.results:
        cats.setdefault(r.cat, []).append(r)
    lines = ["| category | cases | clean error | accepted | BAD |", "|---|---:|---:|---:|---:|"]
    for cat, rs in cats.items():
        n = lambda o, rs=rs: sum(r.outcome == o for r in rs)  # noqa: E731
        lines.append(f"| {cat} | {len(rs)} | {n('clean')} | {n('accepted')} | {n('BAD')} |")
    tot = lambda o: sum(r.outcome == o for r in sw.results)  # noqa: E731
    lines.append(f"| **total** | {len(sw.results)} | {tot('clean')} | {tot('accepted')} | {tot('BAD')} |")
    lines.append(f"\n{seconds:.0f} s wall time.")
    bad = [r for r in sw.results if r.outcome == "BAD"]
    if bad:
        lines.append("\nBAD cases:")
        lines += [f"- [{r.cat}] {r.name}: {r.why}\n  repro: `{r.repro}`" for r in bad]
    if sw.notes:
        lines.append("\nNotes:")
        lines += [f"- {n}" for n in sw.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the sandbox folder (printed) for inspection")
    ap.add_argument("--only", choices=["bad", "faults"], help="run one half only")
    ap.add_argument("--json", help="also write every case's result to this JSON file")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("COGTUNE_TQDM", "0")
    t0 = time.time()
    sw = Sweep(Path(tempfile.mkdtemp(prefix="cogtune-sweep-")).resolve())
    print(f"sandbox: {sw.root}", flush=True)
    try:
        build(sw)
        if args.only != "faults":
            bad_inputs(sw)
        if args.only != "bad":
            faults(sw)
    finally:
        report = summary(sw, time.time() - t0)
        print("\n" + report)
        if args.json:
            Path(args.json).write_text(json.dumps([r.__dict__ for r in sw.results], indent=1))
        if args.keep:
            print(f"sandbox kept: {sw.root}")
        else:
            for p in sw.root.rglob("*"):
                with contextlib.suppress(OSError):
                    if p.is_dir() and not p.is_symlink():
                        p.chmod(0o755)
            shutil.rmtree(sw.root, ignore_errors=True)
    return 1 if any(r.outcome == "BAD" for r in sw.results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
