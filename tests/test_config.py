"""Recipes: strict keys with nearest-name errors, typed values, overrides, every shipped recipe loads."""

from pathlib import Path

import pytest

from finetune.config import ConfigError, RunConfig, load_recipe, to_yaml

# recipes/accelerate/ holds launch configs (accelerate's format, tests/test_distributed.py), not recipes
RECIPES = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml")
                 if "accelerate" not in p.parent.name)


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = "model:\n  checkpoint_dir: ck\ndata:\n  train_path: t.jsonl\n"


def test_unknown_keys_name_dotted_path_and_nearest_key(tmp_path):
    p = _write(tmp_path, BASE + "lora:\n  rnak: 4\ntrain:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    lines = err.value.problems
    assert len(lines) == 2  # both reported at once
    assert "unknown key 'lora.rnak'; did you mean 'lora.r'?" in lines[0]
    assert "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?" in lines[1]
    assert str(p) in lines[0]


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'qaunt'; did you mean 'quant'"):
        load_recipe(_write(tmp_path, BASE + "qaunt:\n  mode: nf4\n"))


def test_types_and_literals_are_checked(tmp_path):
    p = _write(tmp_path, BASE + "lora:\n  r: sixteen\nquant:\n  mode: nf5\ntrain:\n  max_steps: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    text = str(err.value)
    assert "'lora.r' is 'sixteen'; expected int" in text
    assert "'quant.mode' is 'nf5'; expected 'none' | 'nf4' | 'fp4' | 'int8'" in text
    assert "'train.max_steps' is 1.5; expected int" in text


def test_overrides_use_dotted_names_and_the_same_checks(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_recipe(p, ["lora.r=32", "train.learning_rate=1e-4", "lora.targets=[vision_expert]"])
    assert cfg.lora.r == 32 and cfg.train.learning_rate == 1e-4 and cfg.lora.targets == ["vision_expert"]
    with pytest.raises(ConfigError, match="did you mean 'lora.lora_alpha'"):
        load_recipe(p, ["lora.lora_alhpa=8"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe(p, ["lora.r"])


def test_int_accepted_for_float_and_bool_not_for_int(tmp_path):
    cfg = load_recipe(_write(tmp_path, BASE + "train:\n  learning_rate: 1\n"))
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    with pytest.raises(ConfigError):
        load_recipe(_write(tmp_path, BASE + "lora:\n  r: true\n"))


def test_defaults_live_on_the_dataclass():
    cfg = RunConfig()
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.last_turn_only is False  # loss on every assistant turn by default


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads_and_round_trips(recipe, tmp_path):
    cfg = load_recipe(recipe)
    again = _write(tmp_path, to_yaml(cfg))
    assert load_recipe(again) == cfg


def test_config_verb_prints_docs(capsys):
    from finetune.config import main

    assert main([str(RECIPES[0])]) == 0
    out = capsys.readouterr().out
    assert "lora:" in out and "# LoRA rank" in out


# ---- hostile YAML, value ranges, overrides as overrides, shipped recipes by name (issues 9 and 14) ----

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + BOMB


def test_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    import resource

    p = _write(tmp_path, BOMB)
    assert p.stat().st_size < 500  # 9**8 = 43M strings once expanded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50
    (line,) = err.value.problems
    assert line.startswith(f"{p}:2:") and "alias '*a' is not allowed" in line and len(line) < 300


def test_any_alias_is_refused_and_overrides_cannot_smuggle_one(tmp_path):
    p = _write(tmp_path, BASE + "lora:\n  r: &rank 8\n  lora_alpha: *rank\n")
    with pytest.raises(ConfigError, match=r"r.yaml:7: .*alias '\*rank'"):
        load_recipe(p)
    cfg = load_recipe(_write(tmp_path, BASE), ["output.dir=*x"])  # a plain string, not an alias
    assert cfg.output.dir == "*x"


def test_huge_values_are_cut_short_in_messages(tmp_path):
    many = ", ".join(["[1]"] * 5000)
    p = _write(tmp_path, BASE + "lora:\n  r: '" + "9" * 200_000 + "'\n  targets: [" + many + "]\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    assert len(err.value.problems) == 2
    assert all(len(line) < 300 for line in err.value.problems)
    assert "'lora.r' is '9999" in err.value.problems[0] and "..." in err.value.problems[0]


def test_deeply_nested_yaml_is_an_error_not_a_recursion_traceback(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_recipe(_write(tmp_path, BASE + "lora:\n  targets: " + deep + "\n"))
    with pytest.raises(ConfigError) as err:
        load_recipe(_write(tmp_path, BASE), ["lora.targets=" + deep])
    (line,) = err.value.problems
    assert "'lora.targets' is '[[[[" in line and len(line) < 300


def test_files_that_are_not_recipes_are_refused_cheaply(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="is not a recipe"):
        load_recipe(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model:\n  checkpoint_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(binary)


NONSENSE = {
    "lora.lora_alpha=0": "'lora.lora_alpha' is 0; must be > 0",
    "lora.lora_dropout=-0.5": "'lora.lora_dropout' is -0.5; must be in [0, 1)",
    "lora.lora_dropout=1": "'lora.lora_dropout' is 1.0; must be in [0, 1)",
    "lora.loraplus_lr_ratio=0": "'lora.loraplus_lr_ratio' is 0.0; must be > 0",
    "train.max_grad_norm=-1": "'train.max_grad_norm' is -1.0; must be >= 0",
    "train.save_total_limit=0": "'train.save_total_limit' is 0; must be >= 1",
    "train.num_train_epochs=0": "'train.num_train_epochs' is 0.0; must be > 0",
    "train.gradient_accumulation_steps=0": "'train.gradient_accumulation_steps' is 0; must be >= 1",
    "train.per_device_train_batch_size=0": "'train.per_device_train_batch_size' is 0; must be >= 1",
    "train.learning_rate=0": "'train.learning_rate' is 0.0; must be a finite number > 0",
    "train.learning_rate=-1e-4": "'train.learning_rate' is -0.0001; must be a finite number > 0",
    "train.learning_rate=.nan": "'train.learning_rate' is nan; must be a finite number > 0",
    "train.max_steps=0": "'train.max_steps' is 0; must be > 0, or -1",
    "train.warmup_steps=-1": "'train.warmup_steps' is -1.0; must be a fraction",
    "train.warmup_steps=2.5": "'train.warmup_steps' is 2.5; must be a fraction",
    "train.weight_decay=-0.1": "'train.weight_decay' is -0.1; must be >= 0",
    "train.logging_steps=0": "'train.logging_steps' is 0; must be >= 1",
    "train.save_steps=0": "'train.save_steps' is 0; must be >= 1",
    "train.seed=-1": "'train.seed' is -1; must be in [0, 2**32)",
    "train.report_to=[]": "'train.report_to' is empty; use [none]",
    "data.num_workers=-1": "'data.num_workers' is -1; must be >= 0",
    "data.max_length=0": "'data.max_length' is 0; too small",
    "eval.eval_steps=-5": "'eval.eval_steps' is -5; must be >= 0",
    "eval.generation_rows=-1": "'eval.generation_rows' is -1; must be >= 0",
    "eval.max_new_tokens=0": "'eval.max_new_tokens' is 0; must be >= 1",
    "eval.log_predictions=-1": "'eval.log_predictions' is -1; must be >= 0",
    "output.dir=''": "'output.dir' is empty",
    "model.family=cogvlm3": "'model.family' is 'cogvlm3'; not a known family",
}


def test_every_nonsense_setting_gets_one_line_naming_the_override_all_at_once(tmp_path):
    p = _write(tmp_path, BASE)
    firsts = list({item.split("=")[0]: item for item in reversed(NONSENSE)}.values())  # one per key
    for batch in [firsts] + [[item] for item in NONSENSE if item not in firsts]:
        with pytest.raises(ConfigError) as err:
            load_recipe(p, batch)
        lines = err.value.problems
        assert len(lines) == len(batch), "\n".join(lines)
        for item in batch:
            hits = [line for line in lines if line.startswith(f"override '{item}': ") and NONSENSE[item] in line]
            assert len(hits) == 1, (item, lines)
            assert "\n" not in hits[0]


def test_range_errors_in_the_file_name_file_and_line(tmp_path):
    p = _write(tmp_path, BASE + "lora:\n  lora_alpha: 0\ntrain:\n  num_train_epochs: 0\n  max_steps: 5\n"
               "  gradient_accumulation_steps: 0\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(p)
    assert err.value.problems == [
        f"{p}:6: 'lora.lora_alpha' is 0; must be > 0 (the LoRA update is scaled by lora_alpha / r); "
        "usually 2 x lora.r",
        f"{p}:10: 'train.gradient_accumulation_steps' is 0; must be >= 1 (1 = no accumulation)",
    ]  # 0 epochs is fine here: max_steps > 0 decides


def test_output_dir_that_is_a_file_or_read_only_is_refused_before_training(tmp_path):
    import os

    p = _write(tmp_path, BASE)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match=r"'output.dir' '.*notes.txt' is a file, not a folder; choose another"):
        load_recipe(p, [f"output.dir={afile}"], check_output=True)
    with pytest.raises(ConfigError, match=r"cannot be created: '.*notes.txt' is a file"):
        load_recipe(p, [f"output.dir={afile}/run"], check_output=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through permission bits; /sys is a read-only mount
        ro = Path("/sys")
    with pytest.raises(ConfigError, match="is not writable"):
        load_recipe(p, [f"output.dir={ro}/run"], check_output=True)
    assert load_recipe(p, [f"output.dir={afile}"]).output.dir == str(afile)  # `cogtune config` does not care
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt", "r.yaml", "ro"]


def test_common_names_are_aliases_in_overrides(tmp_path):
    p = _write(tmp_path, BASE)
    cfg = load_recipe(p, ["train.lr=1e-4", "epochs=3", "batch_size=2", "grad_accum=4"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.num_train_epochs == 3.0
    assert cfg.train.per_device_train_batch_size == 2 and cfg.train.gradient_accumulation_steps == 4
    assert load_recipe(p, ["lr=3e-4"]).train.learning_rate == 3e-4


def test_override_mistakes_are_reported_as_overrides_and_file_aliases_suggest_the_real_key(tmp_path):
    p = _write(tmp_path, BASE + "train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(p, ["lora.rnak=4", "train.max_steps=ten", "trian.seed=1", "lora_alpha=8"])
    assert sorted(err.value.problems) == sorted([
        f"{p}:6: unknown key 'train.lr'; did you mean 'train.learning_rate'?",
        "override 'lora.rnak=4': unknown key 'lora.rnak'; did you mean 'lora.r'?",
        "override 'train.max_steps=ten': 'train.max_steps' is 'ten'; expected int",
        "override 'trian.seed=1': unknown key 'trian'; did you mean 'train'?",
        "override 'lora_alpha=8': unknown key 'lora_alpha'; did you mean 'lora.lora_alpha'?",
    ])


def test_shipped_recipes_load_by_name_from_any_folder(tmp_path, monkeypatch):
    from finetune.config import shipped_recipes

    monkeypatch.chdir(tmp_path)
    names = shipped_recipes()
    assert {"cogvlm2-qlora-24gb", "tiny-demo"} <= set(names)
    by_name = load_recipe("cogvlm2-qlora-24gb")
    assert by_name == load_recipe(RECIPES[[r.stem for r in RECIPES].index("cogvlm2-qlora-24gb")])
    assert load_recipe("recipes/tiny-demo.yaml") == load_recipe("tiny-demo.yaml")  # the README's spelling
    with pytest.raises(ConfigError) as err:
        load_recipe("cogvlm2-qlora")
    (line,) = err.value.problems
    assert "recipe file not found" in line and "Did you mean 'cogvlm2-lora'?" in line
    assert all(name in line for name in names)


def test_real_model_recipes_have_an_eval_path_slot():
    for recipe in RECIPES:
        cfg = load_recipe(recipe)
        text = recipe.read_text()
        assert "eval_path:" in text, f"{recipe.name}: add a data.eval_path slot so runs report eval predictions"
        if cfg.model.family:
            assert "data.eval_path=" in text, f"{recipe.name}: the Run: line should show data.eval_path=..."


def test_dpo_refuses_the_feature_cache_instead_of_ignoring_it():
    """DPO runs the vision tower live: a feature_cache key would be silently ignored, so it is an error."""
    with pytest.raises(ConfigError) as err:
        load_recipe("cogvlm2-dpo", ["data.feature_cache=/tmp/cache"])
    (line,) = [p for p in err.value.problems if "feature_cache" in p]
    assert "train.method=dpo" in line and "remove data.feature_cache" in line
    assert load_recipe("cogvlm2-lora", ["data.feature_cache=/tmp/cache"]).data.feature_cache == "/tmp/cache"
