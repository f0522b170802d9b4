"""export: peft (adapter + metadata) and bnb 4-bit (vision/GLU unquantized, probe check repeated)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from adapters.export import export_peft, main
from finetune.run_folder import resolve_adapter

from .test_merge import in_process_verify, make_run  # noqa: F401 - fixture re-used


@pytest.fixture(scope="module")
def run2(tiny_checkpoints, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("exp") / "run", tiny_checkpoints[2], seed=5, template="vqa")


def test_export_peft_keeps_template_and_metadata(run2, tmp_path):
    out = export_peft(resolve_adapter(run2), tmp_path / "peft", log=lambda s: None)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "processor_config.json",
            "cogtune.json"} <= names
    info = json.loads((out / "cogtune.json").read_text())
    assert info["format"] == "peft" and info["template_version"] == "vqa" and info["base_config_hash"]
    src = resolve_adapter(out)  # an exported adapter resolves with its own metadata
    assert src.meta["template_version"] == "vqa" and src.adapter_dir == out
    with pytest.raises(FileExistsError):
        export_peft(resolve_adapter(run2), out, log=lambda s: None)


def test_export_bnb_4bit_keeps_vision_unquantized(run2, tmp_path, in_process_verify, capsys):  # noqa: F811
    out = tmp_path / "q4"
    assert main([str(run2), "--format", "bnb-4bit", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nf4 export vs base+adapter: max abs diff" in printed and "quantized verification passed" in printed
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["load_in_4bit"] and "model.vision" in qc["llm_int8_skip_modules"]
    dtypes = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            dtypes.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    assert dtypes["model.vision.linear_proj.gate_proj.weight"] == "F32"  # GLU adapter stays full precision
    assert any(k.startswith("model.vision.transformer") and v == "F32" for k, v in dtypes.items())
    assert dtypes["model.layers.0.mlp.language_mlp.up_proj.weight"] == "U8"  # decoder linears are nf4
    assert json.loads((out / "cogtune.json").read_text())["format"] == "bnb-4bit"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_peft_follows_umask_and_keeps_fingerprint(run2, tmp_path):
    """issue 9.8: export/* came out drwx------ (mkdtemp) whatever the umask."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = export_peft(resolve_adapter(run2), tmp_path / "peft", log=lambda s: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert all(m == 0o644 for m in modes.values()), modes
    assert ".cogtune-staging" not in modes  # the staging marker never reaches an output
    assert json.loads((out / "cogtune.json").read_text())["base_fingerprint"].startswith("sfp1-")
