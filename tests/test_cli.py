"""The command line as a user meets it: verbs, help without torch, and the documented training command."""

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)


def test_unknown_verb_suggests_the_nearest(capsys):
    assert main(["mrege"]) == 2
    assert "Did you mean 'merge'?" in capsys.readouterr().err


def test_config_verb_does_not_import_torch():
    code = ("import sys; from finetune.cli import main; main(['config', 'recipes/tiny-demo.yaml']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")


def test_bad_recipe_is_a_clean_error_not_a_traceback(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  checkpoint_dir: x\ndata:\n  train_path: y\nlora:\n  rnak: 4\n")
    res = subprocess.run([sys.executable, "train.py", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert "did you mean 'lora.r'?" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("launcher", ["accelerate", "python"])
def test_documented_training_command_runs(tmp_path, launcher):
    """`accelerate launch train.py RECIPE k=v ...` (README) on a tiny checkpoint, end to end."""
    from finetune.demo import write_task
    from finetune.tiny import make_tiny

    base = make_tiny(2, tmp_path / "base")
    train_path, _ = write_task(tmp_path / "data", n_train=16, n_eval=2, seed=0)
    args = ["train.py", "recipes/tiny-demo.yaml", f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
            "data.eval_path=null", f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.report_to=[none]"]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", *args]
    else:
        cmd = [sys.executable, *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
