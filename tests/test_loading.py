"""Checkpoint loading is local-only and fails in one line; the base fingerprint; make-tiny's file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from finetune.loading import (
    CheckpointError,
    base_fingerprint,
    build_meta_model,
    check_checkpoint_dir,
    load_config_and_tokenizer,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-demo.yaml"


@pytest.fixture()
def no_hub(monkeypatch):
    """Any attempt to resolve a name on the Hub fails the test."""
    import transformers.utils.hub as hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was consulted: {args[:2]}")

    monkeypatch.setattr(hub, "cached_files", refuse)
    monkeypatch.setattr(hub, "cached_file", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("given", ["no/such_folder", "THUDM/cogvlm2-llama3-chat-19B", "{tmp}/absent"])
def test_missing_checkpoint_folder_is_local_and_clean(given, tmp_path, no_hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = given.format(tmp=tmp_path)
    for call in (check_checkpoint_dir, build_meta_model):
        with pytest.raises(FileNotFoundError, match=f"folder does not exist: {given}"):
            call(given)
    if not os.path.isabs(given):
        with pytest.raises(FileNotFoundError, match="relative to the current folder"):
            build_meta_model(given)
    if given.startswith("THUDM/"):
        with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
            build_meta_model(given)


def test_missing_tokenizer_dir_is_clean(tiny_checkpoints, tmp_path, no_hub):
    from finetune.config import load_recipe

    cfg = load_recipe(RECIPE, [f"model.checkpoint_dir={tiny_checkpoints[2]}", "model.family=null",
                               f"model.tokenizer_dir={tmp_path / 'tok'}"])
    with pytest.raises(FileNotFoundError, match=r"folder does not exist: .*tok .*model.tokenizer_dir"):
        load_config_and_tokenizer(cfg.model)


def test_targets_with_a_mistyped_folder_prints_one_line(tmp_path, capsys, no_hub, monkeypatch):
    """issue 9.3: `cogtune targets` gave a 39-line traceback (Repo id must be in the form ...)."""
    from finetune.targets import main

    monkeypatch.chdir(tmp_path)
    assert main([str(RECIPE), "model.checkpoint_dir=checkpints/tiny"]) == 2
    err = capsys.readouterr().err
    assert "folder does not exist: checkpints/tiny" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_gpt2_config_is_refused_in_one_line(tiny_checkpoints, tmp_path, capsys):
    folder = _copy(tiny_checkpoints[2], tmp_path / "gpt2")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "n_embd": 64, "n_layer": 2, "vocab_size": 100}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*GPT2LMHeadModel.*not a CogVLM"):
        check_checkpoint_dir(folder)
    from adapters.chat import main as chat_main
    from finetune.targets import main as targets_main

    assert targets_main([str(RECIPE), f"model.checkpoint_dir={folder}"]) == 2
    assert chat_main(["--model", str(folder), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("model_type 'gpt2'") == 2 and "Traceback" not in err
    (folder / "config.json").write_text('{"vision_config": {},\n "oops" 1}\n')
    with pytest.raises(CheckpointError, match=r"config.json:2: not valid JSON"):
        check_checkpoint_dir(folder)


def test_damaged_shards_are_refused_in_one_line(tiny_checkpoints, tmp_path, capsys):
    from adapters.merge import main as merge_main
    from adapters.predict import main as predict_main

    folder = _copy(tiny_checkpoints[2], tmp_path / "ckpt")
    shards = sorted(folder.glob("model-*.safetensors"))
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])  # truncated (a killed copy)
    shards[1].write_bytes(b"\x00garbage" * 10)  # not a safetensors file at all
    shards[2].unlink()  # named in the index, absent
    with pytest.raises(CheckpointError) as err:
        check_checkpoint_dir(folder)
    text = str(err.value)
    assert "\n" not in text
    assert f"{shards[0].name}: damaged safetensors file" in text and "truncated" in text
    assert f"{shards[1].name}: damaged" in text and f"{shards[2].name} is named in" in text
    data_file = Path(__file__).parent / "assets" / "data" / "tiny.jsonl"
    assert predict_main([str(data_file), "--model", str(folder), "--out", str(tmp_path / "p.jsonl")]) == 1
    assert merge_main([str(tmp_path), "--base", str(folder), "--out", str(tmp_path / "m")]) == 1
    err_text = capsys.readouterr().err
    assert "Traceback" not in err_text and "damaged safetensors file" in err_text


def test_fingerprint_tells_weights_apart_but_not_copies_or_sharding(tiny_checkpoints, tmp_path):
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import make_tiny

    base = tiny_checkpoints[2]
    fp = base_fingerprint(base)
    assert fp.startswith("sfp1-") and fp == base_fingerprint(_copy(base, tmp_path / "copy"))
    resharded = tmp_path / "one-file"
    CogVLMForCausalLM.from_pretrained(str(base)).save_pretrained(str(resharded), max_shard_size="100MB")
    assert len(list(resharded.glob("*.safetensors"))) == 1
    assert base_fingerprint(resharded) == fp
    seed7 = make_tiny(2, tmp_path / "seed7", seed=7)
    assert (seed7 / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert base_fingerprint(seed7) != fp
    # one changed value at the start of a tensor's data changes it too (a base edited in place)
    edited = _copy(base, tmp_path / "edited")
    from finetune.loading import _safetensors_header

    shard = sorted(edited.glob("model-*.safetensors"))[0]
    header, start = _safetensors_header(shard)
    name = sorted(k for k in header if k != "__metadata__")[0]
    raw = bytearray(shard.read_bytes())
    raw[start + header[name]["data_offsets"][0]] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert base_fingerprint(edited) != fp


@pytest.mark.parametrize("umask,want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_make_tiny_files_follow_umask(tmp_path, umask, want):
    """issue 9.8: shards were -rw------- whatever the umask (safetensors writes owner-only)."""
    from finetune.tiny import main

    old = os.umask(umask)
    try:
        assert main(["--family", "cogvlm", "--out", str(tmp_path / "t")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "t").iterdir()}
    assert any(n.endswith(".safetensors") for n in modes)
    assert all(m == want for m in modes.values()), modes

