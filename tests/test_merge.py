"""merge: parity with base + adapter (LoRA and QLoRA), refusals, atomic output, strict reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters import merge as merge_mod
from adapters import merge_verify, merge_write
from adapters.merge import merge_adapter
from adapters.merge_load import AdapterMismatch
from finetune.run_folder import resolve_adapter

TARGETS = (r"model\.layers\.\d+\.(self_attn\.(language|vision)_expert_(query_key_value|dense)"
           r"|mlp\.(language|vision)_mlp\.(gate|up|down)_proj)|model\.vision\.linear_proj\.(linear_proj|gate_proj)")


def make_run(root: Path, base_dir: Path, *, quant: str = "none", seed: int = 1, template: str = "chat",
             scale: float = 0.05, **processor_settings) -> Path:
    """A run folder as the trainer writes it: adapter/ (PEFT + processor: tokenizer and processor_config.json)
    and run.json; LoRA B perturbed."""
    from peft import LoraConfig, get_peft_model

    from finetune.config import QuantSection
    from finetune.loading import base_fingerprint, to_bnb_config
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.models.cogvlm.processing import CogVLMProcessor
    from finetune.run_folder import config_hash
    from finetune.tokenization import load_tokenizer

    kwargs = {"dtype": torch.float32}
    if quant != "none":
        kwargs["quantization_config"] = to_bnb_config(QuantSection(mode=quant), torch.float32,
                                                      CogVLMForCausalLM.full_precision_modules)
    model = CogVLMForCausalLM.from_pretrained(str(base_dir), **kwargs)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    run = root
    run.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(run / "adapter"))
    CogVLMProcessor.from_config(model.config, load_tokenizer(base_dir, None, model.config), template_version=template,
                                **processor_settings).save_pretrained(run / "adapter")
    info = {"family_version": model.config.cogvlm_version, "base_checkpoint": str(base_dir),
            "base_config_hash": config_hash(base_dir), "base_fingerprint": base_fingerprint(base_dir),
            "tokenizer_dir": None, "template_version": template,
            "image_tokens": model.config.image_tokens, "quant_mode": quant, "targets": ["custom"]}
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.fixture()
def in_process_verify(monkeypatch):
    """Verification without the fresh process (~5 s of imports each); the parity tests keep the real one."""
    def verify(folder, probe_file, dtype, quant, log):
        return {**merge_verify.verify_folder(folder, probe_file, dtype), "reload_seconds": 0.0}

    monkeypatch.setattr(merge_mod, "verify_in_fresh_process", verify)


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {v: make_run(root / f"lora{v}", tiny_checkpoints[v], seed=v) for v in (1, 2)}


def test_merge_parity_lora_and_strict_reload(runs, tiny_checkpoints, tmp_path, version, monkeypatch):
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    if version == 1:  # the fresh process (~5 s of imports) is exercised once, with CogVLM2
        monkeypatch.setattr(merge_mod, "verify_in_fresh_process", lambda f, p, d, q, log: {
            **merge_verify.verify_folder(f, p, d), "reload_seconds": 0.0})

    logs: list[str] = []
    out = tmp_path / "merged"
    rep = merge_adapter(runs[version], out, max_shard_size="200KB", log=logs.append)
    assert rep.stats["max_abs_diff"] < 1e-4 < rep.adapter_effect  # the adapter matters, the merge reproduces it
    text = "\n".join(logs)
    assert "max abs diff" in text and "verification passed" in text
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == merge_mod.checkpoint_keys(tiny_checkpoints[version])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["cogvlm_version"] == version
    for name in ("generation_config.json", "tokenizer.json", "processor_config.json", "cogtune.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "cogtune.json").read_text())["template_version"] == "chat"
    CogVLMForCausalLM.from_pretrained(str(out))  # strict=True by default: any missing/unexpected key raises
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_merge_copies_code_files_and_bf16(runs, tiny_checkpoints, tmp_path, in_process_verify):
    base = tmp_path / "base"
    import shutil

    shutil.copytree(tiny_checkpoints[2], base)
    (base / "modeling_cogvlm.py").write_text("# remote code\n")
    (base / "README.md").write_text("readme\n")
    run = make_run(tmp_path / "run", base, seed=3)
    rep = merge_adapter(run, tmp_path / "out", dtype="bf16", log=lambda s: None)
    assert rep.dtype == "bfloat16" and rep.stats["max_abs_diff"] <= 5e-2 * max(1, rep.stats["ref_max_abs"])
    assert (tmp_path / "out" / "modeling_cogvlm.py").read_text() == "# remote code\n"
    assert (tmp_path / "out" / "README.md").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_qlora_adapter_merges_into_unquantized_base(tiny_checkpoints, tmp_path, in_process_verify):
    run = make_run(tmp_path / "qrun", tiny_checkpoints[2], quant="nf4", seed=4)
    logs: list[str] = []
    rep = merge_adapter(run, tmp_path / "out", log=logs.append)
    assert any("QLoRA" in line for line in logs)
    assert rep.stats["max_abs_diff"] < 1e-4 < rep.adapter_effect


def test_refuses_mismatched_base(runs, tiny_checkpoints, tmp_path):
    from finetune.tiny import make_tiny

    other = make_tiny(2, tmp_path / "other", seed=0, hidden_size=96)  # same family, other config
    with pytest.raises(AdapterMismatch, match="config hash") as err:
        merge_adapter(runs[2], tmp_path / "out", base=other, log=lambda s: None)
    assert "Linear" in str(err.value)  # adapter shapes do not fit either: all problems reported at once
    with pytest.raises(AdapterMismatch, match="CogVLM2 .*CogVLM1|trained on CogVLM2"):
        merge_adapter(runs[2], tmp_path / "out", base=tiny_checkpoints[1], log=lambda s: None)
    assert not (tmp_path / "out").exists()
    assert merge_mod.main([str(runs[2]), "--base", str(tiny_checkpoints[1]), "--out", str(tmp_path / "o")]) == 1


def test_failure_mid_merge_leaves_nothing(runs, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(merge_mod, "write_shards", boom)
    with pytest.raises(OSError, match="injected"):
        merge_adapter(runs[1], tmp_path / "out", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing(runs, tmp_path, in_process_verify, monkeypatch):
    real = merge_mod.write_shards

    def corrupt(state, folder, size):
        key = next(k for k in state if "language_expert_query_key_value" in k)
        state = {**state, key: state[key] + 0.5}
        return real(state, folder, size)

    monkeypatch.setattr(merge_mod, "write_shards", corrupt)
    with pytest.raises(RuntimeError, match="verification FAILED"):
        merge_adapter(runs[1], tmp_path / "out", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(runs, tmp_path, in_process_verify):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        merge_adapter(runs[1], out, log=lambda s: None)
    assert (out / "keep.txt").read_text() == "mine"
    merge_adapter(runs[1], out, force=True, log=lambda s: None)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(ValueError, match="input folder"):
        merge_adapter(runs[1], runs[1] / "adapter", force=True, log=lambda s: None)


def test_resolve_adapter_forms(runs, tmp_path):
    src = resolve_adapter(runs[1])
    assert src.adapter_dir == runs[1] / "adapter" and src.meta["family_version"] == 1
    assert resolve_adapter(runs[1] / "adapter").meta == src.meta  # adapter folder: run.json beside it
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        resolve_adapter(tmp_path)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_merge_that_drops_the_adapter_fails(tiny_checkpoints, tmp_path, in_process_verify, monkeypatch, dtype):
    """A merge that silently unloads the LoRA delta must not pass, in fp32 or in bf16 (review finding)."""
    from peft import LoraModel

    run = make_run(tmp_path / "run", tiny_checkpoints[2], scale=0.5)  # an adapter with a clear effect
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(RuntimeError, match="verification FAILED"):
        merge_adapter(run, tmp_path / "merged", dtype=dtype, log=lambda *_: None)
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------------------------
# Reliability (issue 14.10, 14.12, 14.13; issue 9.8)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed7_base(tiny_checkpoints, tmp_path_factory):
    """make-tiny --seed 7: the same config.json as the seed-0 base, other weights."""
    from finetune.tiny import make_tiny

    other = make_tiny(2, tmp_path_factory.mktemp("seed7") / "base", seed=7)
    assert (other / "config.json").read_bytes() == (tiny_checkpoints[2] / "config.json").read_bytes()
    return other


def test_refuses_base_with_same_config_but_other_weights(runs, seed7_base, tmp_path, in_process_verify):
    with pytest.raises(AdapterMismatch, match="fingerprint") as err:
        merge_adapter(runs[2], tmp_path / "out", base=seed7_base, log=lambda s: None)
    assert "--force-base" in str(err.value) and "config hash" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert merge_mod.main([str(runs[2]), "--base", str(seed7_base), "--out", str(tmp_path / "o")]) == 1
    logs: list[str] = []
    merge_adapter(runs[2], tmp_path / "forced", base=seed7_base, force_base=True, log=logs.append)
    assert any("--force-base given" in line for line in logs) and (tmp_path / "forced" / "config.json").is_file()


def test_fingerprint_refusal_happens_before_weights_load(runs, seed7_base, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the base was checked")

    monkeypatch.setattr(merge_mod, "load_base", no_load)
    with pytest.raises(AdapterMismatch, match="fingerprint"):
        merge_adapter(runs[2], tmp_path / "out", base=seed7_base, log=lambda s: None)


def _stale_folder(parent: Path, name: str, pid: int, kind: str = "partial", out: str = "merged") -> Path:
    import socket

    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    (folder / merge_write.STAGING_MARKER).write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "kind": kind, "created": 0, "out": out}))
    return folder


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_merge_cleans_stale_staging_and_reports_unmarked(runs, tmp_path, in_process_verify, monkeypatch):
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    dead = _dead_pid()
    stale = _stale_folder(tmp_path, ".merged.partial-abc123", dead)
    stale_other_out = _stale_folder(tmp_path, ".other.merged-zz9", dead, kind="merged", out="other")
    stale_work = _stale_folder(tmp_path / "tmp", "cogtune-merge-q1w2", dead, kind="work", out="")
    live = _stale_folder(tmp_path, ".merged.partial-live1", os.getpid())  # a merge still running
    unmarked = tmp_path / ".merged.partial-user1"
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("not the kit's")
    old = _stale_folder(tmp_path, ".gone.old-k3", dead, kind="old", out="gone")  # previous output, not restored
    logs: list[str] = []
    merge_adapter(runs[1], tmp_path / "merged", log=logs.append)
    assert not stale.exists() and not stale_other_out.exists() and not stale_work.exists()
    assert live.is_dir() and (unmarked / "notes.txt").read_text() == "not the kit's" and old.is_dir()
    text = "\n".join(logs)
    assert f"removed {stale}" in text and "interrupted merge" in text
    assert f"{unmarked} looks like" in text and "left alone" in text
    assert f"mv {old}/x" in text
    # the finished merge leaves neither staging nor scratch folders of its own
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        [live.name, unmarked.name, old.name])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_verifier_dies_with_its_parent(tmp_path):
    """A killed merge must not leave its fresh-process verifier running (issue 14.12)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent_code = (
        "import subprocess, sys, os, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import sys, time; "
        "from adapters.merge_verify import tie_to_parent; "
        "tie_to_parent(int(sys.argv[1]), poll_seconds=0.2); print(\"tied\", flush=True); time.sleep(120)', "
        "str(os.getpid())])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(merge_verify.REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=env)
    child_pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "tied"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and not merge_write._process_gone(child_pid):
        time.sleep(0.1)
    gone = merge_write._process_gone(child_pid)
    if not gone:
        os.kill(child_pid, signal.SIGKILL)
    assert gone, "the verification child outlived its parent"


def test_verify_in_fresh_process_passes_parent_pid(monkeypatch, tmp_path):
    import os
    import subprocess

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "boom")

    monkeypatch.setattr(merge_verify.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="failed to reload"):
        merge_mod.verify_in_fresh_process(tmp_path, tmp_path / "probe.safetensors", "float32", None, print)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--parent-pid") + 1] == str(os.getpid())


