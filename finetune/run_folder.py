"""The run folder: checkpoint manifests, listing and checking checkpoints (and, below, run.json).

Everything that reads or writes the files a run leaves behind lives here, so train, resume, merge and predict
agree on one format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .fileio import write_atomic

MANIFEST = "cogtune-manifest.json"
RUN_STATE = "cogtune-run-state.json"
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt",
                    "scheduler.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Record every file of a finished checkpoint (size, sha256); written last, it marks the checkpoint complete."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
    return folder / MANIFEST


def checkpoint_problem(folder: str | Path, need_manifest: bool = True) -> str | None:
    """Why `folder` cannot be resumed from (None when it can): incomplete, altered, or non-finite weights."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, meta in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
            if _sha256(path) != meta["sha256"]:
                return f"{name} differs from the checksum recorded when it was saved"
    elif need_manifest:
        return f"no {MANIFEST}: the save was interrupted (or the checkpoint predates it)"
    # FSDP checkpoints hold the optimizer state as a sharded folder (resumable on another number of GPUs)
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()
               and not (name == "optimizer.pt" and (folder / "optimizer_0").is_dir())]
    if missing:
        return f"{', '.join(missing)} missing (resuming would restart the optimizer or the schedule)"
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():
                    if not bool(torch.isfinite(fh.get_tensor(key)).all()):
                        return f"{weights.name}: tensor {key} holds NaN/inf"
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            return f"{weights.name} is unreadable ({exc})"
    return None


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


def list_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of a run folder, newest first."""
    import re

    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def newest_complete_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, [(newer checkpoint, why it was skipped), ...])."""
    skipped = []
    for folder in list_checkpoints(out):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


RUN_JSON = "run.json"
RUN_JSON_FORMAT = 1  # bump when a field changes meaning; readers refuse newer formats


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class RunInfo:
    """run.json: what a run is (status running / failed / completed) and, once completed, what merge, export,
    predict and chat need to find and check its base. Written atomically at the start, on failure and at the end.

    `extra` holds method-specific numbers (DPO's beta and accuracies, SFT's token counts); they are written at the
    top level of the file like the fields, and unknown keys of a file read back land there, so nothing is lost.
    """

    status: str = "running"
    started: str = field(default_factory=_now)
    finished: str | None = None
    error: str | None = None
    resumed_from: str | None = None
    method: str = "sft"
    family: str | None = None  # finetune/models table name
    family_version: int | None = None  # generation within the family (CogVLM 1 / CogVLM2 2)
    base_checkpoint: str | None = None
    base_config_hash: str | None = None
    base_fingerprint: str | None = None
    tokenizer_dir: str | None = None
    template_version: str | None = None
    image_tokens: int | None = None
    quant_mode: str | None = None
    targets: list[str] = field(default_factory=list)
    global_step: int | None = None
    train_loss: float | None = None
    wall_seconds: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format: int = RUN_JSON_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    def write(self, folder: str | Path) -> Path:
        return write_atomic(Path(folder) / RUN_JSON, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = RUN_JSON) -> RunInfo:
        fmt = data.get("format", 1)
        if not isinstance(fmt, int) or fmt > RUN_JSON_FORMAT:
            raise ValueError(f"{where}: format {fmt!r} was written by a newer cogtune (this one reads format "
                             f"<= {RUN_JSON_FORMAT}); upgrade cogtune to use this run")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, folder: str | Path) -> RunInfo:
        path = Path(folder) / RUN_JSON
        return cls.from_dict(json.loads(path.read_text()), str(path))

    def finish(self, cfg: RunConfig, config: Any, template: str, **numbers: Any) -> None:
        """Mark completed and record the base (path, config hash, weight fingerprint, family) merge checks against."""
        from .loading import base_fingerprint
        from .models import family_of

        self.status, self.finished, self.error = "completed", _now(), None
        self.family = family_of(config).name
        self.family_version = getattr(config, "cogvlm_version", None)
        self.base_checkpoint = str(Path(cfg.model.checkpoint_dir).resolve())
        self.base_config_hash = config_hash(cfg.model.checkpoint_dir)
        self.base_fingerprint = base_fingerprint(cfg.model.checkpoint_dir)
        self.tokenizer_dir = cfg.model.tokenizer_dir
        self.template_version = template
        self.image_tokens = config.image_tokens
        self.quant_mode = cfg.quant.mode
        self.targets = list(cfg.lora.targets)
        self.versions = library_versions()
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in numbers.items():
            if key in names:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def fail(self, err: BaseException) -> None:
        self.status, self.finished = "failed", _now()
        self.error = f"{type(err).__name__}: {err}"[:2000]


