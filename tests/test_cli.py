"""The command line as a user meets it: verbs, help without torch, and the documented training command."""

import os
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


def _env() -> dict[str, str]:
    """The environment a user has after activating the venv: this checkout importable, from any folder."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("launcher", ["accelerate", "python", "cogtune"])
def test_documented_training_command_runs(tmp_path, launcher):
    """The README's training commands on a tiny checkpoint, end to end: `accelerate launch train.py RECIPE` in
    the clone, and from the user's own folder `accelerate launch -m finetune.cli train NAME` / `cogtune train NAME`."""
    from adapters.demo import write_task
    from finetune.tiny import make_tiny

    base = make_tiny(2, tmp_path / "base")
    train_path, _ = write_task(tmp_path / "data", n_train=16, n_eval=2, seed=0)
    overrides = [f"model.checkpoint_dir={base}", f"data.train_path={train_path}", "data.eval_path=null",
                 f"output.dir={tmp_path / 'run'}", "train.max_steps=2", "train.report_to=[none]"]
    cwd = tmp_path
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "-m", "finetune.cli", "train", "tiny-demo", *overrides]
    elif launcher == "python":
        cmd, cwd = [sys.executable, "train.py", "recipes/tiny-demo.yaml", *overrides], ROOT
    else:
        cmd = [sys.executable, "-m", "finetune.cli", "train", "tiny-demo", *overrides]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    if launcher == "cogtune":  # in this process: no launcher warnings
        assert "accelerate launch" not in res.stderr


def test_train_help_names_the_verb(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["train", "--help"])
    assert ex.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cogtune train") and "train.py" not in out
    assert "cogvlm2-qlora-24gb" in out  # the shipped recipes are listed


def test_recipes_by_name_from_any_folder_and_a_wrong_name_lists_them(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "finetune.cli", "config", "cogvlm2-qlora-24gb", "lr=1e-4"],
                        cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert ok.returncode == 0, ok.stderr
    assert "learning_rate: 0.0001" in ok.stdout and "mode: nf4" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "finetune.cli", "train", "cogvlm2-qlora-42gb"], cwd=tmp_path,
                         capture_output=True, text=True, env=_env())
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Did you mean 'cogvlm2-qlora-24gb'?" in bad.stderr
    assert all(name in bad.stderr for name in ("cogvlm2-lora", "cogvlm-chat-lora", "tiny-demo"))


def test_train_failure_is_the_kits_one_clean_error(tmp_path):
    """`cogtune train` runs in this process: a user mistake ends with the kit's message, no launcher traceback."""
    from finetune.tiny import make_tiny

    base = make_tiny(2, tmp_path / "base")
    res = subprocess.run([sys.executable, "-m", "finetune.cli", "train", "tiny-demo", f"model.checkpoint_dir={base}",
                          "data.train_path=nowhere/train.jsonl", "data.eval_path=null", "output.dir=out/run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode != 0
    assert "nowhere/train.jsonl" in res.stderr
    assert "Traceback" not in res.stderr and "CalledProcessError" not in res.stderr


def test_train_refuses_an_output_dir_it_cannot_write_before_any_work(tmp_path, capsys):
    from finetune.recipe import main as train_main

    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    with pytest.raises(SystemExit) as ex:
        train_main(["tiny-demo", "model.checkpoint_dir=nowhere", f"output.dir={taken}"])
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "override 'output.dir=" in err and f"'output.dir' '{taken}' is a file, not a folder" in err
    assert taken.read_text() == "mine"


def test_family_mismatch_says_what_was_detected_and_how_to_fix_it():
    from finetune.families import FAMILIES, family_mismatch

    cog2 = FAMILIES["cogvlm2-llama3-chat-19b"]
    assert family_mismatch("cogvlm2-llama3-chat-19b", 2, cog2.image_tokens, "m/config.json") is None
    msg = family_mismatch("cogvlm-chat", 2, cog2.image_tokens, "m/config.json")
    assert "it looks like 'cogvlm2-llama3-chat-19b' or 'cogvlm2-llama3-chinese-chat-19b'" in msg
    assert "set model.family=cogvlm2-llama3-chat-19b (or model.family=null" in msg
    tiny = family_mismatch("cogvlm2-llama3-chat-19b", 2, 6, "tiny/config.json")
    assert "matches no known family" in tiny and "set model.family=null" in tiny


def test_shipped_recipe_on_a_tiny_base_explains_both_fixes(tmp_path, capsys, monkeypatch):
    """`check` with a shipped recipe on a `make-tiny` base: the family check, then a loss that does not drop."""
    from adapters.demo import write_task
    from finetune import check
    from finetune.tiny import make_tiny

    base = make_tiny(2, tmp_path / "base")
    train_path, _ = write_task(tmp_path / "data", n_train=8, n_eval=1, seed=0)
    args = ["cogvlm2-lora", f"model.checkpoint_dir={base}", f"data.train_path={train_path}", "data.num_workers=0"]
    assert check.main(args) == 1
    err = capsys.readouterr().err
    assert "model.family 'cogvlm2-llama3-chat-19b'" in err and "set model.family=null" in err
    monkeypatch.setattr(check, "overfit_check", lambda cfg, **kw: (6.24, 6.15))  # what a random base does
    assert check.main([*args, "model.family=null"]) == 1
    err = capsys.readouterr().err
    assert "lora.modules_to_save=[lm_head]" in err and "learning_rate" in err
