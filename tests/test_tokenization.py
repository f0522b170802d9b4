"""Tiny tokenizers (offline, deterministic, real special-token conventions) and load_tokenizer checks."""

from __future__ import annotations

import json
import time

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from finetune.tokenization import TokenizerNotFoundError, _tiny_tokenizer_json, build_tiny_tokenizer, load_tokenizer

TEXT = "Question: What color is the shape? Answer: The large red circle is at the top left.\n3 squares, 12 dots; ü?"


def test_v1_special_ids():
    tok = build_tiny_tokenizer(1)
    assert len(tok) == 512
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)


def test_v2_special_ids_at_end_of_vocab():
    tok = build_tiny_tokenizer(2)
    assert len(tok) == 512
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"]
    assert tok.convert_tokens_to_ids(names) == [508, 509, 510, 511]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (508, 509, 510)
    assert tok.unk_token is None


@pytest.mark.parametrize("version", [1, 2])
def test_encode_adds_nothing_and_decode_round_trips(version):
    tok = build_tiny_tokenizer(version)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.decode(ids) == TEXT
    # Like Vicuna / Llama-3, add_special_tokens=True prepends BOS (the kit never relies on it).
    bare = tok.encode("red", add_special_tokens=False)
    assert tok.encode("red", add_special_tokens=True) == [tok.bos_token_id] + bare
    # Common demo answers are single tokens with and without a leading space (answers are encoded alone).
    for word in ("red", "left"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1


@pytest.mark.parametrize("version", [1, 2])
def test_deterministic_and_fast(version):
    _tiny_tokenizer_json.cache_clear()
    t0 = time.perf_counter()
    a = build_tiny_tokenizer(version)
    assert time.perf_counter() - t0 < 1.0
    _tiny_tokenizer_json.cache_clear()
    b = build_tiny_tokenizer(version)
    assert a.get_vocab() == b.get_vocab()
    assert a.encode(TEXT, add_special_tokens=False) == b.encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize("version", [1, 2])
def test_save_and_reload_offline(version, tmp_path):
    tok = build_tiny_tokenizer(version)
    tok.save_pretrained(tmp_path)
    ids = tok.encode(TEXT, add_special_tokens=False)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path, local_files_only=True),
                   PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True),
                   load_tokenizer(tmp_path)):
        assert loaded.encode(TEXT, add_special_tokens=False) == ids
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


def test_missing_tokenizer_names_vicuna_and_setting(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32000, "pad_token_id": 0}))
    with pytest.raises(TokenizerNotFoundError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert "Vicuna-7B v1.5" in msg and "lmsys/vicuna-7b-v1.5" in msg and "model.tokenizer_dir" in msg


def test_tokenizer_dir_is_used(tmp_path):
    ckpt, tok_dir = tmp_path / "ckpt", tmp_path / "vicuna"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2,
                                                  "pad_token_id": 0, "cogvlm_version": 1}))
    build_tiny_tokenizer(1).save_pretrained(tok_dir)
    tok = load_tokenizer(ckpt, tokenizer_dir=tok_dir)
    assert tok.bos_token_id == 1 and tok.pad_token_id == 0


def test_pad_set_from_config(tmp_path):
    # The official CogVLM2 tokenizer declares no pad; the model pads (and fills image spans) with 128002.
    tok = build_tiny_tokenizer(2)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    cfg = {"bos_token_id": 508, "eos_token_id": [509, 511], "pad_token_id": 510}
    loaded = load_tokenizer(tmp_path, config=cfg)
    assert loaded.pad_token_id == 510 and loaded.pad_token == "<|reserved_special_token_0|>"


def test_special_id_mismatch_names_each_difference(tmp_path):
    build_tiny_tokenizer(2).save_pretrained(tmp_path)
    cfg = {"bos_token_id": 128000, "eos_token_id": [509, 511], "pad_token_id": 128002}
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path, config=cfg)
    msg = str(e.value)
    assert "bos" in msg and "128000" in msg and "pad" in msg and "128002" in msg
    assert "eos:" not in msg  # eos 509 is one of the config's eos ids
