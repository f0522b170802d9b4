"""`cogtune merge RUN_OR_ADAPTER_DIR --out DIR`: adapter + base -> one checkpoint in the official layout, verified.

Why each step (docs/architecture.md §19.11):
  * the base is read from run.json / cogtune.json, so nothing is repeated on the command line, and it is
    checked (family version, config hash, weight fingerprint, image tokens, every adapter key against a base
    Linear of the right shape) before any weight is loaded: merging onto the wrong base "works" and gives
    garbage, and two checkpoints with the same config.json (another seed, another fine-tune) differ only in
    their weights, hence the fingerprint (`finetune.loading.base_fingerprint`; --force-base overrides);
  * the base is loaded UNquantized in the chosen dtype even for QLoRA adapters: peft cannot merge into
    4-bit weights without rounding the delta away, and a deployable checkpoint is high precision first;
  * weights are written as sharded safetensors + `model.safetensors.index.json` with the official keys,
    next to the base's config.json (official fields, `torch_dtype` set), generation_config.json, the
    tokenizer, every other base file (remote code `*.py`, README) and `cogtune.json` (template, origin);
  * everything is written to a hidden folder beside the output and renamed at the very end, after the
    merged folder was reloaded in a FRESH process (strict keys, its own tokenizer) and its logits on
    probe inputs matched base + adapter. A failure or Ctrl-C leaves no output; an existing output is
    replaced only with --force. Staging folders carry a marker file; a later run removes those whose merge
    was killed (the process that made them is gone) and reports any hidden folder it cannot attribute;
  * the probe is stored as safetensors (never a pickle), and the verifying process dies with its parent.

`python -m adapters.merge FOLDER --probe FILE --report FILE` is the verification entry point that the
fresh process runs; users do not call it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import extra_params

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SKIP_BASE_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "config.json",
                   "generation_config.json", "cogtune.json"}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
QuantMode = Literal["nf4", "int8"]

# Tolerance on max |merged - (base + adapter)| over real (unpadded) probe positions, as a fraction of the
# reference logits' largest magnitude (at least 1). Merging rounds W + BA to the storage dtype once, where
# the unmerged model keeps W and adds BA x in higher precision; the gap is that rounding carried through
# the network. fp32 (unit roundoff 6e-8) leaves ~1e-6 relative on real depths, so 1e-4 only fails on a
# real merge error. fp16 (roundoff 4.9e-4) and bf16 (3.9e-3) round every weight by up to that fraction;
# measured on the tiny models it stays below a tenth of these bounds, and a wrong merge (a missing or
# doubled delta, a wrong scaling) moves logits by the adapter's whole effect, far above them.
MERGE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# After bnb quantization the weights move by ~5-10% (nf4: 16 levels per block of 64) or ~1% (int8), so the
# repeated check catches gross errors only (lost keys, a quantized vision tower, wrong scales): the MEAN
# abs difference must stay under this fraction of the reference's mean magnitude, and numbers are printed.
QUANT_TOLERANCE = {"nf4": 0.5, "int8": 0.2}


class AdapterMismatch(ValueError):
    """The adapter was trained on another base than the one given."""


# --------------------------------------------------------------------------------------------------
# Finding the adapter, its metadata and its base
# --------------------------------------------------------------------------------------------------


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
        return AdapterSource(path / "adapter", _read_json(meta_file), meta_file if meta_file.is_file() else None, path)
    if (path / "adapter_config.json").is_file():
        for meta_file in (path / "cogtune.json", path.parent / "run.json"):
            if meta_file.is_file():
                return AdapterSource(path, _read_json(meta_file), meta_file,
                                     path.parent if meta_file.name == "run.json" else None)
        return AdapterSource(path)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise FileNotFoundError(f"{path} is neither a run folder (run.json + adapter/adapter_config.json) nor a PEFT "
                            f"adapter folder (adapter_config.json); found: {found}")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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


def check_compatible(source: AdapterSource, base_dir: Path, config: Any, modules: dict[str, tuple[int, int]], *,
                     force_base: bool = False, log: Callable[[str], None] = print) -> None:
    """Refuse an adapter whose recorded base or whose weights do not fit this base; every problem at once.

    `modules`: name -> (in_features, out_features) of the base's Linear layers. `force_base`: a base whose
    weight fingerprint differs from the recorded one is used with a warning instead of refused.
    """
    from finetune.loading import base_fingerprint
    from finetune.recipe import config_hash

    where = source.meta_file or source.adapter_dir
    recorded_base = source.meta.get("base_checkpoint", "?")
    problems = []
    version = source.meta.get("family_version")
    if version is not None and int(version) != int(config.cogvlm_version):
        problems.append(f"family: the adapter was trained on CogVLM{version} ({where}), {base_dir} is "
                        f"CogVLM{config.cogvlm_version}")
    want_hash = source.meta.get("base_config_hash")
    if want_hash and want_hash != config_hash(base_dir):
        problems.append(f"config hash: the adapter's base had config.json hash {want_hash} ({recorded_base}), "
                        f"{base_dir}/config.json hashes to {config_hash(base_dir)} (another checkpoint or an edited "
                        "config)")
    want_fp = source.meta.get("base_fingerprint")
    if want_fp and not problems:  # a config mismatch already says "another checkpoint"
        have_fp = base_fingerprint(base_dir)
        if have_fp != want_fp:
            text = (f"base weights: the adapter was trained on weights with fingerprint {want_fp} ({recorded_base}), "
                    f"{base_dir} has {have_fp}: same config.json, other weights (another seed or fine-tune, or "
                    "the base was changed since training)")
            if force_base:
                log(f"warning: {text}; --force-base given, using it anyway")
            else:
                problems.append(text + ". Pass --force-base to use this base anyway")
    tokens = source.meta.get("image_tokens")
    if tokens is not None and int(tokens) != int(config.image_tokens):
        problems.append(f"image tokens: the adapter was trained with {tokens} tokens per image, the base gives "
                        f"{config.image_tokens}")
    problems += _check_adapter_keys(source.adapter_dir, modules)
    if problems:
        raise AdapterMismatch(
            f"adapter {source.adapter_dir} does not match base {base_dir}:\n  - " + "\n  - ".join(problems)
            + f"\nPass --base with the checkpoint it was trained on (run.json says {recorded_base}).")


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_[AB]|lora_embedding_[AB]|"
                       r"lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


def _check_adapter_keys(adapter_dir: Path, modules: dict[str, tuple[int, int]]) -> list[str]:
    """Each LoRA tensor must sit on a base Linear with matching in/out features (target modules match)."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"{weights} is missing (only safetensors adapters are supported)"]
    bad: list[str] = []
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                continue
            name, kind = m.group("module"), m.group("kind")
            if name not in modules:
                bad.append(f"{name} (targeted by the adapter) is not a Linear layer of the base")
                continue
            shape = fh.get_slice(key).get_shape()
            fan_in, fan_out = modules[name]
            if (kind == "lora_A" and shape[-1] != fan_in) or (kind == "lora_B" and shape[0] != fan_out):
                bad.append(f"{key}: shape {tuple(shape)} does not fit the base Linear {name} "
                           f"({fan_in} -> {fan_out})")
    if len(bad) > 5:
        bad = bad[:5] + [f"... and {len(bad) - 5} more target-module mismatches"]
    return bad


