"""Merge, step 2: write the merged weights in the official layout, beside the output, and publish atomically.

Staging folders carry a marker file so that a later run can remove those of a killed merge and report any
hidden folder it cannot attribute; nothing the kit did not write is ever removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.run_folder import read_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


SKIP_BASE_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json",
                   "generation_config.json", "cogtune.json"}


def parse_size(text: str) -> int:
    """'5GB' / '300KB' / '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if m is None:
        raise ValueError(f"bad size {text!r}; use e.g. 5GB, 500MB, 300KB")
    unit = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[m.group(2)]
    return int(float(m.group(1)) * unit)


def write_shards(state_dict: dict[str, Any], folder: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Official layout: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, keys in model order."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    size = total = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
        total += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def checkpoint_keys(checkpoint_dir: Path) -> set[str]:
    """Tensor names stored in a checkpoint folder (index when present, else the safetensors headers)."""
    from safetensors import safe_open

    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for f in checkpoint_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            keys |= set(fh.keys())
    return keys


def write_side_files(folder: Path, base_dir: Path, processor: Any, dtype: str, info: dict[str, Any]) -> None:
    """config.json (the base's fields, torch_dtype set), generation_config.json, the processor (tokenizer and
    processor_config.json), other base files, and cogtune.json (template and origin) - everything a loader or
    lmdeploy looks for beside the weights."""
    cfg = read_json(base_dir / "config.json")
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")
    processor.save_pretrained(folder)
    for f in sorted(base_dir.iterdir()):
        if (f.is_file() and f.name not in SKIP_BASE_FILES and not f.name.endswith(WEIGHT_SUFFIXES)
                and not (folder / f.name).exists()):
            shutil.copy2(f, folder / f.name)
    (folder / "cogtune.json").write_text(json.dumps(info, indent=2) + "\n")


STAGING_MARKER = ".cogtune-staging"


_STAGING_NAME = re.compile(r"\.(?P<out>.+)\.(?P<tag>partial|merged|old)-[A-Za-z0-9_]+")


WORKDIR_PREFIX = "cogtune-merge-"


def _mark(folder: Path, kind: str, out: Path | None = None) -> Path:
    """Sign a temporary folder as the kit's (pid, host, what it is for) so a later run may clean it up."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "kind": kind, "created": time.time(),
            "out": out.name if out is not None else None}
    (folder / STAGING_MARKER).write_text(json.dumps(info) + "\n")
    return folder


def staging_dir(out: Path, tag: str = "partial") -> Path:
    """A hidden folder beside `out` (same filesystem, so the final rename is atomic), marked as the kit's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return _mark(Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{tag}-")), tag, out)


def work_dir() -> Path:
    """The merge's scratch folder (probe image and tensors) under the system temp folder, marked as the kit's."""
    return _mark(Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX)), "work")


def _process_gone(pid: int) -> bool:
    """True when no process `pid` runs here (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except (OSError, IndexError):
        return False


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _empty_and_old(folder: Path, age_s: float = 60.0) -> bool:
    """An empty folder untouched for `age_s` (a merge that is starting right now marks its folder at once)."""
    try:
        return not any(folder.iterdir()) and time.time() - folder.stat().st_mtime > age_s
    except OSError:
        return False


def clean_stale(folders: list[Path], log: Callable[[str], None] = print) -> list[Path]:
    """Remove kit-made temporary folders whose process is gone; report hidden look-alikes without a marker.

    Never touches a folder without the marker, one whose process still runs, or one made on another host.
    A stale `.old-` folder (an earlier --force replacement killed between its two renames) is removed only
    when the output it belonged to exists again; otherwise it holds the previous output and is reported.
    """
    removed = []
    for folder in folders:
        marker = folder / STAGING_MARKER
        try:
            info = json.loads(marker.read_text())
            pid, host, kind = int(info["pid"]), str(info["host"]), str(info["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            if _empty_and_old(folder):  # killed between creating and marking it: nothing inside to lose
                folder.rmdir()
                removed.append(folder)
                log(f"removed {folder} (empty), left by a merge killed while it started")
                continue
            log(f"note: {folder} looks like an interrupted merge's temporary folder but carries no cogtune "
                "marker; left alone (delete it yourself if it is not in use)")
            continue
        if host != socket.gethostname():
            log(f"note: {folder} was left by a merge on host {host}; left alone")
            continue
        if not _process_gone(pid):
            continue  # another merge is writing it right now
        if kind == "old" and info.get("out") and not (folder.parent / info["out"]).exists():
            log(f"note: {folder}/x holds the previous {info['out']} (a --force replacement was interrupted); "
                f"move it back with `mv {folder}/x {folder.parent / info['out']}`")
            continue
        size = _folder_size(folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log(f"removed {folder} ({size / 1e6:.1f} MB), left by an interrupted merge (process {pid} is gone)")
    return removed


def stale_candidates(parent: Path) -> list[Path]:
    """Hidden staging folders beside outputs in `parent`, and the kit's scratch folders in the temp folder."""
    found = []
    if parent.is_dir():
        found += [p for p in sorted(parent.iterdir()) if p.is_dir() and _STAGING_NAME.fullmatch(p.name)]
    tmp = Path(tempfile.gettempdir())
    found += [p for p in sorted(tmp.glob(WORKDIR_PREFIX + "*"))
              if p.is_dir() and ((p / STAGING_MARKER).is_file() or _empty_and_old(p))]
    return found


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuse to replace an existing output without --force, and ever to replace an input folder."""
    resolved = out.resolve()
    for p in protected:
        p = p.resolve()
        if resolved == p or p.is_relative_to(resolved):
            raise ValueError(f"--out {out} is (or contains) the input folder {p}; choose another output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"output {out} already exists and is not empty; pass --force to replace it "
                              "(it is replaced only after the new one is written and verified)")


def publish(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old output (--force) is moved aside first, then deleted.

    Modes follow the umask (temporary folders and safetensors files are created owner-only).
    """
    from finetune.loading import respect_umask

    (staging / STAGING_MARKER).unlink(missing_ok=True)
    respect_umask(staging)
    old = None
    if out.exists():
        old = staging_dir(out, "old")
        os.replace(out, old / "x")
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
