"""Collator golden outputs (v1 and v2), padding sides, pad id, packing layout, and packed == unpacked loss."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data_formats.schema import Conversation, Message
from finetune.families import CLIP_MEAN, CLIP_STD
from finetune.models.cogvlm.processing import IGNORE_INDEX, CogVLMCollator, CogVLMProcessor, pack_examples
from finetune.tiny import tiny_config
from finetune.tokenization import build_tiny_tokenizer

X = IGNORE_INDEX


@pytest.fixture()
def red_png(tmp_path) -> str:
    path = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return str(path)


def two_turn(image: str) -> Conversation:
    return Conversation("r1", [image], [Message("user", "<image>\nWhat color is the shape?"),
                                        Message("assistant", "red"),
                                        Message("user", "Where is it?"), Message("assistant", "left")])


TEXT_ONLY = Conversation("r2", [], [Message("user", "How many?"), Message("assistant", "two")])

# Row 0 by the rules: BOS, 6 image placeholders (VISION), "Question: What color is the shape? Answer:",
# answer "red" + EOS (trained), "\n" + "Question: Where is it? Answer:", answer "left" + EOS (trained).
# Row 1: BOS, "Question: How many? Answer:", "two" + EOS (trained), then right padding.
TOKENS_ROW0 = ["Question", ":", "ĠWhat", "Ġcolor", "Ġis", "Ġthe", "Ġshape", "?", "ĠAnswer", ":", "red", "EOS",
               "Ċ", "Question", ":", "ĠWhere", "Ġis", "Ġit", "?", "ĠAnswer", ":", "left", "EOS"]
TOKENS_ROW1 = ["Question", ":", "ĠHow", "Ġmany", "?", "ĠAnswer", ":", "t", "wo", "EOS"]

GOLDEN = {
    1: {
        "input_ids": [
            [1, 0, 0, 0, 0, 0, 0, 289, 28, 300, 316, 263, 266, 364, 33, 291, 28, 498, 2, 201, 289, 28, 505, 263, 279,
             33, 291, 28, 377, 2],
            [1, 289, 28, 495, 508, 33, 291, 28, 86, 390, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        "labels": [
            [X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, 498, 2, X, X, X, X, X, X, X, X, X, 377, 2],
            [X, X, X, X, X, X, X, X, 86, 390, 2, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X],
        ],
    },
    2: {
        "input_ids": [
            [508, 510, 510, 510, 510, 510, 510, 286, 25, 297, 313, 260, 263, 361, 30, 288, 25, 495, 509, 198, 286, 25,
             502, 260, 276, 30, 288, 25, 374, 509],
            [508, 286, 25, 492, 505, 30, 288, 25, 83, 387, 509, 510, 510, 510, 510, 510, 510, 510, 510, 510, 510, 510,
             510, 510, 510, 510, 510, 510, 510, 510],
        ],
        "labels": [
            [X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, 495, 509, X, X, X, X, X, X, X, X, X, 374, 509],
            [X, X, X, X, X, X, X, X, 83, 387, 509, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X],
        ],
    },
}
# Shared by both versions (same layout, same span length 6).
GOLDEN_TOKEN_TYPES = [[0, 1, 1, 1, 1, 1, 1] + [0] * 23, [0] * 30]
GOLDEN_ATTENTION = [[1] * 30, [1] * 11 + [0] * 19]
# BOS=0, boi=1, the 4 patches share 2, eoi=3, text 4..26; row 1 plain 0..10, padding 0.
GOLDEN_POSITIONS = [[0, 1, 2, 2, 2, 2, 3] + list(range(4, 27)), list(range(11)) + [0] * 19]


@pytest.mark.parametrize("version", [1, 2])
def test_golden_two_turn_batch(version, red_png):
    tok, cfg = build_tiny_tokenizer(version), tiny_config(version)
    out = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok))([two_turn(red_png), TEXT_ONLY])
    gold = GOLDEN[version]
    # The literal ids above are these tokens (EOS/BOS/pad spelled per version):
    special = {"EOS": tok.eos_token}
    assert tok.convert_ids_to_tokens(gold["input_ids"][0]) == (
        [tok.bos_token] + [tok.pad_token] * 6 + [special.get(t, t) for t in TOKENS_ROW0])
    assert tok.convert_ids_to_tokens(gold["input_ids"][1][:11]) == [tok.bos_token] + [special.get(t, t)
                                                                                      for t in TOKENS_ROW1]
    assert out["input_ids"].tolist() == gold["input_ids"]
    assert out["token_type_ids"].tolist() == GOLDEN_TOKEN_TYPES
    assert out["attention_mask"].tolist() == GOLDEN_ATTENTION
    assert out["labels"].tolist() == gold["labels"]
    assert out["position_ids"].tolist() == GOLDEN_POSITIONS
    for key in ("input_ids", "token_type_ids", "attention_mask", "labels", "position_ids"):
        assert out[key].dtype == torch.long
    size = cfg.vision_config["image_size"]
    assert out["images"].shape == (1, 3, size, size) and out["images"].dtype == torch.float32
    torch.testing.assert_close(out["images"][0, :, 0, 0], (torch.tensor([1.0, 0, 0]) - torch.tensor(CLIP_MEAN))
                               / torch.tensor(CLIP_STD))


def test_no_images_gives_none_and_pad_id_comes_from_tokenizer():
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    tok.pad_token = "<|eot_id|>"  # a different pad: the collator must follow the tokenizer, not a constant
    short = Conversation("a", [], [Message("user", "Hi"), Message("assistant", "red")])
    out = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok))([short, TEXT_ONLY])
    assert out["images"] is None
    n = int(out["attention_mask"][0].sum())
    assert out["input_ids"][0, n:].eq(511).all() and out["labels"][0, n:].eq(X).all()
    assert out["token_type_ids"][0, n:].eq(0).all()


def test_left_padding_for_generation(red_png):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    rows = [two_turn(red_png), TEXT_ONLY]
    right = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok))(rows)
    left = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok), padding_side="left")(rows)
    n = int(right["attention_mask"][1].sum())
    assert left["attention_mask"][1].tolist() == [0] * (30 - n) + [1] * n
    assert left["input_ids"][1, 30 - n:].tolist() == right["input_ids"][1, :n].tolist()
    assert left["input_ids"][1, :30 - n].eq(510).all()
    # Positions of a left-padded row equal the row alone (BOS = 0), as the model's own default.
    assert left["position_ids"][1, 30 - n:].tolist() == list(range(n))
    from finetune.models.cogvlm.modeling import default_position_ids

    assert torch.equal(left["position_ids"], default_position_ids(left["token_type_ids"], left["attention_mask"]))
    gen = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok), padding_side="left",
                         add_generation_prompt=True)(rows)
    assert gen["labels"].eq(X).all()
    ends = tok.convert_ids_to_tokens(gen["input_ids"][:, -2:].flatten().tolist())
    assert ends == ["ĠAnswer", ":", "ĠAnswer", ":"]  # every row ends with its open prompt


def test_pad_to_multiple_of():
    processor = CogVLMProcessor.from_config(tiny_config(1), build_tiny_tokenizer(1))
    out = CogVLMCollator(processor, pad_to_multiple_of=8)([TEXT_ONLY])
    assert out["input_ids"].shape == (1, 16) and out["attention_mask"].sum() == 11


def test_pack_examples_best_fit():
    assert pack_examples([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert pack_examples([9], 8) == [[0]]  # never cut: an over-long example gets its own row
    assert pack_examples([6, 5, 2, 3], 8) == [[0, 2], [1, 3]]  # 2 goes to the fullest row that fits it


def test_packing_layout(red_png):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    blue = red_png.replace("red.png", "blue.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(blue)
    rows = [two_turn(red_png), TEXT_ONLY, Conversation("r3", [blue], [Message("user", "<image>Colour?"),
                                                                      Message("assistant", "blue")])]
    plain = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok))(rows)
    lengths = plain["attention_mask"].sum(1).tolist()  # [30, 11, 20]
    packed = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok, max_length=45), packing=True)(rows)
    # first fit: row 0 = examples 0 + 1 (41 tokens), row 1 = example 2 (20 tokens)
    assert packed["input_ids"].shape == (2, 41)
    seg = packed["attention_mask"]
    assert seg[0].tolist() == [1] * 30 + [2] * 11 and seg[1].tolist() == [1] * 20 + [0] * 21
    for key in ("input_ids", "token_type_ids", "labels", "position_ids"):
        assert packed[key][0, :30].tolist() == plain[key][0, :30].tolist()
        assert packed[key][0, 30:].tolist() == plain[key][1, :11].tolist()  # positions restart at 0
        assert packed[key][1, :20].tolist() == plain[key][2, :20].tolist()
    assert packed["labels"][1, 20:].eq(X).all() and packed["input_ids"][1, 20:].eq(510).all()
    # Images follow the packed layout in row-major order: red (row 0), blue (row 1).
    assert torch.equal(packed["images"], plain["images"]) and packed["images"].shape[0] == 2
    assert lengths == [30, 11, 20]


def test_packing_needs_max_length_and_right_padding():
    tok, cfg = build_tiny_tokenizer(1), tiny_config(1)
    with pytest.raises(ValueError, match="max_length"):
        CogVLMCollator(CogVLMProcessor.from_config(cfg, tok), packing=True)
    with pytest.raises(ValueError, match="right"):
        CogVLMCollator(CogVLMProcessor.from_config(cfg, tok, max_length=64), packing=True, padding_side="left")


@pytest.mark.parametrize("version", [1, 2])
def test_packed_loss_equals_unpacked(version, red_png, tiny_models):
    """Token-weighted loss of a packed batch == the same rows padded: segments never see each other."""
    tok, model = build_tiny_tokenizer(version), tiny_models[version]
    cfg = model.config
    rows = [two_turn(red_png), TEXT_ONLY, Conversation("r3", [red_png], [Message("user", "<image>Colour?"),
                                                                          Message("assistant", "red")])]
    plain = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok))(rows)
    packed = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok, max_length=64), packing=True)(rows)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    n_items = int((plain["labels"] != X).sum())
    with torch.no_grad():
        a = model(**plain, num_items_in_batch=n_items).loss
        b = model(**packed, num_items_in_batch=n_items).loss
        c = model(**{k: v for k, v in packed.items() if k != "position_ids"}, num_items_in_batch=n_items).loss
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c)  # the model rebuilds the same per-segment positions


def test_dataset_level_packs_become_one_row_each():
    from finetune.dataset import PackedDataset
    from finetune.tiny import tiny_config
    from finetune.tokenization import build_tiny_tokenizer

    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    rows = [{"input_ids": [1] * n, "token_type_ids": [0] * n, "labels": [-100] * (n - 1) + [1], "images": []}
            for n in (6, 5, 2, 3)]
    packed = PackedDataset(rows, [len(r["input_ids"]) for r in rows], max_length=8)
    assert len(packed) == 2 and [len(p) for p in packed] == [2, 2]
    batch = CogVLMCollator(CogVLMProcessor.from_config(cfg, tok, max_length=8), packing=True)([packed[0], packed[1]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 6 + [2] * 2, [1] * 5 + [2] * 3]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]  # restart per segment
    with pytest.raises(ValueError, match="packing=False"):
        CogVLMCollator(CogVLMProcessor.from_config(cfg, tok, max_length=8))([packed[0]])