def check_adapters(adapters: list[tuple[str, AdapterSource]], base_dir: Path, *, force_base: bool = False,
                   log: Callable[[str], None] = print) -> None:
    """check_compatible for each adapter against the base's module tree on the meta device (no weights read)."""
    from finetune.loading import build_meta_model

    meta = build_meta_model(base_dir)
    shapes = linear_shapes(meta)
    for _, src in adapters:
        check_compatible(src, base_dir, meta.config, shapes, force_base=force_base, log=log)


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every Linear (quantized Linears included)."""
    import torch

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = (mod.in_features, mod.out_features)
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def stored_dtype(checkpoint_dir: Path) -> str:
    """The dtype the checkpoint was saved in (config.json torch_dtype / dtype), bfloat16 when unrecorded."""
    cfg = _read_json(checkpoint_dir / "config.json")
    value = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return value if value in MERGE_TOLERANCE else "bfloat16"


def load_base(base_dir: Path, dtype: str, quantization_config: Any = None) -> Any:
    """The base model, unquantized unless `quantization_config` is given, in eval mode."""
    import torch

    from finetune.loading import check_checkpoint_dir, model_classes

    base_dir = check_checkpoint_dir(base_dir)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    return model_classes(base_dir)[1].from_pretrained(str(base_dir), **kwargs).eval()


def attach_adapters(model: Any, adapters: list[tuple[str, AdapterSource]], base_dir: Path) -> Any:
    """Load each adapter under its name on one base (check them first: `check_adapters`); the first is active."""
    from peft import PeftModel

    name, first = adapters[0]
    model = PeftModel.from_pretrained(model, str(first.adapter_dir), adapter_name=name, is_trainable=False)
    for name, src in adapters[1:]:
        model.load_adapter(str(src.adapter_dir), adapter_name=name, is_trainable=False)
    # Bare parameters trained beside LoRA (boi/eoi, adapters/extra_params.py): kept per adapter, swapped on use.
    model.cogtune_extra_params = {n: extra_params.read(src.adapter_dir) for n, src in adapters}
    model.cogtune_base_params = {}
    use_adapter(model, adapters[0][0])
    return model.eval()


def use_adapter(model: Any, name: str) -> None:
    """Activate adapter `name`: peft's set_adapter plus that adapter's bare parameters (base values otherwise)."""
    model.set_adapter(name)
    extra_params.apply(model, model.cogtune_base_params)  # back to the base's own values
    model.cogtune_base_params = extra_params.apply(model, model.cogtune_extra_params.get(name, {}))


def load_tokenizer_for(source: AdapterSource | None, base_dir: Path, config: Any,
                       tokenizer_dir: str | Path | None = None) -> Any:
    """`tokenizer_dir` when given, else the adapter's saved tokenizer (the trainer stores it there), else the
    run's tokenizer_dir, else the base's."""
    from finetune.tokenization import _has_tokenizer, load_tokenizer

    if tokenizer_dir is not None:
        return load_tokenizer(base_dir, tokenizer_dir, config)
    if source is not None and _has_tokenizer(source.adapter_dir):
        return load_tokenizer(base_dir, source.adapter_dir, config)
    tokenizer_dir = source.meta.get("tokenizer_dir") if source is not None else None
    return load_tokenizer(base_dir, tokenizer_dir, config)


# --------------------------------------------------------------------------------------------------
# Probe inputs and logits comparison
# --------------------------------------------------------------------------------------------------

PROBE_QUESTIONS = ("What is in this image?", "Describe the picture in one sentence.")


def probe_image(path: Path, size: int = 64) -> Path:
    """A deterministic colour-gradient PNG (no randomness, no download)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([x, y, 1.0 - (x + y) / 2], axis=-1) * 255
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def probe_conversations(image: Path) -> list[Any]:
    """Two image questions and one text-only row, so both experts and left padding are exercised."""
    from data_formats.schema import Conversation, Message

    rows = [Conversation(f"probe{i}", [str(image)], [Message("user", q)]) for i, q in enumerate(PROBE_QUESTIONS)]
    rows.append(Conversation("probe-text", [], [Message("user", "Say hello.")]))
    return rows


