"""Bare parameters trained fully beside LoRA: CogVLM's boi/eoi image delimiters.

peft's `modules_to_save` takes modules, but `model.vision.boi` / `.eoi` are bare (1, 1, H) parameters of
the vision module (their checkpoint keys are fixed, docs/architecture.md §3, §5.6). So the kit trains them directly and
stores them next to the adapter in one small safetensors file, which every loader (resume, merge,
predict, chat) applies after attaching the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FILENAME = "cogtune_extra_params.safetensors"
PRESETS: dict[str, tuple[str, ...]] = {"boi_eoi": ("model.vision.boi", "model.vision.eoi")}


def split_modules_to_save(names: list[str]) -> tuple[list[str], list[str]]:
    """(real modules_to_save entries, bare parameter names from presets such as boi_eoi)."""
    modules, params = [], []
    for n in names:
        if n in PRESETS:
            params += [p for p in PRESETS[n] if p not in params]
        else:
            modules.append(n)
    return modules, params


def _base(model: Any) -> Any:
    """The CogVLMForCausalLM under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable(model: Any, names: list[str]) -> None:
    """Mark the named base parameters trainable (after peft froze everything but the adapter)."""
    base = _base(model)
    for n in names:
        base.get_parameter(n).requires_grad_(True)


def save(model: Any, names: list[str], folder: str | Path) -> Path | None:
    """Write the named parameters to FILENAME in `folder` (None when there are none)."""
    if not names:
        return None
    from safetensors.torch import save_file

    base = _base(model)
    path = Path(folder) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILENAME}.tmp")
    save_file({n: base.get_parameter(n).detach().to("cpu").contiguous() for n in names}, str(tmp))
    tmp.replace(path)
    return path


def read(folder: str | Path) -> dict[str, Any]:
    """The saved tensors of an adapter folder ({} when it has none)."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def apply(model: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """Copy `tensors` into the base model in place; returns the previous values (to switch back)."""
    import torch

    base = _base(model)
    previous = {}
    with torch.no_grad():
        for n, t in tensors.items():
            p = base.get_parameter(n)
            previous[n] = p.detach().clone()
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return previous
