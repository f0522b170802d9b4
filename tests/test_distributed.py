"""Several processes through accelerate, for real on CPU (gloo): DDP and FSDP2 give the adapter of one process
with the same global batch, checkpoints resume on fewer processes, merge does not depend on the world size,
and eval/generation run on every rank. Plus the shipped launch configs and their checks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.demo import RECIPE, write_task
from finetune.config import load_recipe
from finetune.distributed import CONFIG_DIR, check_launch_config, read_launch_config
from finetune.distributed import main as launch_main
from finetune.recipe import train
from finetune.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
STEPS = 4
# 16 rows, 2 per process x 2 processes (or x 2 accumulation steps in one): 4 optimizer steps of 4 rows.
COMMON = ("train.per_device_train_batch_size=2", "train.warmup_steps=0", "train.lr_scheduler_type=constant",
          "train.logging_steps=1", "train.report_to=[none]", "train.save_steps=2", f"train.max_steps={STEPS}",
          "eval.eval_steps=2", "eval.generation_rows=3", "eval.max_new_tokens=3",
          "lora.modules_to_save=[lm_head,boi_eoi]")  # a peft-wrapped module and bare parameters, gathered on save


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = make_tiny(2, root / "base", seed=1)
    train_path, eval_path = write_task(root / "data", n_train=16, n_eval=4, seed=1)
    return root, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}", f"data.eval_path={eval_path}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, out: Path, args: list[str]) -> Path:
    """`accelerate launch --config_file recipes/accelerate/<config>.yaml train.py ...`: two CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / f"{config}.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(ROOT / "train.py"), str(RECIPE),
           *args, f"output.dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single(task):
    """The reference: one process, twice the gradient accumulation (the same 4 rows per optimizer step)."""
    root, data = task
    cfg = load_recipe(RECIPE, [*data, *COMMON, "train.gradient_accumulation_steps=2", f"output.dir={root / 'one'}"])
    return train(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def ddp(task):
    root, data = task
    return _launch("ddp", root / "ddp", [*data, *COMMON])


@pytest.fixture(scope="module")
def fsdp(task):
    root, data = task
    return _launch("fsdp", root / "fsdp", [*data, *COMMON])


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(folder / "adapter_model.safetensors")
    extra = folder / "cogtune_extra_params.safetensors"
    return {**tensors, **(load_file(extra) if extra.is_file() else {})}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _eval_lines(out: Path) -> dict[int, dict]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h for h in state["log_history"] if "eval_loss" in h}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_twice_the_accumulation(engine, single, request):
    """Adapter (LoRA, lm_head copy, boi/eoi), run loss, eval loss and generated answers all match."""
    out = request.getfixturevalue(engine)
    ref = _adapter(single / "adapter")
    got = _adapter(out / "adapter")
    assert any("boi" in k for k in got) and any("lm_head" in k for k in got)
    assert _max_diff(got, ref) <= TOL
    assert _max_diff(ref, _adapter(single / "checkpoint-2")) > 100 * TOL  # the steps moved the weights
    assert _max_diff(_adapter(out / "checkpoint-2"), _adapter(single / "checkpoint-2")) <= TOL
    run, run1 = (json.loads((p / "run.json").read_text()) for p in (out, single))
    assert run["global_step"] == run1["global_step"] == STEPS
    assert run["train_loss"] == pytest.approx(run1["train_loss"], abs=1e-5)  # summed over the ranks
    ev, ev1 = _eval_lines(out), _eval_lines(single)
    assert sorted(ev) == sorted(ev1) == [2, 4]
    for step in ev:  # every rank evaluated its share; rank 0 gathered
        assert ev[step]["eval_loss"] == pytest.approx(ev1[step]["eval_loss"], abs=1e-5)
        assert ev[step]["eval_n"] == 3
    assert (out / "eval_predictions_step2.jsonl").read_text() == (single / "eval_predictions_step2.jsonl").read_text()
    assert not [p for p in out.rglob(".*tmp*")]  # one writer per file: no temporary left behind


def test_fsdp_checkpoint_holds_a_consolidated_adapter_beside_the_shards(fsdp):
    ckpt = fsdp / "checkpoint-2"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()  # resumable on M GPUs
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    from finetune.run_folder import checkpoint_problem

    assert checkpoint_problem(ckpt) is None


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_on_one_process(engine, task, single, request, tmp_path):
    """Stopped after step 2 on 2 processes, finished on 1: the same adapter as the uninterrupted run."""
    root, data = task
    ckpt = request.getfixturevalue(engine) / "checkpoint-2"
    cfg = load_recipe(RECIPE, [*data, *COMMON, "train.gradient_accumulation_steps=2", "data.eval_path=null",
                               "eval.generation_rows=0", f"train.resume={ckpt}", f"output.dir={tmp_path / 'r'}"])
    out = train(cfg, log=lambda *_: None)
    assert _max_diff(_adapter(out / "adapter"), _adapter(single / "adapter")) <= TOL
    from peft import PeftModel

    from finetune.models.cogvlm.modeling import CogVLMForCausalLM

    base = data[0].split("=", 1)[1]
    PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(base), str(out / "adapter"))  # loadable