def build_probe(tokenizer: Any, config: Any, template: str, workdir: Path) -> dict[str, Any]:
    """Probe batch built with the run's template by processing: left padded, as at generation time."""
    from finetune.processing_cogvlm import CogVLMCollator

    convs = probe_conversations(probe_image(workdir / "probe.png"))
    collator = CogVLMCollator(tokenizer, config, template_version=template, padding_side="left",
                              add_generation_prompt=True)
    batch = collator(convs)
    return {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "images", "cross_images")
            if k in batch}


PROBE_KEYS = ("input_ids", "token_type_ids", "attention_mask", "images", "cross_images", "reference")


def save_probe(path: Path, probe: dict[str, Any], reference: Any, template: str) -> None:
    """Probe batch + reference logits as safetensors: the verifying process never unpickles anything."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in {**probe, "reference": reference}.items()
               if k in PROBE_KEYS and v is not None}
    save_file(tensors, str(path), metadata={"template": template})


def load_probe(path: Path) -> dict[str, Any]:
    """save_probe's file back (tensors only; a pickle or any other format is refused by safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"probe {path} is not a safetensors probe written by merge ({err}); "
                         "it was not loaded") from None
    return {"images": None, **tensors}


def probe_logits(model: Any, probe: dict[str, Any]) -> Any:
    """(B, L, V) fp32 logits on CPU for the probe batch."""
    import torch

    from finetune.generation import prepare_batch

    with torch.no_grad():
        return model(**prepare_batch(model, probe)).logits.float().cpu()


