"""chat: one-shot streamed answer, interactive loop with history and /adapter switching."""

from __future__ import annotations

from pathlib import Path

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
