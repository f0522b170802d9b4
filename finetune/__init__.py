"""cogtune: LoRA/QLoRA fine-tuning for CogVLM-family vision-language models.

`CogVLMConfig` and `CogVLMForCausalLM` are imported lazily so that `import finetune` (and the CLI's
`--help`) does not pull in torch/transformers.

Importing the package checks the installed transformers, peft, accelerate and trl against the releases the
kit is tested with (`TESTED_VERSIONS`, the same bounds as pyproject.toml): a newer major release, whose API
the kit has never run on, is refused with a message instead of silently producing different results.
Library code can catch the refusal as `ImportError` (it is an `UnsupportedVersionError`); when nobody catches it
(the `cogtune` CLI, train.py, `python -m adapters.*`, any script), the process prints the message alone, with
no traceback, and exits with status 2: a user's environment problem, not a crash.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

__all__ = ["CogVLMConfig", "CogVLMForCausalLM", "TESTED_VERSIONS", "check_versions"]

# name -> (lowest supported, first unsupported, versions CI tests: the oldest and the newest at release time).
# The bounds equal pyproject.toml's (tests/test_versions.py checks it); CI installs the lowest with
# `make test-oldest`.
TESTED_VERSIONS: dict[str, tuple[str, str, str]] = {
    "transformers": ("5.0.0", "6", "5.0.0 and 5.24.0"),
    "peft": ("0.18.0", "1", "0.18.0 and 0.21.2"),
    "accelerate": ("1.5.0", "2", "1.5.0 and 1.15.0"),
    "trl": ("1.0.0", "2", "1.0.0 and 1.16.0"),
}
ALLOW_UNTESTED_ENV = "COGTUNE_ALLOW_UNTESTED"


class UnsupportedVersionError(ImportError):
    """An installed dependency is outside the range the kit is tested with."""


def installed_version(name: str) -> str | None:
    """The installed distribution's version, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _release(text: str) -> tuple[int, ...]:
    """Leading numeric release, trailing zeros dropped: '5.24.0' -> (5, 24), '6.0.0rc1' -> (6,), '5.0' == '5.0.0'."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    parts = [int(p) for p in m.group(1).split(".")] if m else []
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def version_problems(version_of: Any = None) -> list[str]:
    """One line per installed dependency outside its tested range (missing ones are pip's business)."""
    version_of = version_of or installed_version
    problems = []
    for name, (low, high, tested) in _out_of_range(version_of):
        found = version_of(name)
        if _release(found) >= _release(high):
            problems.append(f"{name} {found} is a newer major release than the kit supports (supported: "
                            f">={low},<{high}; tested: {tested})")
        else:
            problems.append(f"{name} {found} is older than the oldest supported release {low} (supported: "
                            f">={low},<{high}; tested: {tested})")
    return problems


def _out_of_range(version_of: Any) -> list[tuple[str, tuple[str, str, str]]]:
    """The TESTED_VERSIONS entries whose installed release lies outside [low, high)."""
    bad = []
    for name, bounds in TESTED_VERSIONS.items():
        found = version_of(name)
        if found is not None and not _release(bounds[0]) <= _release(found) < _release(bounds[1]):
            bad.append((name, bounds))
    return bad


def check_versions(version_of: Any = None) -> None:
    """Refuse untested dependency releases (see the module docstring); `COGTUNE_ALLOW_UNTESTED=1` only warns."""
    version_of = version_of or installed_version
    problems = version_problems(version_of)
    if not problems:
        return
    pins = " ".join(f'"{name}>={low},<{high}"' for name, (low, high, _) in _out_of_range(version_of))
    message = ("cogtune is tested with transformers, peft, accelerate and trl in the ranges below, and refuses "
               "others rather than run on an API it has never seen:\n  " + "\n  ".join(problems)
               + f"\nFix: pip install {pins}"
               + f"\nOr set {ALLOW_UNTESTED_ENV}=1 to run anyway (at your own risk).")
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise UnsupportedVersionError(message)


def _exit_cleanly_when_uncaught() -> None:
    """Print an uncaught UnsupportedVersionError as its message alone and exit 2 (see the module docstring).

    The refusal happens while `finetune` is imported, before any entry point's own code could catch it, so the
    only place to turn it into a plain message is the interpreter's hook for uncaught exceptions. Other
    exceptions, and a refusal that library code catches, are left exactly as they were.
    """
    previous = sys.excepthook
    if getattr(previous, "cogtune_version_hook", False):
        return

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if isinstance(value, UnsupportedVersionError):
            sys.stderr.write(f"error: {value}\n")
            sys.stderr.flush()
            sys.exit(2)  # SystemExit raised inside sys.excepthook sets the process's exit status
        previous(kind, value, tb)

    hook.cogtune_version_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook


try:
    check_versions()
except UnsupportedVersionError:
    _exit_cleanly_when_uncaught()
    raise

# On CPU, bitsandbytes tries to fetch an optional kernel from the Hub and logs a warning when it cannot
# (always, here: no network). Its pure-torch fallback is what runs and what the tests check.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 still reads `model.is_gradient_checkpointing`, which transformers 5.x renamed and now warns about
# on every PeftModel construction; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def __getattr__(name: str) -> Any:
    if name == "CogVLMConfig":
        from .models.cogvlm.configuration import CogVLMConfig

        return CogVLMConfig
    if name == "CogVLMForCausalLM":
        from .models.cogvlm.modeling import CogVLMForCausalLM

        return CogVLMForCausalLM
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
