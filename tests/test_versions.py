"""Supported versions: the import guard refuses untested releases; its bounds are pyproject.toml's and CI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import finetune

ROOT = Path(__file__).resolve().parent.parent


def _fake(**found):
    real = finetune.installed_version
    return lambda name: found[name] if name in found else real(name)


def test_installed_releases_are_accepted():
    assert finetune.version_problems() == []
    finetune.check_versions()


@pytest.mark.parametrize("name,newer", [("transformers", "6.0.0"), ("peft", "1.0.0"), ("accelerate", "2.0.0"),
                                        ("trl", "2.0.0rc1")])
def test_newer_major_is_refused_naming_the_tested_versions(monkeypatch, name, newer):
    monkeypatch.delenv(finetune.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(finetune, "installed_version", _fake(**{name: newer}))
    with pytest.raises(finetune.UnsupportedVersionError) as err:
        finetune.check_versions()
    low, high, tested = finetune.TESTED_VERSIONS[name]
    text = str(err.value)
    assert f"{name} {newer} is a newer major release" in text
    assert f"tested: {tested}" in text and f"{name}>={low},<{high}" in text
    assert finetune.ALLOW_UNTESTED_ENV in text  # the way out is named


def test_all_problems_at_once_and_too_old(monkeypatch):
    monkeypatch.delenv(finetune.ALLOW_UNTESTED_ENV, raising=False)
    monkeypatch.setattr(finetune, "installed_version", _fake(transformers="6.1.0", peft="0.17.1"))
    with pytest.raises(finetune.UnsupportedVersionError, match=r"(?s)transformers 6\.1\.0.*peft 0\.17\.1 is older"):
        finetune.check_versions()


def test_opt_in_turns_refusal_into_a_warning(monkeypatch):
    monkeypatch.setenv(finetune.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.setattr(finetune, "installed_version", _fake(transformers="6.0.0"))
    with pytest.warns(RuntimeWarning, match="transformers 6.0.0"):
        finetune.check_versions()


def test_import_of_finetune_refuses_a_newer_major():
    """The guard runs at `import finetune` (every entry point: CLI, train.py, library use)."""
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda n: '6.0.0' if n == 'transformers' else real(n); import finetune")
    env = {k: v for k, v in __import__("os").environ.items() if k != finetune.ALLOW_UNTESTED_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode != 0
    assert "UnsupportedVersionError" in out.stderr and "transformers 6.0.0 is a newer major release" in out.stderr


def test_bounds_match_pyproject_and_ci_pins():
    text = (ROOT / "pyproject.toml").read_text()
    pins = subprocess.run([sys.executable, str(ROOT / ".ci" / "lowest_pins.py")], capture_output=True, text=True,
                          check=True).stdout.split()
    for name, (low, high, tested) in finetune.TESTED_VERSIONS.items():
        spec = re.search(rf'"{name}>=([0-9.]+),<([0-9.]+)"', text)
        assert spec, f"pyproject.toml has no {name}>=X,<Y"
        assert finetune._release(spec.group(1)) == finetune._release(low), name
        assert spec.group(2) == high, name
        assert f"{name}=={spec.group(1)}" in pins
        assert tested.startswith(low)  # the oldest allowed is the oldest tested
