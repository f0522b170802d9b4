"""chat: one-shot streamed answer, interactive loop with history and /adapter switching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.chat import chat_loop, main
from adapters.predict import InferenceModel

from .test_merge import make_run

IMAGE = Path(__file__).parent / "assets" / "data" / "images" / "red.png"


def test_one_shot_streams_answer(tiny_checkpoints, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_checkpoints[1], seed=21, template="vqa")
    assert main(["--model", str(tiny_checkpoints[1]), "--adapter", str(run), "--image", str(IMAGE),
                 "--prompt", "What colour?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    # streamed text; the stored template (vqa) is used without a warning
    assert out.out.strip() and "trained with template" not in out.err
    assert main(["--model", str(tiny_checkpoints[1]), "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 1


def test_loop_keeps_history_and_switches_adapter(tiny_checkpoints, tmp_path, capsys):
    base = tiny_checkpoints[2]
    a, b = make_run(tmp_path / "a", base, seed=1), make_run(tmp_path / "b", base, seed=2, template="vqa")
    im = InferenceModel(base, [f"a={a}", f"b={b}"])
    lines = iter(["hello", "and then?", "/adapter b", "/adapter zzz", "hi", "/exit"])
    written: list[str] = []
    history = chat_loop(im, str(IMAGE), read=lambda _: next(lines), write=written.append, max_new_tokens=3)
    assert [q for q, _ in history] == ["hi"]  # switching clears history; earlier turns were kept until then
    assert im.active == "b"
    assert any("adapter 'b' active, template 'vqa'" in w for w in written)
    assert any("no adapter named 'zzz'" in w for w in written)


BLUE = IMAGE.with_name("blue.png")


@pytest.fixture()
def tiny_im(tiny_checkpoints):
    return InferenceModel(tiny_checkpoints[2])


def _fake_generate(model, tokens, log_noise=False):
    """model.generate replaced by a scripted stream of `tokens` (what a looping model would emit)."""
    def generate(input_ids=None, streamer=None, max_new_tokens=256, **kwargs):
        if log_noise:
            import warnings

            from transformers.utils import logging as hf_logging

            hf_logging.get_logger("transformers.generation").warning("`past_key_values` are deprecated. (noise)")
            warnings.warn("something is deprecated (noise)", FutureWarning, stacklevel=1)
        new = []
        if streamer is not None:
            streamer.put(input_ids)
        for t in tokens[:max_new_tokens]:
            new.append(t)
            if streamer is not None:
                streamer.put(torch.tensor([t]))
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    return generate


def test_help_and_image_commands(tiny_im, monkeypatch):
    """issue 9.13: /help and /image PATH (change the picture without restarting)."""
    import finetune.generation as generation

    seen: list[list[str]] = []

    def fake_answers(model, processor, convs, **kwargs):
        seen.append(list(convs[0].images))
        return ["ok"]

    monkeypatch.setattr(generation, "generate_answers", fake_answers)
    lines = iter(["/help", "first", "/image", f"/image {BLUE}", "/image nope.png", "second", "/image none", "third",
                  "/reset", "/exit"])
    written: list[str] = []
    history = chat_loop(tiny_im, str(IMAGE), read=lambda _: next(lines), write=written.append)
    assert any("/image PATH" in w and "/reset" in w and "/help" in w for w in written[1:2])
    assert any(w == f"image: {IMAGE}" for w in written)
    assert any(f"image {BLUE}; history cleared" in w for w in written)
    assert any("nope.png does not exist" in w for w in written)
    assert seen == [[str(IMAGE.resolve())], [str(BLUE.resolve())], []]
    assert history == []  # /reset at the end


def test_unknown_template_fails_before_the_model_loads(tiny_checkpoints, monkeypatch, capsys):
    import adapters.chat as chat_mod

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the template was checked")

    monkeypatch.setattr(chat_mod, "InferenceModel", no_load)
    assert main(["--model", str(tiny_checkpoints[2]), "--template", "chatt", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "'chatt' is not a template" in err and "Did you mean 'chat'?" in err


def test_repeating_answer_is_stopped(tiny_im, monkeypatch, capsys):
    """issue 9.13: the default 256 new tokens streamed a repetitive answer for a minute."""
    from adapters.chat import answer, repeats_itself

    assert repeats_itself([5] * 12) and not repeats_itself([5] * 11)
    assert repeats_itself([1, 2, 3, 4] * 3) and not repeats_itself([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    assert not repeats_itself(list(range(40)))
    loop = [17, 18, 19] * 100
    monkeypatch.setattr(tiny_im.model, "generate", _fake_generate(tiny_im.model, loop))
    notes: list[str] = []
    text = answer(tiny_im, str(IMAGE), [], "What is it?", template="chat", write=notes.append)
    assert notes and "repeats itself" in notes[0] and "after 12 tokens" in notes[0]
    assert text == tiny_im.tokenizer.decode(loop[:12], skip_special_tokens=True).strip()
    full = answer(tiny_im, str(IMAGE), [], "What is it?", template="chat", stop_on_repetition=False,
                  max_new_tokens=60, write=notes.append)
    assert len(notes) == 1 and full == tiny_im.tokenizer.decode(loop[:60], skip_special_tokens=True).strip()


def test_library_warnings_stay_out_of_answers(tiny_im, monkeypatch):
    """issue 9.10/9.13: transformers' past_key_values deprecation was printed inside chat answers."""
    import logging
    import warnings

    from adapters.chat import answer

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    caught: list[warnings.WarningMessage] = []
    scripted = _fake_generate(tiny_im.model, [17, 18, 19, 20], log_noise=True)

    def generate(**kwargs):
        with warnings.catch_warnings(record=True) as seen:
            out = scripted(**kwargs)
        caught.extend(seen)
        return out

    monkeypatch.setattr(tiny_im.model, "generate", generate)
    try:
        answer(tiny_im, str(IMAGE), [], "What is it?", template="chat")
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "deprecated" in r.getMessage()]
    assert not [w for w in caught if "deprecated" in str(w.message)]
