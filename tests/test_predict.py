"""predict: batch == single, atomic output + metrics; several adapters on one base switch correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.merge_verify import build_probe, probe_logits
from adapters.predict import InferenceModel, main

from .test_merge import make_run

DATA = Path(__file__).parent / "assets" / "data" / "tiny.jsonl"


@pytest.fixture(scope="module")
def two_runs(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    base = tiny_checkpoints[2]
    return base, make_run(root / "a", base, seed=11, scale=0.3), make_run(root / "b", base, seed=12, scale=0.3)


def test_predict_batch_equals_single_and_metrics(two_runs, tmp_path, capsys):
    base, run_a, _ = two_runs
    outs = {}
    for bs in (1, 3):
        out = tmp_path / f"pred{bs}.jsonl"
        assert main([str(DATA), "--model", str(base), "--adapter", str(run_a), "--out", str(out),
                     "--batch-size", str(bs), "--max-new-tokens", "3"]) == 0
        outs[bs] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outs[1] == outs[3] and len(outs[1]) == 3
    assert outs[1][0]["reference"] == "A red square."
    metrics = json.loads((tmp_path / "pred3.metrics.json").read_text())
    assert metrics["n"] == 3 and "exact_match" in metrics and metrics["template_version"] == "chat"
    assert "metrics:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred1.jsonl", "pred1.metrics.json", "pred3.jsonl",
                                                          "pred3.metrics.json"]


def test_switching_adapters_gives_each_adapters_logits(two_runs, tmp_path):
    base, run_a, run_b = two_runs
    multi = InferenceModel(base, [f"a={run_a}", f"b={run_b}"])
    probe = build_probe(multi.processor("chat"), tmp_path)
    got = {}
    for name in ("a", "b", "a"):
        multi.use(name)
        got.setdefault(name, []).append(probe_logits(multi.model, probe))
    for name, run in (("a", run_a), ("b", run_b)):
        alone = probe_logits(InferenceModel(base, [str(run)]).model, probe)
        for logits in got[name]:
            torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    assert (got["a"][0] - got["b"][0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        multi.use("c")
    with pytest.raises(ValueError, match="name each adapter"):
        InferenceModel(base, [str(run_a), str(run_b)])


def test_predict_template_override_warns(two_runs, tmp_path, capsys):
    base, run_a, _ = two_runs
    assert main([str(DATA), "--model", str(base), "--adapter", str(run_a), "--out", str(tmp_path / "p.jsonl"),
                 "--template", "vqa", "--max-new-tokens", "2"]) == 0
    assert "trained with template 'chat'; using 'vqa'" in capsys.readouterr().err


def test_help_names_the_metrics_file_predict_writes(two_runs, tmp_path, capsys):
    """issue 9.13: help said OUT.metrics.json, the file was pred.metrics.json."""
    from adapters.predict import metrics_path

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "pred.jsonl -> pred.metrics.json" in help_text and "OUT.metrics.json" not in help_text
    assert metrics_path("out/pred.jsonl") == Path("out/pred.metrics.json")
    base, run_a, _ = two_runs
    assert main([str(DATA), "--model", str(base), "--adapter", str(run_a), "--out", str(tmp_path / "pred.jsonl"),
                 "--max-new-tokens", "1"]) == 0
    assert (tmp_path / "pred.metrics.json").is_file()


def test_predictions_follow_umask(two_runs, tmp_path):
    """issue 9.8: predictions and metrics were -rw------- whatever the umask."""
    import os
    import stat

    base, run_a, _ = two_runs
    old = os.umask(0o022)
    try:
        assert main([str(DATA), "--model", str(base), "--adapter", str(run_a), "--out", str(tmp_path / "p.jsonl"),
                     "--max-new-tokens", "1"]) == 0
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {
        "p.jsonl": 0o644, "p.metrics.json": 0o644}


def test_predict_and_chat_refuse_a_base_with_other_weights(two_runs, tmp_path, capsys):
    """issue 14.10: same config.json, other weights (make-tiny --seed 7) is refused unless --force-base."""
    from adapters.chat import main as chat_main
    from adapters.merge_load import AdapterMismatch
    from finetune.tiny import make_tiny

    base, run_a, _ = two_runs
    other = make_tiny(2, tmp_path / "seed7", seed=7)
    assert (other / "config.json").read_bytes() == (base / "config.json").read_bytes()
    with pytest.raises(AdapterMismatch, match="fingerprint"):
        InferenceModel(other, [str(run_a)])
    out = tmp_path / "p.jsonl"
    assert main([str(DATA), "--model", str(other), "--adapter", str(run_a), "--out", str(out)]) == 1
    assert chat_main(["--model", str(other), "--adapter", str(run_a), "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.count("--force-base") >= 2 and not out.exists()
    assert main([str(DATA), "--model", str(other), "--adapter", str(run_a), "--out", str(out),
                 "--max-new-tokens", "1", "--force-base"]) == 0
    assert "--force-base given" in capsys.readouterr().err


def test_predict_refuses_images_outside_the_data_root_unless_allowed(two_runs, tmp_path, capsys):
    """Images are opened only under the data file's folder (issue 14.9); --allow-outside-images opts out."""
    base, run_a, _ = two_runs
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    data = tmp_path / "sub" / "rows.jsonl"
    data.parent.mkdir()
    for row in rows:  # the same images, now outside sub/
        row["images"] = [str((DATA.parent / img).resolve()) for img in row.get("images", [])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(data), "--model", str(base), "--adapter", str(run_a), "--out", str(tmp_path / "p.jsonl"),
            "--max-new-tokens", "1"]
    assert main(args) != 0
    assert "outside the data root" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()
    assert main(args + ["--allow-outside-images"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(rows)
