"""JSONL -> `datasets` encoding (cached, streaming), lazy image decoding, and DataLoader + collator end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from data_formats.schema import read_jsonl
from finetune.dataset import CogVLMDataset, CogVLMIterableDataset, build_torch_dataset, encode_jsonl
from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
from finetune.tiny import tiny_config
from finetune.tokenization import build_tiny_tokenizer


@pytest.fixture()
def jsonl(tmp_path):
    Image.new("RGB", (10, 10), (0, 255, 0)).save(tmp_path / "g.png")
    rows = [
        {"id": "a", "images": ["g.png"], "messages": [{"role": "user", "content": "<image>What color?"},
                                                      {"role": "assistant", "content": "green"}]},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Count?"},
                                 {"role": "assistant", "content": "two"}]},
        {"id": "long", "images": ["g.png"], "messages": [{"role": "user", "content": "<image>" + "red " * 80},
                                                         {"role": "assistant", "content": "no"}]},
        {"id": "bad", "messages": [{"role": "user", "content": "no answer"}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def processor(cfg, tok, **settings):
    return CogVLMProcessor.from_config(cfg, tok, **{"template_version": "chat", "max_length": 64, **settings})


def test_encode_jsonl_matches_encode_conversation_and_counts_drops(jsonl, tmp_path):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    ds, stats = encode_jsonl(jsonl, processor(cfg, tok), cache_dir=tmp_path / "cache")
    assert (stats.rows, stats.kept, stats.too_long, stats.invalid) == (4, 2, 1, 1)
    assert "train.jsonl:3: too long" in stats.examples[0] and "train.jsonl:4: invalid" in stats.examples[1]
    convs, _ = read_jsonl(jsonl)
    for row, conv in zip(ds, convs[:2], strict=True):
        ex = processor(cfg, tok).encode(conv)
        assert row["input_ids"] == ex.input_ids and row["labels"] == ex.labels
        assert row["token_type_ids"] == ex.token_type_ids and row["images"] == ex.images
    assert ds[0]["images"] == [str(tmp_path / "g.png")]


def test_cache_fingerprint_follows_settings(jsonl, tmp_path):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    a, _ = encode_jsonl(jsonl, processor(cfg, tok), cache_dir=tmp_path / "cache")
    b, _ = encode_jsonl(jsonl, processor(cfg, tok), cache_dir=tmp_path / "cache")
    c, _ = encode_jsonl(jsonl, processor(cfg, tok, max_length=200), cache_dir=tmp_path / "cache")
    v1, _ = encode_jsonl(jsonl, processor(tiny_config(1), build_tiny_tokenizer(1)), cache_dir=tmp_path / "cache")
    assert a._fingerprint == b._fingerprint  # second run reuses the cached Arrow file
    assert len({a._fingerprint, c._fingerprint, v1._fingerprint}) == 3
    assert len(c) == 3  # the long row fits at 200


def test_streaming_gives_the_same_rows(jsonl, tmp_path):
    tok, cfg = build_tiny_tokenizer(1), tiny_config(1)
    full, _ = encode_jsonl(jsonl, processor(cfg, tok), cache_dir=tmp_path / "cache")
    stream, stats = encode_jsonl(jsonl, processor(cfg, tok), streaming=True)
    assert stats is None
    rows = list(stream)
    assert [r["input_ids"] for r in rows] == full["input_ids"]
    assert isinstance(build_torch_dataset(stream, processor(cfg, tok)), CogVLMIterableDataset)


def test_streaming_with_workers_reads_every_row_once(tmp_path):
    """`datasets` hands a stream's shards to DataLoader workers; splitting again by row index lost half the rows."""
    from adapters.demo import write_task

    train, _ = write_task(tmp_path / "data", n_train=10, n_eval=1, seed=1)
    proc = processor(tiny_config(2), build_tiny_tokenizer(2))
    for workers in (0, 2):
        stream, _ = encode_jsonl(train, proc, streaming=True, streaming_shards=workers)
        loader = torch.utils.data.DataLoader(build_torch_dataset(stream, proc), batch_size=1, num_workers=workers,
                                             collate_fn=lambda items: items)
        seen = sorted(int(batch[0]["id"].split("-")[1]) for batch in loader)
        assert seen == list(range(10)), workers


def test_torch_dataset_decodes_lazily_and_collates(jsonl, tmp_path):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    ds, _ = encode_jsonl(jsonl, processor(cfg, tok), cache_dir=tmp_path / "cache")
    size = cfg.vision_config["image_size"]
    tds = build_torch_dataset(ds, processor(cfg, tok))
    assert isinstance(tds, CogVLMDataset) and len(tds) == 2
    item = tds[0]
    assert item["images"][0].shape == (3, size, size) and item["images"][0].device.type == "cpu"
    loader = torch.utils.data.DataLoader(tds, batch_size=2, collate_fn=CogVLMCollator(processor(cfg, tok)))
    batch = next(iter(loader))
    assert batch["images"].shape == (1, 3, size, size)
    assert batch["input_ids"].shape[0] == 2 and int(batch["token_type_ids"].sum()) == cfg.image_tokens


def test_skip_reasons_carry_the_real_line_number_with_blank_lines(jsonl, tmp_path):
    lines = jsonl.read_text().splitlines()
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("\n" + lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # rows now on lines 2, 4, 5, 6
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    _, stats = encode_jsonl(spaced, processor(cfg, tok), cache_dir=tmp_path / "cache")
    assert "spaced.jsonl:5: too long" in stats.examples[0] and "spaced.jsonl:6: invalid" in stats.examples[1]
