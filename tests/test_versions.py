"""Supported versions: the import guard refuses untested releases; its bounds are pyproject.toml's and CI's."""

from __future__ import annotations

import os
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
    with pytest.raises(finetune.UnsupportedVersionError) as err:
        finetune.check_versions()
    assert 'Fix: pip install "transformers>=5.0.0,<6" "peft>=0.18.0,<1"\n' in str(err.value)  # one command, both


def test_opt_in_turns_refusal_into_a_warning(monkeypatch):
    monkeypatch.setenv(finetune.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.setattr(finetune, "installed_version", _fake(transformers="6.0.0"))
    with pytest.warns(RuntimeWarning, match="transformers 6.0.0"):
        finetune.check_versions()


def _fake_transformers_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose Python reports transformers 6.0.0 installed (a sitecustomize patches importlib.metadata)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\nreal = m.version\n"
        "m.version = lambda n: '6.0.0' if n == 'transformers' else real(n)\n")
    env = {k: v for k, v in os.environ.items() if k != finetune.ALLOW_UNTESTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_import_of_finetune_refuses_a_newer_major_catchably(tmp_path):
    """Library use: `import finetune` raises an ImportError subclass that calling code can catch and carry on."""
    code = ("try:\n    import finetune\nexcept ImportError as err:\n"
            "    print('caught', type(err).__name__)\n    print(err)\nprint('still running')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=_fake_transformers_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "caught UnsupportedVersionError" in out.stdout and "still running" in out.stdout
    assert "transformers 6.0.0 is a newer major release" in out.stdout


CONSOLE_SCRIPT = "import sys; from finetune.cli import main; sys.exit(main())"  # what pip's `cogtune` script runs


@pytest.mark.parametrize("argv", [
    ["-c", CONSOLE_SCRIPT, "train", "tiny"],
    ["-c", CONSOLE_SCRIPT, "--help"],
    ["-m", "finetune.cli", "validate", "data.jsonl"],
    [str(ROOT / "train.py"), "tiny"],
    [str(ROOT / "train.py")],
    ["-m", "adapters.merge", "--help"],
    ["-m", "finetune.preview", "data.jsonl"],
    ["-c", "import finetune"],
], ids=["cogtune-train", "cogtune-help", "m-cli-validate", "train.py", "train.py-demo", "m-adapters-merge",
        "m-preview", "script"])
def test_entry_points_print_the_refusal_without_a_traceback(tmp_path, argv):
    """Every entry point: the message alone (installed, supported range, the pip command), exit status 2."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=tmp_path,
                         env=_fake_transformers_env(tmp_path), timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: cogtune is tested with"), out.stderr
    assert "transformers 6.0.0 is a newer major release" in out.stderr
    assert "supported: >=5.0.0,<6" in out.stderr
    assert 'Fix: pip install "transformers>=5.0.0,<6"' in out.stderr


def test_other_uncaught_errors_keep_their_traceback(tmp_path):
    """The hook only touches the refusal: any other uncaught error after a caught refusal still shows in full."""
    code = "try:\n    import finetune\nexcept ImportError:\n    pass\nraise KeyError('other')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=_fake_transformers_env(tmp_path))
    assert out.returncode == 1 and "Traceback" in out.stderr and "KeyError: 'other'" in out.stderr


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