def compare_logits(got: Any, ref: Any, mask: Any) -> dict[str, float]:
    """max/mean |got - ref| and top-1 agreement over unpadded positions; the reference's scale for tolerances."""
    keep = mask.bool()
    diff = (got - ref).abs()[keep]  # (N, V)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ref_max_abs": float(ref[keep].abs().max()), "ref_mean_abs": float(ref[keep].abs().mean()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1))[keep].float().mean())}


def passes(stats: dict[str, float], dtype: str, quant: QuantMode | None) -> tuple[bool, str]:
    """(ok, the rule applied as text) for a comparison."""
    if quant is None:
        bound = MERGE_TOLERANCE[dtype] * max(1.0, stats["ref_max_abs"])
        return stats["max_abs_diff"] <= bound, f"max abs diff <= {bound:.3g} ({dtype} tolerance)"
    bound = QUANT_TOLERANCE[quant] * stats["ref_mean_abs"]
    return stats["mean_abs_diff"] <= bound, f"mean abs diff <= {bound:.3g} ({quant} tolerance)"


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


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


def write_side_files(folder: Path, base_dir: Path, tokenizer: Any, dtype: str, info: dict[str, Any]) -> None:
    """config.json (the base's fields, torch_dtype set), generation_config.json, tokenizer, other base files,
    and cogtune.json (template and origin) - everything a loader or lmdeploy looks for beside the weights."""
    cfg = _read_json(base_dir / "config.json")
    cfg["torch_dtype"] = dtype
    if "dtype" in cfg:
        cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", folder / "generation_config.json")
    tokenizer.save_pretrained(str(folder))
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


def verify_in_fresh_process(folder: Path, probe_file: Path, dtype: str, quant: QuantMode | None,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """Reload `folder` in a new Python process (strict keys, its own tokenizer and template) and compare logits."""
    report = probe_file.with_suffix(f".{quant or 'merged'}.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "adapters.merge", str(folder), "--probe", str(probe_file), "--report", str(report),
           "--dtype", dtype, "--parent-pid", str(os.getpid())] + (["--quant", quant] if quant else [])
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # the child ties itself to us
    if proc.returncode != 0 or not report.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"the written folder {folder} failed to reload in a fresh process:\n{tail}")
    result = json.loads(report.read_text())
    result["reload_seconds"] = round(time.time() - t0, 1)
    return result


def format_stats(label: str, s: dict[str, Any]) -> str:
    return (f"{label}: max abs diff {s['max_abs_diff']:.3e}, mean abs diff {s['mean_abs_diff']:.3e} "
            f"(reference logits: max |x| {s['ref_max_abs']:.2f}, mean |x| {s['ref_mean_abs']:.3f}), "
            f"top-1 agreement {100 * s['top1_agreement']:.1f}%")


# --------------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------------


@dataclass
class MergeReport:
    out: Path
    dtype: str
    stats: dict[str, Any]
    adapter_effect: float
    quant_stats: dict[str, Any] | None = None


