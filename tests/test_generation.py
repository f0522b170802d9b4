"""Generation equals the forward pass: `generate` (with its cache) vs a plain loop of `model(...)` on the growing
sequence, for CogVLM and CogVLM2, one row and a left-padded batch, a PEFT-wrapped model and a merged folder;
`finetune.generation` (chat, predict, the eval callback, the demo) gives the loop's tokens; answer scoring.

The reference is the forward pass, never another `generate` call: both would share a wrong position rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_formats.schema import Conversation, Message, read_jsonl
from finetune.families import LANGUAGE_TOKEN_TYPE
from finetune.generation import generate_answers, normalize_answer, prepare_batch, score, stop_token_ids
from finetune.tokenization import build_tiny_tokenizer

from .conftest import build_tiny_model

DATA = Path(__file__).parent / "assets" / "data" / "tiny.jsonl"
STEPS = 6
ATOL = 1e-5  # fp32; generate's cached steps vs full recomputation differ by ~1e-7 on these models


def _conversations() -> list[Conversation]:
    convs, problems = read_jsonl(DATA)
    assert not problems
    extra = Conversation("long", list(convs[0].images),
                         [Message("user", "Describe every detail of this picture, slowly and carefully please.")])
    return convs + [extra, convs[2]]


# --------------------------------------------------------------------------------------------------
# The reference: greedy decoding with model(...) on the whole sequence, no cache
# --------------------------------------------------------------------------------------------------


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])


@torch.no_grad()
def forward_loop(model, input_ids, token_type_ids, images, attention_mask=None, steps=STEPS, eos=(), pad=0):
    """(logits (B, T, V) of each step's last position, tokens (B, T)) of greedy decoding by full forward passes.

    Rows that produced an eos id continue with `pad`, and the loop stops when every row has, as `generate` does.
    """
    ids, types = input_ids, token_type_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    logits, tokens = [], []
    for _ in range(steps):
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, images=images, use_cache=False)
        last = out.logits[:, -1].float()  # (B, V)
        nxt = torch.where(finished, torch.full_like(finished, pad, dtype=torch.long), last.argmax(-1))
        logits.append(last)
        tokens.append(nxt)
        finished |= torch.isin(nxt, torch.tensor(list(eos), dtype=torch.long))
        ids = torch.cat((ids, nxt[:, None]), 1)
        types = torch.cat((types, torch.full_like(nxt[:, None], LANGUAGE_TOKEN_TYPE)), 1)
        mask = torch.cat((mask, torch.ones_like(nxt[:, None])), 1)
        if finished.all():
            break
    return torch.stack(logits, 1), torch.stack(tokens, 1)


def generate_vs_forward(model, inputs: dict) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """(per-step max |logits of generate - logits of the forward loop|, generate's tokens, the loop's tokens)."""
    pad = model.config.pad_token_id
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, num_beams=1, pad_token_id=pad,
                         output_logits=True, return_dict_in_generate=True)
    ref_logits, ref_tokens = forward_loop(model, inputs["input_ids"], inputs["token_type_ids"], inputs["images"],
                                          inputs.get("attention_mask"), eos=_eos_ids(model), pad=pad)
    got_logits = torch.stack([step.float() for step in out.logits], 1)  # (B, T, V)
    assert got_logits.shape == ref_logits.shape, (got_logits.shape, ref_logits.shape)
    deltas = [float((got_logits[:, t] - ref_logits[:, t]).abs().max()) for t in range(got_logits.shape[1])]
    return deltas, out.sequences[:, inputs["input_ids"].shape[1]:], ref_tokens


def build_inputs(config, kind: str, seed: int = 0) -> dict:
    """'single': one row `[BOS] [image span] text`, no attention mask (generate's default path).
    'batch': three left-padded rows of different lengths, two with an image, one text-only, with the mask."""
    rows = [([5, 6, 7, 8], True)] if kind == "single" else [([5, 6, 7, 8, 9], True), ([11, 12], True),
                                                              ([13, 14, 15], False)]
    span = config.image_tokens
    seqs = [([config.bos_token_id] + [config.pad_token_id] * span * img + text, [0] + [1] * span * img
             + [0] * len(text)) for text, img in rows]
    width = max(len(s) for s, _ in seqs)
    ids = torch.tensor([[config.pad_token_id] * (width - len(s)) + s for s, _ in seqs])
    types = torch.tensor([[0] * (width - len(t)) + t for _, t in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s, _ in seqs])
    size = config.vision_config["image_size"]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(sum(img for _, img in rows), 3, size, size, generator=g)
    inputs = {"input_ids": ids, "token_type_ids": types, "images": images}
    if kind == "batch":
        assert (mask == 0).any()  # really padded
        inputs["attention_mask"] = mask
    return inputs


def assert_generate_equals_forward(model, config, kind: str) -> list[float]:
    deltas, got, ref = generate_vs_forward(model, build_inputs(config, kind))
    assert max(deltas) <= ATOL, f"per-step max |Δlogits| {deltas}"
    assert torch.equal(got, ref)
    return deltas


@pytest.mark.parametrize("kind", ["single", "batch"])
def test_generate_equals_forward_loop(tiny_model, kind):
    assert_generate_equals_forward(tiny_model, tiny_model.config, kind)


def test_generate_without_cache_equals_forward_loop(tiny_model):
    inputs = build_inputs(tiny_model.config, "batch")
    out = tiny_model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, use_cache=False,
                              pad_token_id=tiny_model.config.pad_token_id)
    _, ref = forward_loop(tiny_model, inputs["input_ids"], inputs["token_type_ids"], inputs["images"],
                          inputs["attention_mask"], eos=_eos_ids(tiny_model), pad=tiny_model.config.pad_token_id)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], ref)


def test_generate_refuses_contradicting_position_ids(tiny_model):
    inputs = build_inputs(tiny_model.config, "single")
    plain = torch.arange(inputs["input_ids"].shape[1])[None]  # transformers' generic rule, wrong across an image
    with pytest.raises(ValueError, match="position_ids contradict token_type_ids"):
        tiny_model.generate(**inputs, position_ids=plain, max_new_tokens=2, do_sample=False,
                            pad_token_id=tiny_model.config.pad_token_id)


# --------------------------------------------------------------------------------------------------
# PEFT-wrapped model and merged folder (the objects chat / predict / export load)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted(tiny_checkpoints, tmp_path_factory):
    """Per version: (base + adapter as PeftModel, the merged folder loaded back, the run folder)."""
    from adapters import merge as merge_mod
    from adapters import merge_verify

    from .test_merge import make_run

    root = tmp_path_factory.mktemp("adapted")
    out = {}
    verify = merge_mod.verify_in_fresh_process
    # The fresh-process reload costs ~5 s of imports; the merge's own tests keep it. Same checks, in process.
    merge_mod.verify_in_fresh_process = lambda f, p, d, q, log: {**merge_verify.verify_folder(f, p, d),
                                                                  "reload_seconds": 0.0}
    try:
        for v, base in tiny_checkpoints.items():
            run = make_run(root / f"run{v}", base, seed=v, scale=0.2)
            merge_mod.merge_adapter(run, root / f"merged{v}", dtype="fp32", log=lambda s: None)
            peft_model = merge_mod.attach_adapters(merge_mod.load_base(base, "float32"),
                                                   [("default", merge_mod.resolve_adapter(run))], base)
            out[v] = (peft_model, merge_mod.load_base(root / f"merged{v}", "float32"), run)
    finally:
        merge_mod.verify_in_fresh_process = verify
    return out


@pytest.mark.parametrize("which", ["peft", "merged"])
@pytest.mark.parametrize("kind", ["single", "batch"])
def test_adapted_generate_equals_forward_loop(adapted, version, which, kind):
    peft_model, merged, _ = adapted[version]
    model = peft_model if which == "peft" else merged
    assert_generate_equals_forward(model, merged.config, kind)
    if which == "peft":  # the adapter is really on: its forward differs from the base's
        inputs = build_inputs(merged.config, kind)
        with torch.no_grad():
            on = model(**inputs).logits
            with model.disable_adapter():
                off = model(**inputs).logits
        assert (on - off).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# finetune.generation: the path of chat, predict, the eval callback and the demo
# --------------------------------------------------------------------------------------------------


def _forward_loop_answer(model, tok, conv, collator, steps: int = 4) -> str:
    stops = stop_token_ids(model, tok)
    batch = prepare_batch(model, collator([collator.encode(conv)]))
    _, tokens = forward_loop(model, batch["input_ids"], batch["token_type_ids"], batch.get("images"),
                             batch["attention_mask"], steps=steps, eos=stops, pad=collator.pad_token_id)
    new = tokens[0].tolist()
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    return tok.decode(new[:cut], skip_special_tokens=True).strip()


@pytest.mark.parametrize("which", ["plain", "peft"])
def test_generate_answers_equals_forward_loop(adapted, tiny_checkpoints, version, which):
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor
    from finetune.tokenization import load_tokenizer

    model = build_tiny_model(version) if which == "plain" else adapted[version][0]  # peft: what chat/predict load
    tok = build_tiny_tokenizer(version) if which == "plain" else load_tokenizer(tiny_checkpoints[version], None,
                                                                                 model.config)
    convs = _conversations()
    processor = CogVLMProcessor.from_config(model.config, tok, template_version="chat")
    collator = CogVLMCollator(processor, padding_side="left", add_generation_prompt=True)
    expected = [_forward_loop_answer(model, tok, c, collator) for c in convs]
    batched = generate_answers(model, processor, convs, max_new_tokens=4, batch_size=5)
    assert batched == expected
    assert any(expected)
    single = [generate_answers(model, processor, [c], max_new_tokens=4, batch_size=1)[0] for c in convs]
    assert single == expected


def test_predict_and_chat_give_the_forward_loop_tokens(adapted, tiny_checkpoints, tmp_path):
    """`cogtune predict` and `cogtune chat` as a user runs them: base folder + the run's adapter."""
    import json

    from adapters.chat import answer
    from adapters.predict import InferenceModel, predict
    from finetune.models.cogvlm.processing import CogVLMCollator, CogVLMProcessor

    im = InferenceModel(tiny_checkpoints[1], [str(adapted[1][2])], dtype="fp32")
    template = im.template()
    collator = CogVLMCollator(CogVLMProcessor.from_config(im.config, im.tokenizer, template_version=template),
                              padding_side="left", add_generation_prompt=True)
    convs, _ = read_jsonl(DATA)
    predict(im, DATA, tmp_path / "pred.jsonl", batch_size=3, max_new_tokens=STEPS, log=lambda *_: None)
    got = [json.loads(line)["prediction"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert got == [_forward_loop_answer(im.model, im.tokenizer, c, collator, STEPS) for c in convs]
    prompt = "Describe the image."
    said = answer(im, convs[0].images[0], [], prompt, template=template, max_new_tokens=STEPS, stream=False)
    expected = _forward_loop_answer(im.model, im.tokenizer, Conversation("chat", convs[0].images[:1],
                                                                         [Message("user", prompt)]), collator, STEPS)
    assert said == expected and any(got + [said])


def test_stream_receives_tokens():
    from finetune.models.cogvlm.processing import CogVLMProcessor

    model, tok = build_tiny_model(2), build_tiny_tokenizer(2)
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    processor = CogVLMProcessor.from_config(model.config, tok, template_version="chat")
    generate_answers(model, processor, _conversations()[:1], max_new_tokens=3, stream=Recorder())
    assert seen[-1] == "end" and len(seen) >= 3


def test_score_exact_and_boxes():
    assert normalize_answer("  A  Red\nsquare ") == "a red square"
    res = score(["a red square", "blue"], ["A red  square", "Red"])
    assert res == {"n": 2, "exact_match": 0.5}
    res = score(["it is [[100,100,500,500]]", "nothing", "at [[0,0,10,10]]"],
                ["there [[110,100,500,520]]", "there [[0,0,999,999]]", "at [[600,600,900,900]]"])
    assert res["n_box"] == 3
    assert res["box_parse_rate"] == pytest.approx(2 / 3)
    assert res["iou@0.5"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
