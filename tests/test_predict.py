"""predict: batch == single, atomic output + metrics; several adapters on one base switch correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.merge import build_probe, probe_logits
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
    probe = build_probe(multi.tokenizer, multi.config, "chat", tmp_path)
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