def test_merge_is_the_same_whatever_the_number_of_processes(ddp, fsdp, single, tmp_path, monkeypatch):
    from adapters import merge as merge_mod
    from adapters import merge_verify

    monkeypatch.setattr(merge_mod, "verify_in_fresh_process", lambda f, p, d, q, log: {
        **merge_verify.verify_folder(f, p, d), "reload_seconds": 0.0})
    merged = {}
    for name, run in (("one", single), ("ddp", ddp), ("fsdp", fsdp)):
        rep = merge_mod.merge_adapter(run, tmp_path / name, log=lambda *_: None)
        assert rep.stats["max_abs_diff"] < 1e-4
        merged[name] = {k: v for f in sorted((tmp_path / name).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert _max_diff(merged["ddp"], merged["one"]) <= TOL
    assert _max_diff(merged["fsdp"], merged["one"]) <= TOL


# ---- the shipped accelerate configs ----

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
ENGINE_OF = {"single-gpu": "none", "ddp": "ddp", "fsdp": "fsdp", "fsdp-offload": "fsdp-offload",
             "fsdp-multinode": "fsdp", "zero2": "zero2", "zero2-offload": "zero2-offload", "zero3": "zero3",
             "zero3-offload": "zero3-offload"}


def test_the_expected_configs_are_shipped():
    assert SHIPPED == sorted(ENGINE_OF)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_parses_and_passes_its_checks(name):
    overrides = {"main_process_ip": "127.0.0.1"} if name == "fsdp-multinode" else {}
    cfg = read_launch_config(name, overrides)  # accelerate's own loader first: unknown keys are errors
    assert cfg.engine == ENGINE_OF[name]
    assert check_launch_config(cfg, deepspeed_available=True) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_dry_runs(name, task, capsys):
    """`cogtune launch CONFIG RECIPE --dry-run`: checks, per-GPU plan for the engine, the accelerate command."""
    import importlib.util

    _, data = task
    extra = ["--main_process_ip", "127.0.0.1"] if name == "fsdp-multinode" else []
    rc = launch_main([name, "tiny-demo", *data, "--dry-run", *extra])
    out, err = capsys.readouterr()
    if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        assert rc == 2 and "needs the deepspeed package" in err and "pip install deepspeed" in err
        assert "Traceback" not in err
        return
    assert rc == 0, err
    engine = ENGINE_OF[name]
    assert f"engine {engine}" in out and "memory plan" in out and "total" in out
    assert f"--config_file {CONFIG_DIR / (name + '.yaml')}" in out and "train.py tiny-demo" in out


def _multinode(**over):
    return read_launch_config(CONFIG_DIR / "fsdp-multinode.yaml", over)


@pytest.mark.parametrize("over, message", [
    ({}, "needs main_process_ip"),
    ({"main_process_ip": "no-such-host.invalid"}, "does not resolve"),
    ({"main_process_ip": "192.0.2.1"}, "is not an address of this machine"),  # TEST-NET-1: never local
    ({"main_process_ip": "127.0.0.1", "machine_rank": 2}, "machine_rank=2 must be between 0 and"),
    ({"main_process_ip": "127.0.0.1", "num_processes": 15}, "not a multiple of num_machines"),
])
def test_multinode_config_with_a_bad_address_is_an_error(over, message):
    problems = check_launch_config(_multinode(**over))
    assert any(message in p for p in problems), problems


def test_multinode_bad_address_stops_the_launch_before_anything_starts(task, capsys):
    _, data = task
    rc = launch_main(["fsdp-multinode", "tiny-demo", *data, "--main_process_ip", "no-such-host.invalid"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not resolve" in err and "command:" not in err


def test_deepspeed_hostfile_is_checked(tmp_path):
    cfg = read_launch_config(CONFIG_DIR / "zero3.yaml")
    cfg.raw["deepspeed_config"]["deepspeed_hostfile"] = str(tmp_path / "missing")
    assert any("does not exist" in p for p in check_launch_config(cfg, deepspeed_available=True))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nno-such-host.invalid slots=4\nbroken line\n")
    cfg.raw["deepspeed_config"]["deepspeed_hostfile"] = str(hostfile)
    problems = check_launch_config(cfg, deepspeed_available=True)
    assert any("hostfile:2: host 'no-such-host.invalid' does not resolve" in p for p in problems), problems
    assert any("hostfile:3: expected 'HOST slots=N'" in p for p in problems), problems
    hostfile.write_text("localhost slots=1\n")
    assert any("1 slots in all, num_processes is 2" in p for p in check_launch_config(cfg, deepspeed_available=True))


@pytest.mark.parametrize("name", ["zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_deepspeed_configs_resolve_to_the_zero_settings_they_promise(name):
    """What accelerate would hand DeepSpeed (its DeepSpeedPlugin, built without the deepspeed package)."""
    from finetune.distributed import deepspeed_settings

    zero = deepspeed_settings(read_launch_config(name))["zero_optimization"]
    assert zero["stage"] == int(name[4])
    assert zero["offload_optimizer"]["device"] == ("cpu" if "offload" in name else "none")
    assert zero["offload_param"]["device"] == ("cpu" if name == "zero3-offload" else "none")
    if name.startswith("zero3"):
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # the adapter is gathered on save


def test_deepspeed_absence_and_bad_settings_are_clear(tmp_path):
    cfg = read_launch_config(CONFIG_DIR / "zero3.yaml")
    (msg,) = check_launch_config(cfg, deepspeed_available=False)
    assert "pip install deepspeed" in msg and "fsdp.yaml" in msg
    cfg.raw["deepspeed_config"]["zero3_save_16bit_model"] = False
    assert any("zero3_save_16bit_model must be true" in p for p in check_launch_config(cfg, deepspeed_available=True))


def _naming_layer_classes(tmp_path, classes: str) -> Path:
    """The shipped fsdp.yaml with an explicit `fsdp_transformer_layer_cls_to_wrap` (it names none itself)."""
    path = tmp_path / "fsdp.yaml"
    text = (CONFIG_DIR / "fsdp.yaml").read_text()
    key = f"  fsdp_transformer_layer_cls_to_wrap: {classes}\n"
    path.write_text(text.replace("  fsdp_version: 2\n", "  fsdp_version: 2\n" + key))
    return path


def test_fsdp_config_naming_other_layer_classes_is_an_error(tmp_path):
    problems = check_launch_config(read_launch_config(_naming_layer_classes(tmp_path, "LlamaDecoderLayer,"
                                                                                      "TransformerLayer")))
    assert any("LlamaDecoderLayer" in p and "CogVLMDecoderLayer" in p and "remove the key" in p
               for p in problems), problems


def test_fsdp_config_naming_another_familys_layer_class_stops_the_launch(tmp_path, capsys):
    """A config written for CogVLM (CogVLMDecoderLayer) would stop accelerate at prepare on a CogAgent model."""
    root = tmp_path / "agent"
    base = make_tiny(1, root / "base", family="cogagent")
    config = _naming_layer_classes(tmp_path, "CogVLMDecoderLayer,TransformerLayer")
    assert check_launch_config(read_launch_config(config)) == []  # a layer class of some family
    rc = launch_main([str(config), "tiny-demo", f"model.checkpoint_dir={base}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "CogVLMDecoderLayer, not a layer class of the model" in err and "CogAgentDecoderLayer" in err


def _tiny_family_model(family: str):
    from finetune.models.cogagent.configuration import tiny_cogagent_config
    from finetune.models.cogagent.modeling import CogAgentForCausalLM
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.models.cogvlm2_video.configuration import tiny_video_config
    from finetune.models.cogvlm2_video.modeling import CogVLMVideoForCausalLM
    from finetune.tiny import _special_ids, tiny_config

    if family == "cogagent":
        return CogAgentForCausalLM(tiny_cogagent_config(_special_ids(1)))
    if family == "cogvlm2-video":
        return CogVLMVideoForCausalLM(tiny_video_config())
    return CogVLMForCausalLM(tiny_config(2))


@pytest.mark.parametrize("config", ["fsdp", "fsdp-offload", "fsdp-multinode"])
@pytest.mark.parametrize("family", ["cogvlm2", "cogagent", "cogvlm2-video"])
def test_shipped_fsdp_configs_wrap_one_unit_per_layer_of_every_family(config, family):
    """accelerate's own FSDP2 auto-wrap policy, built from the shipped config, on the peft-wrapped tiny model: one
    unit per decoder layer and per block of each vision tower (CogAgent's cross tower too)."""
    from collections import Counter

    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from peft import LoraConfig, get_peft_model

    fsdp = read_launch_config(config, {"main_process_ip": "127.0.0.1"}).raw["fsdp_config"]
    named = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=named.split(",") if named else None)
    model = _tiny_family_model(family)
    c = model.config
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r"model\.layers\.\d+\.mlp\.language_mlp\..*"))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, peft_model)
    units = Counter(type(m).__name__ for m in peft_model.modules() if policy(m))
    expected = {"CogAgentDecoderLayer" if family == "cogagent" else "CogVLMDecoderLayer": c.num_hidden_layers,
                "TransformerLayer": c.vision_config["num_hidden_layers"]}
    if family == "cogagent":
        expected["EVABlock"] = c.cross_vision_config["num_hidden_layers"]
    assert units == expected


def test_unknown_config_key_is_refused_by_accelerates_parser(tmp_path):
    bad = tmp_path / "ddp.yaml"
    bad.write_text((CONFIG_DIR / "ddp.yaml").read_text() + "num_proceses: 4\n")
    with pytest.raises(ValueError, match="num_proceses"):
        read_launch_config(bad)


def test_shipped_configs_stay_out_of_the_recipe_list():
    from finetune.config import shipped_recipes

    assert not set(SHIPPED) & set(shipped_recipes())


# ---- the memory plan by world size and engine ----

@pytest.fixture(scope="module")
def cogvlm2_plan():
    from finetune.models.cogvlm.configuration import CogVLMConfig
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.targets import memory_plan_for, resolve_targets

    ref = ROOT / "tests" / "assets" / "reference" / "configs" / "cogvlm2-llama3-chat-19B.config.json"
    with torch.device("meta"):
        model = CogVLMForCausalLM(CogVLMConfig(**json.loads(ref.read_text())))
    cfg = load_recipe(ROOT / "recipes" / "cogvlm2-lora.yaml")
    _, matches, _ = resolve_targets(cfg.lora.targets, model)
    matched = [n for hit in matches.values() for n in hit]

    def plan(world=1, engine="none"):
        p = memory_plan_for(model, cfg, matched, world=world, engine=engine)
        return p, {name: gib for name, gib, _ in p.rows}
    return plan


def test_sharding_engines_divide_what_they_shard(cogvlm2_plan):
    one, rows1 = cogvlm2_plan()
    weights = rows1["weights: rest (bfloat16)"]
    trainable = rows1["trainable: weights+grads+optimizer"]
    for n in (2, 4, 8):
        for engine in ("zero3", "fsdp"):
            plan, rows = cogvlm2_plan(n, engine)
            assert rows["weights: rest (bfloat16)"] == pytest.approx(weights / n)
            assert rows["trainable: weights+grads+optimizer"] == pytest.approx(trainable / n)
            assert 0 < rows["weights: gathered units"] < 2.5  # two layers (or lm_head + one), whole
            assert f"{engine} x{n}" in str(plan)
        _, z2 = cogvlm2_plan(n, "zero2")
        assert z2["weights: rest (bfloat16)"] == weights  # ZeRO-2 keeps every weight on every GPU
        assert z2["trainable: weights+grads+optimizer"] == pytest.approx(trainable * (4 + 12 / n) / 16)
    totals = [cogvlm2_plan(n, "fsdp")[0].total_gib for n in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and totals[-1] < one.total_gib / 3
    _, ddp = cogvlm2_plan(8, "ddp")
    assert ddp["trainable: DDP gradient buckets"] == pytest.approx(trainable / 4)
    _, off = cogvlm2_plan(8, "fsdp-offload")
    assert off["weights: rest (bfloat16)"] == 0 and "weights 4.54" in str(cogvlm2_plan(8, "fsdp-offload")[0])
    with pytest.raises(ValueError, match="engine 'zero4'"):
        cogvlm2_plan(2, "zero4")


def test_targets_verb_takes_gpus_and_engine(capsys):
    from finetune.distributed import split_plan_args
    from finetune.targets import main as targets_main

    assert split_plan_args(["r", "--gpus", "4", "--engine=zero3-offload"]) == (["r"], 4, "zero3-offload")
    assert split_plan_args(["r", "--gpus", "8", "--engine", "fsdp-multinode"]) == (["r"], 8, "fsdp")  # a config
    assert split_plan_args(["r", "--gpus", "2"]) == (["r"], 2, "ddp")
    assert targets_main(["cogvlm2-lora", "--gpus", "0"]) == 2
    assert "--gpus 0: give a whole number of GPUs >= 1" in capsys.readouterr().err


def test_readme_scaling_table_is_the_current_plan():
    from finetune.distributed import scaling_table

    table = scaling_table(ROOT / "tests" / "assets" / "reference" / "configs")
    assert table in (ROOT / "README.md").read_text(), "README 'Scaling out' table is stale; regenerate:\n" + table