def merge_adapter(
    source: str | Path | AdapterSource,
    out: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    force_base: bool = False,
    quantize: QuantMode | None = None,
    max_shard_size: str = "5GB",
    log: Callable[[str], None] = print,
) -> MergeReport:
    """Merge, write the official layout, verify in a fresh process, then publish `out` (see module docstring).

    `dtype`: bfloat16 / float16 / float32 (default: the dtype the base was saved in). `quantize`: additionally
    quantize the verified merged weights with bitsandbytes (vision tower and GLU adapter stay unquantized).
    `force` replaces an existing output; `force_base` accepts a base whose weights differ from the recorded ones.
    """
    import torch

    src = source if isinstance(source, AdapterSource) else resolve_adapter(source)
    out = Path(out)
    base_dir = resolve_base(src, base)
    check_output(out, force, [base_dir, src.adapter_dir])
    clean_stale(stale_candidates(out.parent), log)
    check_adapters([("default", src)], base_dir, force_base=force_base, log=log)  # before any weight is read
    dtype = DTYPES.get(dtype, dtype) if dtype else stored_dtype(base_dir)
    if dtype not in MERGE_TOLERANCE:
        raise ValueError(f"dtype {dtype!r} is not one of bf16, fp16, fp32")
    if src.meta.get("quant_mode", "none") != "none":
        log(f"note: the adapter was trained on a {src.meta['quant_mode']}-quantized base (QLoRA); it is merged "
            f"into the UNquantized base in {dtype}, and verified against that")
    if not src.meta:
        log(f"warning: {src.adapter_dir} has no run.json/cogtune.json; family and config hash cannot be checked, "
            "only that every adapter tensor fits a base layer")

    staging = staging_dir(out)
    hp_dir = staging_dir(out, "merged") if quantize else staging
    work = work_dir()
    try:
        # ---- Base + adapter (reference) ----
        t0 = time.time()
        model = load_base(base_dir, dtype)
        config = model.config
        model = attach_adapters(model, [("default", src)], base_dir)
        tokenizer = load_tokenizer_for(src, base_dir, config)
        template = template_for(src, config)
        log(f"loaded base {base_dir} (CogVLM{config.cogvlm_version}, {dtype}, unquantized) + adapter "
            f"{src.adapter_dir} in {time.time() - t0:.1f}s; template '{template}'")
        probe = build_probe(tokenizer, config, template, work)
        reference = probe_logits(model, probe)
        with model.disable_adapter():
            base_logits = probe_logits(model, probe)
        effect = compare_logits(reference, base_logits, probe["attention_mask"])["max_abs_diff"]
        save_probe(work / "probe.safetensors", probe, reference, template)

        # ---- Merge and write ----
        merged = model.merge_and_unload()
        state = merged.state_dict()
        expected = checkpoint_keys(base_dir)
        if expected and set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise RuntimeError(f"merged keys differ from the base checkpoint's: extra {extra[:5]}, missing "
                               f"{missing[:5]}; the merge left adapter modules behind")
        info = {"format": "merged", "family_version": config.cogvlm_version, "template_version": template,
                "image_tokens": config.image_tokens, "dtype": dtype, "base_checkpoint": str(base_dir.resolve()),
                "adapter": str(src.adapter_dir.resolve()), "adapter_meta": src.meta}
        write_shards(state, hp_dir, parse_size(max_shard_size))
        del state, merged, model
        write_side_files(hp_dir, base_dir, tokenizer, dtype, info)

        # ---- Verify (fresh process) ----
        stats = verify_in_fresh_process(hp_dir, work / "probe.safetensors", dtype, None, log)
        ok, rule = passes(stats, dtype, None)
        noise = MERGE_TOLERANCE[dtype] * max(1.0, stats["ref_max_abs"])
        if ok and effect > noise:  # the merge must carry the adapter, not just stay near the base
            ok = stats["max_abs_diff"] <= 0.5 * effect
            rule += f" and <= half the adapter's effect ({0.5 * effect:.3g})"
        log(format_stats("merged vs base+adapter", stats) + f"; adapter effect on logits: max {effect:.3e}")
        if effect <= noise:
            log(f"WARNING: the adapter moves the probe logits by at most {effect:.3g}, within {dtype} merge noise "
                f"({noise:.3g}): this check cannot tell a correct merge from one that lost the adapter. "
                "Re-run with --dtype fp32 to verify it.")
        log(f"fresh-process reload: strict keys OK, probe answer {stats['probe_answer']!r} "
            f"({stats['reload_seconds']}s)")
        if not ok:
            raise RuntimeError(f"verification FAILED: {rule} does not hold; the merged weights differ from base + "
                               "adapter. Nothing was written to the output.")
        log(f"verification passed: {rule}")
        quant_stats = None

        # ---- Optional bnb quantization of the verified merge ----
        if quantize:
            from finetune.config import QuantSection
            from finetune.loading import to_bnb_config

            bnb = to_bnb_config(QuantSection(mode=quantize), getattr(torch, dtype))
            qmodel = load_base(hp_dir, dtype, quantization_config=bnb)
            qmodel.save_pretrained(str(staging), max_shard_size=max_shard_size)
            del qmodel
            for f in hp_dir.iterdir():
                if not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in ("config.json", *SKIP_BASE_FILES):
                    shutil.copy2(f, staging / f.name)
            qinfo = {**info, "format": f"bnb-{'4bit' if quantize == 'nf4' else '8bit'}", "quant_mode": quantize}
            (staging / "cogtune.json").write_text(json.dumps(qinfo, indent=2) + "\n")
            quant_stats = verify_in_fresh_process(staging, work / "probe.safetensors", dtype, quantize, log)
            ok, rule = passes(quant_stats, dtype, quantize)
            log(format_stats(f"{quantize} export vs base+adapter", quant_stats))
            if not ok:
                raise RuntimeError(f"quantized verification FAILED: {rule} does not hold. Nothing was written.")
            log(f"quantized verification passed: {rule}")

        publish(staging, out)
        log(f"wrote {out}")
        return MergeReport(out, dtype, stats, effect, quant_stats)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if hp_dir != staging:
            shutil.rmtree(hp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Fresh-process verification entry point
# --------------------------------------------------------------------------------------------------


def tie_to_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """End this process when `parent_pid` (the merge) dies: a killed merge leaves no verifier running.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); everywhere: a daemon
    thread polls the parent id (it changes when the parent dies) as a fallback.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="cogtune-parent-watch").start()


def verify_folder(folder: Path, probe_file: Path, dtype: str) -> dict[str, Any]:
    """Load `folder` as a user would (strict keys, its tokenizer, its cogtune.json template); compare; generate."""
    from finetune.generation import generate_answers
    from finetune.tokenization import load_tokenizer

    probe = load_probe(probe_file)  # first: a bad probe fails before the model loads
    model = load_base(folder, dtype)  # quantized folders carry their quantization_config
    tokenizer = load_tokenizer(folder, None, model.config)
    stats = compare_logits(probe_logits(model, probe), probe["reference"], probe["attention_mask"])
    template = _read_json(folder / "cogtune.json").get("template_version", model.config.template_version)
    convs = probe_conversations(Path(probe_file).with_name("probe.png"))
    stats["probe_answer"] = generate_answers(model, tokenizer, convs[:1], template_version=template,
                                             max_new_tokens=8)[0]
    return stats


def verify_main(argv: list[str]) -> int:
    """Entry point of the fresh verification process: writes verify_folder's numbers to --report."""
    p = argparse.ArgumentParser(prog="python -m adapters.merge")
    p.add_argument("folder")
    p.add_argument("--probe", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--quant", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent_pid is not None:
        tie_to_parent(args.parent_pid)
    stats = verify_folder(Path(args.folder), Path(args.probe), args.dtype)
    Path(args.report).write_text(json.dumps(stats))
    return 0


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune merge", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="run folder (run.json + adapter/) or adapter folder")
    p.add_argument("--base", default=None, help="base checkpoint (default: the one recorded in run.json)")
    p.add_argument("--out", required=True, help="output folder (written beside, renamed when verified)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: the dtype the base was saved in)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--force-base", action="store_true",
                   help="merge even when the base's weights differ from those the adapter was trained on")
    args = p.parse_args(argv)
    try:
        merge_adapter(args.source, args.out, base=args.base, dtype=args.dtype, force=args.force,
                      force_base=args.force_base, max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(verify_main(sys.argv[1:]))
