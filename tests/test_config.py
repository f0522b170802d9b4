"""Recipes: strict keys with nearest-name errors, typed values, overrides, every shipped recipe loads."""

from pathlib import Path

import pytest

from finetune.config import ConfigError, RunConfig, load_recipe, to_yaml

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").rglob("*.yaml"))


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
