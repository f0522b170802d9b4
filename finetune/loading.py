"""Load a checkpoint, its tokenizer and (optionally) a 4/8-bit quantization, as a recipe asks.

The one place where `model.*` and `quant.*` recipe sections become `from_pretrained` arguments. Every load is
local-only: a folder that does not exist is an error naming it, never a Hub id to download. A checkpoint is
checked cheaply before any weight is read (config.json is a CogVLM config, every shard's safetensors header is
intact and its size matches), so a wrong or damaged folder gives one line, not a traceback.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fileio import respect_umask  # noqa: F401  (re-exported: adapters import it from here)

if TYPE_CHECKING:
    import torch

    from .config import ModelSection, QuantSection


class CheckpointError(ValueError):
    """A checkpoint folder exists but is not a usable CogVLM checkpoint (wrong model, damaged files)."""


_LAYOUT = ("Expected an official-layout folder: config.json, model.safetensors.index.json + model-*.safetensors "
           "(or model.safetensors).")


def require_folder(path: str | Path, what: str = "checkpoint folder") -> Path:
    """`path` as a local folder, or FileNotFoundError saying so; never interpreted as a Hub id."""
    given = str(path)
    path = Path(path).expanduser()
    if path.is_dir():
        return path
    where = what if path.is_absolute() else f"{what}, relative to the current folder {Path.cwd()}"
    if path.exists():
        raise FileNotFoundError(f"not a folder: {given} is a file ({where})")
    hint = ""
    if not path.is_absolute() and given.count("/") == 1 and not given.startswith("."):
        hint = (f". Nothing is downloaded: if {given!r} is a Hub id, download it first "
                f"(`huggingface-cli download {given} --local-dir DIR`) and pass DIR")
    raise FileNotFoundError(f"folder does not exist: {given} ({where}){hint}")


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, checked to be a CogVLM/CogVLM2 config (CheckpointError otherwise)."""
    path = require_folder(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
        raise FileNotFoundError(f"checkpoint folder {path} lacks config.json (found: {found}). {_LAYOUT} "
                                "`cogtune make-tiny --family cogvlm2 --out DIR` writes a tiny example of the layout.")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not UTF-8 text ({err.reason}); the file is damaged") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}:{err.lineno}: not valid JSON ({err.msg}); the file is damaged or "
                              "not a config") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, found {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in (None, "cogvlm", "cogagent") or not isinstance(cfg.get("vision_config"), dict):
        kind = f"model_type {model_type!r}" if model_type not in (None, "cogvlm", "cogagent") else "no vision_config"
        arch = ", ".join(cfg.get("architectures") or []) or "?"
        raise CheckpointError(f"{cfg_file}: {kind} (architectures: {arch}): not a CogVLM/CogVLM2 image checkpoint. "
                              "Point model.checkpoint_dir (or --model/--base) at a CogVLM or CogVLM2 folder.")
    return cfg


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """(header, data start offset) of a safetensors file; CheckpointError when it is truncated or not one."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100_000_000):
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"header describes {8 + n + end} bytes, the file holds {size} (truncated or appended to)")
    except (ValueError, KeyError, TypeError, IndexError, OSError) as err:
        raise CheckpointError(f"{file}: damaged safetensors file ({err}); re-download or re-create it") from None
    return header, 8 + n


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors shards: those the index names, else every *.safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: damaged index ({type(err).__name__}: {err}); re-download it") from None
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail in one line, every problem at once, when a checkpoint folder is missing, wrong or damaged."""
    path = require_folder(path)
    read_checkpoint_config(path)
    files = weight_files(path)
    if not files:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
        raise FileNotFoundError(f"checkpoint folder {path} lacks *.safetensors weights (found: {found}). {_LAYOUT} "
                                "`cogtune make-tiny --family cogvlm2 --out DIR` writes a tiny example of the layout.")
    problems = []
    for f in files:
        if not f.is_file():
            problems.append(f"{f.name} is named in model.safetensors.index.json but missing")
            continue
        try:
            _safetensors_header(f)
        except CheckpointError as err:
            problems.append(str(err))
    if problems:
        raise CheckpointError(f"checkpoint folder {path}: " + "; ".join(problems))
    return path


# Bytes read per tensor for the fingerprint: its start, middle and end.
_SAMPLE = 64


def base_fingerprint(checkpoint_dir: str | Path) -> str:
    """A cheap identity of a checkpoint's weights, recorded at train time and checked by merge/predict/chat.

    config.json alone cannot tell two checkpoints of the same architecture apart (another seed, another
    fine-tune). This hashes every tensor's name, dtype and shape plus 3 x 64 bytes of its data (start, middle,
    end), read with seeks: a few hundred KB for a 40 GB checkpoint, independent of how it is sharded.
    """
    path = check_checkpoint_dir(checkpoint_dir)
    entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for f in weight_files(path):
        header, start = _safetensors_header(f)
        for name, info in header.items():
            if name != "__metadata__":
                entries[name] = (f, start, info)
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name in sorted(entries):
            f, start, info = entries[name]
            fh = handles.get(f) or handles.setdefault(f, f.open("rb"))
            begin, end = (int(x) for x in info["data_offsets"])
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            for at in sorted({begin, max(begin, (begin + end) // 2 - _SAMPLE // 2), max(begin, end - _SAMPLE)}):
                fh.seek(start + at)
                digest.update(fh.read(min(_SAMPLE, end - at)))
    finally:
        for fh in handles.values():
            fh.close()
    return "sfp1-" + digest.hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# File modes: temporary files (mkstemp, mkdtemp, safetensors' own writer) are owner-only; published
# outputs get the modes the user's umask gives ordinary files.
# --------------------------------------------------------------------------------------------------


def resolve_dtype(name: str) -> torch.dtype:
    """auto -> bfloat16 on a GPU that supports it, float16 on older GPUs, float32 on CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_meta_model(checkpoint_dir: str | Path):
    """The model's module tree with no weights (meta device): for target reports and key checks."""
    import torch

    from .models import load_config, model_class_for

    path = require_folder(checkpoint_dir)
    read_checkpoint_config(path)
    config = load_config(path)
    with torch.device("meta"):
        return model_class_for(config)(config)


def to_bnb_config(quant: QuantSection, compute_dtype: torch.dtype, full_precision: Sequence[str]):
    """quant section -> transformers' BitsAndBytesConfig (None when not quantizing).

    Only the language model's linears are quantized: `full_precision` is the model class's
    `full_precision_modules` (vision tower with its adapter and boi/eoi, lm_head; embeddings are never Linear).
    """
    if quant.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = list(full_precision)
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    cdt = compute_dtype if quant.bnb_4bit_compute_dtype == "auto" else getattr(torch, quant.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.mode,
                              bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=cdt, llm_int8_skip_modules=skip)


def load_config_and_tokenizer(model_cfg: ModelSection):
    """(config, tokenizer) without loading weights: cheap checks (family, tokenizer) fail before the big load."""
    from .models import load_config
    from .tokenization import load_tokenizer

    path = check_checkpoint_dir(model_cfg.checkpoint_dir)
    if model_cfg.tokenizer_dir is not None:
        require_folder(model_cfg.tokenizer_dir, "model.tokenizer_dir")
    config = load_config(path)
    if model_cfg.family:
        from .families import family_mismatch

        problem = family_mismatch(model_cfg.family, config.cogvlm_version, config.image_tokens, f"{path}/config.json")
        if problem:
            raise ValueError(problem)
    return config, load_tokenizer(path, model_cfg.tokenizer_dir, config)


def load_weights(model_cfg: ModelSection, quant_cfg: QuantSection | None = None, device_map=None):
    """The model with its weights, in the recipe's dtype and (optional) 4/8-bit quantization."""
    from .models import load_config, model_class_for

    path = check_checkpoint_dir(model_cfg.checkpoint_dir)
    model_cls = model_class_for(load_config(path))
    dtype = resolve_dtype(model_cfg.dtype)
    kwargs = {"dtype": dtype, "local_files_only": True}
    bnb = to_bnb_config(quant_cfg, dtype, model_cls.full_precision_modules) if quant_cfg is not None else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device_map is not None:
        kwargs["device_map"] = device_map
    return model_cls.from_pretrained(str(path), **kwargs)


def load_model(model_cfg: ModelSection, quant_cfg: QuantSection | None = None, device_map=None):
    """(model, tokenizer) for a recipe's model/quant sections; the tokenizer is checked first."""
    _, tokenizer = load_config_and_tokenizer(model_cfg)
    return load_weights(model_cfg, quant_cfg, device_map), tokenizer