def test_pickle_probe_is_never_executed(tiny_checkpoints, tmp_path):
    """The verification entry point must not unpickle its --probe file (issue 14.13)."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    probe = tmp_path / "probe.pt"
    probe.write_bytes(pickle.dumps({"reference": Payload()}))
    with pytest.raises(ValueError, match="not a safetensors probe"):
        merge_verify.verify_main([str(tiny_checkpoints[2]), "--probe", str(probe), "--report",
                               str(tmp_path / "r.json"), "--dtype", "float32"])
    assert not marker.exists(), "the pickle payload ran"
    torch.save({"x": Payload()}, tmp_path / "probe2.pt")  # torch.save's zip format: refused as well
    with pytest.raises(ValueError, match="not a safetensors probe"):
        merge_verify.verify_main([str(tiny_checkpoints[2]), "--probe", str(tmp_path / "probe2.pt"), "--report",
                               str(tmp_path / "r.json"), "--dtype", "float32"])
    assert not marker.exists()


def test_merged_output_follows_umask(runs, tmp_path, in_process_verify):
    import os
    import stat

    old = os.umask(0o022)
    try:
        merge_adapter(runs[1], tmp_path / "merged", log=lambda s: None)
    finally:
        os.umask(old)
    out = tmp_path / "merged"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


def test_an_empty_unmarked_staging_folder_from_a_kill_at_start_is_cleaned(runs, tmp_path, in_process_verify,
                                                                          monkeypatch):
    """A merge killed between creating its staging folder and marking it leaves an empty, unmarked folder: the
    next merge removes it once it is older than a starting merge could be; a young one is left alone."""
    import os
    import tempfile
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    old_stage, young_stage = tmp_path / ".merged.partial-k1ll3d", tmp_path / ".merged.partial-st4rt1"
    old_work = tmp_path / "tmp" / "cogtune-merge-k1ll3d"
    for folder in (old_stage, young_stage, old_work):
        folder.mkdir()
    for folder in (old_stage, old_work):
        os.utime(folder, (time.time() - 3600, time.time() - 3600))
    logs: list[str] = []
    merge_adapter(runs[1], tmp_path / "merged", log=logs.append)
    assert not old_stage.exists() and not old_work.exists() and young_stage.is_dir()
    assert f"removed {old_stage} (empty)" in "\n".join(logs)