# Names a run of the kit writes into output.dir (and their temporary forms); nothing else is ever removed.
_KIT_NAMES = re.compile(
    r"\.?(checkpoint-\d+|adapter|runs|run\.json|recipe\.resolved\.yaml|plan\.txt|curves\.png|log_history\.json|"
    r"eval_predictions_step\d+\.jsonl|eval_report_step\d+\.html)(\..*)?")


def kit_owned(entry: Path) -> bool:
    return bool(_KIT_NAMES.fullmatch(entry.name))


def run_inputs(cfg: RunConfig) -> dict[str, Path]:
    """The run's inputs that must never sit inside its output folder."""
    paths = {"model.checkpoint_dir": cfg.model.checkpoint_dir, "model.tokenizer_dir": cfg.model.tokenizer_dir,
             "data.train_path": cfg.data.train_path, "data.eval_path": cfg.data.eval_path,
             "data.image_root": cfg.data.image_root}
    return {k: Path(v).resolve() for k, v in paths.items() if v}


def prepare_run_folder(cfg: RunConfig, out: Path, log=print, clear: bool = True) -> Path | None:
    """Check output.dir against the recipe; returns the checkpoint to resume from (None: a fresh run).

    A fresh run needs an empty folder, or one holding only what an earlier run of the kit wrote: from a run
    that trained nothing (failed early) it is reused as is; from one with checkpoints or an adapter it
    needs output.overwrite=true. Either way only the kit's own files are removed, never anything else,
    and never a folder that holds an input of the run.
    """

    from .run_folder import checkpoint_problem, newest_complete_checkpoint

    resume = None
    if cfg.train.resume == "auto":
        resume, skipped = newest_complete_checkpoint(out)
        for folder, why in skipped:
            log(f"resume: skipped {folder.name}: {why}")
        if resume is None and skipped:
            raise ValueError(f"cannot resume {out}: no complete checkpoint (" + "; ".join(
                f"{f.name}: {why}" for f, why in skipped) + "). Start over with output.overwrite=true (removes only "
                "the kit's files), or train into another output.dir.")
        log(f"resume: {resume or 'no checkpoint found, starting fresh'}")
        if resume is not None and clear:
            for folder, _ in skipped:  # newer but incomplete: the kit's own, and the run will write them again
                shutil.rmtree(folder)
    elif cfg.train.resume:
        resume = Path(cfg.train.resume)
        problem = checkpoint_problem(resume, need_manifest=False)
        if problem:
            raise ValueError(f"cannot resume from {resume}: {problem}. Pick a complete checkpoint (train.resume=auto "
                             "takes the newest one that verifies).")
    elif out.is_dir() and any(out.iterdir()):
        entries = sorted(out.iterdir())
        ours = (out / "recipe.resolved.yaml").is_file() or (out / "run.json").is_file()
        foreign = [e.name + ("/" if e.is_dir() else "") for e in entries if not (ours and kit_owned(e))]
        inside = [f"{k} ({p})" for k, p in run_inputs(cfg).items() if p == out.resolve() or out.resolve() in p.parents]
        if foreign or inside:
            what = []
            if foreign:
                what.append(f"files the kit did not write: {', '.join(foreign[:8])}"
                            + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""))
            if inside:
                what.append(f"inputs of this run: {', '.join(inside)}")
            why = ("Nothing was removed: output.overwrite only ever removes what an earlier run of the kit wrote. "
                   if cfg.output.overwrite else "")
            raise ValueError(f"run folder {out} is not empty: it holds {'; '.join(what)}. {why}Train into another "
                             "(or an empty) output.dir.")
        trained = [e.name for e in entries if e.name == "adapter" or re.fullmatch(r"checkpoint-\d+", e.name)]
        if trained and not cfg.output.overwrite:
            raise ValueError(f"run folder {out} is not empty: it holds an earlier run ({', '.join(trained[:4])}). "
                             "Use --resume auto (train.resume=auto) to continue it, output.overwrite=true to start "
                             "over (removes only the kit's files), or another output.dir.")
        if clear:
            for entry in entries:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            log(f"output.overwrite: removed {len(entries)} entries an earlier run wrote in {out}" if trained else
                f"run folder {out}: reusing it (it held only files of a run that trained nothing)")
    if resume is not None:
        check_same_recipe(out / "recipe.resolved.yaml", cfg)
    return resume


# Sections whose change makes a checkpoint belong to another experiment (train.* may change on resume,
# e.g. max_steps to train longer).
_RESUME_SECTIONS = ("model", "data", "lora", "quant", "dpo")


def check_same_recipe(saved: Path, cfg: RunConfig) -> None:
    """Refuse to resume a run folder written by a different recipe (model, data, LoRA or quantization)."""
    import dataclasses

    import yaml

    if not saved.is_file():
        return
    before = yaml.safe_load(saved.read_text()) or {}
    now = dataclasses.asdict(cfg)
    changed = [f"{sec}.{k}: {before.get(sec, {}).get(k)!r} -> {v!r}" for sec in _RESUME_SECTIONS
               for k, v in now[sec].items() if before.get(sec, {}).get(k) != v]
    if changed:
        raise ValueError(f"cannot resume {saved.parent}: its recipe differs in " + "; ".join(changed)
                         + ". Resume with the same recipe, or train into another output.dir.")


def config_hash(checkpoint_dir: str | Path) -> str:
    """sha256 of the base config.json: merge refuses an adapter trained on another base."""
    data = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(volatile, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cogtune", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class AdapterSource:
    """A PEFT adapter folder plus what the run recorded about it (run.json or cogtune.json; {} when neither)."""

    adapter_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)
    meta_file: Path | None = None
    run_dir: Path | None = None


def resolve_adapter(path: str | Path) -> AdapterSource:
    """A run folder (run.json + adapter/), an exported adapter (adapter_config.json + cogtune.json) or a bare one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist; pass a run folder (with run.json and "
                                "adapter/) or a PEFT adapter folder (with adapter_config.json)")
    if (path / "adapter" / "adapter_config.json").is_file():
        meta_file = path / "run.json"
        return AdapterSource(path / "adapter", read_json(meta_file), meta_file if meta_file.is_file() else None, path)
    if (path / "adapter_config.json").is_file():
        for meta_file in (path / "cogtune.json", path.parent / "run.json"):
            if meta_file.is_file():
                return AdapterSource(path, read_json(meta_file), meta_file,
                                     path.parent if meta_file.name == "run.json" else None)
        return AdapterSource(path)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise FileNotFoundError(f"{path} is neither a run folder (run.json + adapter/adapter_config.json) nor a PEFT "
                            f"adapter folder (adapter_config.json); found: {found}")


def read_json(path: Path) -> dict[str, Any]:
    """A metadata file as a dict ({} when absent); run.json goes through RunInfo (format check, same keys)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return RunInfo.from_dict(data, str(path)).to_dict() if path.name == RUN_JSON else data


def resolve_base(source: AdapterSource, base: str | Path | None) -> Path:
    """--base when given, else the base_checkpoint the run recorded."""
    from finetune.loading import check_checkpoint_dir

    if base is None:
        recorded = source.meta.get("base_checkpoint")
        if not recorded:
            raise ValueError(f"{source.adapter_dir} has no run.json/cogtune.json naming its base checkpoint; "
                             "pass --base DIR (the checkpoint the adapter was trained on)")
        base = recorded
    return check_checkpoint_dir(base)


def template_for(source: AdapterSource | None, config: Any) -> str:
    """The template the adapter was trained with, else the checkpoint's own."""
    if source is not None and source.meta.get("template_version"):
        return str(source.meta["template_version"])
    return str(config.template_version)
