"""Scaling out through accelerate: the shipped launch configs, their checks, and what training needs under
DDP, FSDP and DeepSpeed ZeRO (one writer per file, sharded weights gathered before they are written).

    cogtune launch CONFIG RECIPE [--dry-run] [--num_processes N] [--main_process_ip IP] [--machine_rank R] [k=v ...]

CONFIG is a file or the name of one in recipes/accelerate/. The config is checked (accelerate's own parser,
then what would otherwise fail late or silently: DeepSpeed missing, an unreachable or foreign main address,
a missing hostfile), the per-GPU memory plan for its engine and world size is printed, then
`accelerate launch --config_file CONFIG train.py RECIPE ...` runs (`--dry-run`: printed, not run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .memory import _ENGINES

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "accelerate"
# Engines the memory plan knows: how the weights, gradients and optimizer state are spread over the GPUs.
ENGINES = _ENGINES


def wrap_classes(model_class: type | None = None) -> tuple[str, ...]:
    """The FSDP wrap units of a model class (of every family when None): its `_no_split_modules`, one decoder
    layer and one block of each vision tower. The shipped FSDP configs name no classes, so accelerate wraps these,
    read off the model being trained (CogAgent's `CogAgentDecoderLayer` and cross-tower `EVABlock` included)."""
    from .models import FAMILIES
    from .models import model_class as family_model_class

    classes = [model_class] if model_class is not None else [family_model_class(f) for f in FAMILIES.values()]
    return tuple(dict.fromkeys(name for cls in classes for name in cls._no_split_modules))


@dataclass
class LaunchConfig:
    """An accelerate config file as the kit reads it."""

    path: Path
    engine: str  # one of ENGINES
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int | None
    raw: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return max(1, self.num_processes)


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the name of a shipped config (`fsdp` -> recipes/accelerate/fsdp.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{Path(name).name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"accelerate config {name}: no such file, and not a shipped config ({names})")


def engine_of(raw: dict) -> str:
    """The memory-plan engine of an accelerate config dict."""
    kind = str(raw.get("distributed_type", "NO")).upper().removeprefix("DISTRIBUTEDTYPE.")
    if kind == "FSDP":
        offload = str((raw.get("fsdp_config") or {}).get("fsdp_offload_params", False)).lower() == "true"
        return "fsdp-offload" if offload else "fsdp"
    if kind == "DEEPSPEED":
        ds = raw.get("deepspeed_config") or {}
        stage = int(ds.get("zero_stage", 2))
        offload = str(ds.get("offload_optimizer_device", "none")).lower() not in ("none", "", "null")
        return f"zero{stage}" + ("-offload" if offload else "")
    if kind.startswith("MULTI_"):
        return "ddp"
    return "none"


def read_launch_config(path: str | Path, overrides: dict[str, Any] | None = None) -> LaunchConfig:
    """Parse with accelerate's own loader (unknown keys and a missing distributed_type are its errors), then
    apply command-line overrides (num_processes, main_process_ip, machine_rank, ...)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    path = resolve_config_path(path)
    try:
        load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: accelerate cannot read it: {err}") from None
    raw = yaml.safe_load(path.read_text()) or {}
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    port = raw.get("main_process_port")
    return LaunchConfig(path=path, engine=engine_of(raw), num_processes=int(raw.get("num_processes") or 1),
                        num_machines=int(raw.get("num_machines") or 1),
                        machine_rank=int(raw.get("machine_rank") or 0), main_process_ip=raw.get("main_process_ip"),
                        main_process_port=None if port is None else int(port), raw=raw)


def _is_local(ip: str) -> bool:
    """An address of this host: a socket can bind to it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def check_launch_config(cfg: LaunchConfig, deepspeed_available: bool | None = None,
                        layer_classes: tuple[str, ...] | None = None) -> list[str]:
    """Every problem of a launch config at once (empty: it can start). Each names the key and the fix.

    `layer_classes`: the wrap units of the model to train (`wrap_classes(model_class)`); None checks a config
    that names classes against every family's."""
    raw, where = cfg.raw, str(cfg.path)
    problems: list[str] = []
    if deepspeed_available is None:
        deepspeed_available = importlib.util.find_spec("deepspeed") is not None
    if cfg.engine.startswith("zero"):
        ds = raw.get("deepspeed_config") or {}
        if not deepspeed_available:
            problems.append(f"{where}: distributed_type DEEPSPEED needs the deepspeed package, which is not installed "
                            "(it is optional for cogtune). Install it on a CUDA machine (`pip install deepspeed`), or "
                            "use recipes/accelerate/fsdp.yaml, which shards like ZeRO-3 with torch alone.")
        try:
            deepspeed_settings(cfg)
        except (ValueError, TypeError, KeyError) as err:
            problems.append(f"{where}: deepspeed_config: accelerate cannot build a DeepSpeed config from it: {err}")
        if int(ds.get("zero_stage", 0)) not in (2, 3):
            problems.append(f"{where}: deepspeed_config.zero_stage is {ds.get('zero_stage')!r}; use 2 or 3")
        if int(ds.get("zero_stage", 0)) == 3 and str(ds.get("zero3_save_16bit_model", False)).lower() != "true":
            problems.append(f"{where}: deepspeed_config.zero3_save_16bit_model must be true under ZeRO-3: without it "
                            "the adapter cannot be gathered into one file when it is saved")
        hostfile = ds.get("deepspeed_hostfile")
        if hostfile:
            problems += _hostfile_problems(Path(hostfile), where, cfg)
    if cfg.engine.startswith("fsdp"):
        fsdp = raw.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            problems.append(f"{where}: fsdp_config.fsdp_version is {fsdp.get('fsdp_version', 1)}; the kit is tested "
                            "with FSDP2 (fully_shard): set fsdp_version: 2")
        classes = [c.strip() for c in str(fsdp.get("fsdp_transformer_layer_cls_to_wrap", "")).split(",") if c.strip()]
        known = wrap_classes() if layer_classes is None else layer_classes
        unknown = [c for c in classes if c not in known]
        if fsdp.get("fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP" and unknown:
            # accelerate would stop at prepare ("Could not find the transformer layer class ...")
            problems.append(f"{where}: fsdp_config.fsdp_transformer_layer_cls_to_wrap names {', '.join(unknown)}, "
                            f"not a layer class of the model ({', '.join(known)}); remove the key: accelerate then "
                            "wraps the model's own layer classes")
        if str(fsdp.get("fsdp_state_dict_type", "SHARDED_STATE_DICT")) != "SHARDED_STATE_DICT":
            problems.append(f"{where}: fsdp_config.fsdp_state_dict_type must be SHARDED_STATE_DICT: checkpoints stay "
                            "sharded (resumable on another number of GPUs) and the kit gathers the adapter itself")
    if cfg.num_processes < 1:
        problems.append(f"{where}: num_processes is {cfg.num_processes}; give the total number of processes (GPUs) "
                        "over all machines, e.g. --num_processes 8")
    if cfg.num_machines > 1:
        problems += _multinode_problems(cfg, where)
    elif cfg.engine != "none" and cfg.num_processes < 2:
        problems.append(f"{where}: {cfg.engine} with num_processes={cfg.num_processes} is a single-process run; pass "
                        "--num_processes N (one per GPU) or use recipes/accelerate/single-gpu.yaml")
    return problems


def deepspeed_settings(cfg: LaunchConfig) -> dict:
    """The DeepSpeed config accelerate would hand to DeepSpeed for this launch config (built by accelerate's own
    DeepSpeedPlugin, which needs no deepspeed package): ZeRO stage, offload devices, gather-on-save."""
    from accelerate.utils import DeepSpeedPlugin

    ds = cfg.raw.get("deepspeed_config") or {}
    keys = ("zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag",
            "zero3_save_16bit_model", "gradient_clipping")
    plugin = DeepSpeedPlugin(**{k: ds[k] for k in keys if k in ds})
    return plugin.deepspeed_config


def _multinode_problems(cfg: LaunchConfig, where: str) -> list[str]:
    out = []
    if cfg.num_processes % cfg.num_machines:
        out.append(f"{where}: num_processes={cfg.num_processes} is not a multiple of num_machines={cfg.num_machines} "
                   "(num_processes counts the processes of all machines together)")
    if not 0 <= cfg.machine_rank < cfg.num_machines:
        out.append(f"{where}: machine_rank={cfg.machine_rank} must be between 0 and num_machines-1 "
                   f"({cfg.num_machines - 1}); give each machine its own with --machine_rank")
    if not cfg.main_process_port or not 0 < cfg.main_process_port < 65536:
        out.append(f"{where}: main_process_port is {cfg.main_process_port!r}; give a free TCP port on machine 0, "
                   "e.g. --main_process_port 29500")
    ip = cfg.main_process_ip
    if not ip:
        out.append(f"{where}: num_machines={cfg.num_machines} needs main_process_ip, the address of machine 0 as the "
                   "others reach it: pass --main_process_ip ADDRESS")
        return out
    try:
        addresses = sorted({info[4][0] for info in socket.getaddrinfo(ip, None, proto=socket.IPPROTO_TCP)})
    except (socket.gaierror, UnicodeError) as err:
        out.append(f"{where}: main_process_ip {ip!r} does not resolve ({err}); give machine 0's address or a host "
                   "name every machine can resolve")
        return out
    if cfg.machine_rank == 0 and not any(_is_local(a) for a in addresses):
        out.append(f"{where}: main_process_ip {ip!r} ({', '.join(addresses)}) is not an address of this machine, but "
                   "machine_rank is 0: machine 0 serves the rendezvous on that address. Run this on the machine that "
                   "owns it, or pass this machine's --machine_rank")
    return out


def _hostfile_problems(path: Path, where: str, cfg: LaunchConfig) -> list[str]:
    if not path.is_file():
        return [f"{where}: deepspeed_config.deepspeed_hostfile {path} does not exist; write one line per machine "
                "('host slots=GPUS') or remove the key"]
    out, slots = [], 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        n = [p.removeprefix("slots=") for p in parts[1:] if p.startswith("slots=")]
        if len(parts) < 2 or not n or not n[0].isdigit():
            out.append(f"{path}:{i}: expected 'HOST slots=N', got {line!r}")
            continue
        try:
            socket.getaddrinfo(parts[0], None)
        except (socket.gaierror, UnicodeError):
            out.append(f"{path}:{i}: host {parts[0]!r} does not resolve")
        slots += int(n[0])
    if not out and slots != cfg.num_processes:
        out.append(f"{path}: the hostfile has {slots} slots in all, num_processes is {cfg.num_processes}; make them "
                   "equal")
    return out


# ---- inside a training process ----

def enable_fsdp_on_cpu() -> bool:
    """Let accelerate's FSDP plugin run on CPU processes (gloo), as torch's FSDP2 does; True when it applied.

    accelerate (1.15) turns `distributed_type: FSDP` into FSDP only for accelerator devices; CPU processes
    stay plain DDP (MULTI_CPU) and the FSDP settings are dropped without a word. torch's fully_shard runs on
    CPU tensors over gloo, so on a host without GPUs the state is switched to FSDP after accelerate set it up:
    the same code path as on GPUs, exercised by the CPU tests.
    """
    import torch

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or torch.cuda.is_available():
        return False
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_cogtune_cpu_fsdp", False):
        return True
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._cogtune_cpu_fsdp = True
    AcceleratorState.__init__ = init
    # rank 0 loading alone and broadcasting needs a device mesh on an accelerator; every rank loads on CPU
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return True


def full_tensor(p) -> Any:
    """The whole value of a parameter that may be sharded (FSDP2 DTensor, DeepSpeed ZeRO-3); every rank must call
    this for the same parameters in the same order (it is a collective when sharded). Returns a CPU tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        return p.full_tensor().detach().cpu()
    if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().clone().cpu()
    return p.detach().cpu()


def gathered_trainable_state(model) -> dict[str, Any]:
    """{name: whole tensor} of every trainable parameter, gathered when sharded (a collective: call on every rank).

    Names are the model's own (a PeftModel's `base_model.model....lora_A.default.weight`), which is what
    `PeftModel.save_pretrained(state_dict=...)` expects.
    """
    return {n: full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- `cogtune launch`, `cogtune targets --gpus N --engine E` ----

def split_plan_args(argv: list[str]) -> tuple[list[str], int, str]:
    """(argv without them, world, engine) from `--gpus N` and `--engine E` (a shipped config's name works too)."""
    rest, world, engine = [], 1, None
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if key in ("--gpus", "--engine"):
            val = val if eq else next(it, None)
            if val is None:
                raise ValueError(f"{key} needs a value")
            if key == "--gpus":
                if not val.isdigit() or int(val) < 1:
                    raise ValueError(f"--gpus {val}: give a whole number of GPUs >= 1")
                world = int(val)
            else:
                engine = val
        else:
            rest.append(a)
    if engine is not None and engine not in ENGINES:
        try:  # a shipped config's name (fsdp, zero3-offload, ddp, single-gpu ...)
            engine = read_launch_config(engine).engine
        except (ValueError, FileNotFoundError):
            raise ValueError(f"--engine {engine}: use one of {', '.join(ENGINES)}") from None
    if engine is None:
        engine = "ddp" if world > 1 else "none"
    return rest, world, engine


_LAUNCH_KEYS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def launch_command(cfg: LaunchConfig, recipe_args: list[str], overrides: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg.path)]
    for key in _LAUNCH_KEYS:
        if overrides.get(key) is not None:
            cmd += [f"--{key}", str(overrides[key])]
    return cmd + [str(REPO / "train.py"), *recipe_args]


def meta_model_for(recipe_args: list[str]) -> Any:
    """The recipe's model on the meta device (no weights read): its layer classes and memory plan."""
    from .config import load_recipe
    from .loading import build_meta_model

    recipe, *kv = recipe_args
    return build_meta_model(load_recipe(recipe, kv).model.checkpoint_dir)


def plan_for(recipe_args: list[str], world: int, engine: str, model: Any = None) -> str:
    """The recipe's per-GPU memory plan under `engine` on `world` GPUs (meta-device model: no weights read)."""
    from .config import load_recipe
    from .loading import build_meta_model
    from .targets import memory_plan_for, resolve_targets

    recipe, *kv = recipe_args
    cfg = load_recipe(recipe, kv)
    model = build_meta_model(cfg.model.checkpoint_dir) if model is None else model
    _, matches, _ = resolve_targets(cfg.lora.targets, model)
    return str(memory_plan_for(model, cfg, [n for hit in matches.values() for n in hit], world=world, engine=engine))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cogtune launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="accelerate config file, or a shipped one's name (" + ", ".join(
        p.stem for p in sorted(CONFIG_DIR.glob("*.yaml"))) + ")")
    parser.add_argument("recipe", help="recipe file or shipped recipe name, then key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan and command; do not start")
    for key in _LAUNCH_KEYS:
        parser.add_argument(f"--{key}", type=int if key in ("num_processes", "num_machines", "machine_rank",
                                                            "main_process_port") else str)
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; recipe values are given as key=value")
    overrides = {k: getattr(args, k) for k in _LAUNCH_KEYS}
    try:
        cfg = read_launch_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recipe_args = [args.recipe, *rest]
    try:
        model = meta_model_for(recipe_args)
    except (ValueError, FileNotFoundError) as err:
        model, recipe_error = None, err
    problems = check_launch_config(cfg, layer_classes=None if model is None else wrap_classes(type(model)))
    if problems:
        print("error: the launch config cannot start:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    if model is None:
        print(f"error: {recipe_error}", file=sys.stderr)
        return 2
    print(f"launch: {cfg.path.name}: engine {cfg.engine}, {cfg.num_processes} process(es) on {cfg.num_machines} "
          f"machine(s)")
    try:
        print(plan_for(recipe_args, cfg.world, cfg.engine, model))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmd = launch_command(cfg, recipe_args, overrides)
    print("command: " + shlex.join(cmd))
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


# ---- training-side pieces: saving from sharded weights, evaluation on every rank ----

def is_sharded(model) -> bool:
    """True when some parameter holds only this rank's shard (FSDP2 DTensor, DeepSpeed ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (the values themselves in a single process)."""
    import torch
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def save_adapter(model, folder: str | Path, extra_names: list[str], is_main: bool) -> None:
    """Write the peft adapter (and bare extra parameters, e.g. boi/eoi) consolidated into `folder`.

    Under sharding every rank takes part in gathering the trained weights (collectives), then rank 0 alone
    writes; without sharding rank 0 writes straight from its own copy. Call it on every rank.
    """
    folder = Path(folder)
    state = gathered_trainable_state(model) if is_sharded(model) else None
    extra = {n: full_tensor(_base_model(model).get_parameter(n)) for n in extra_names} if state is not None else None
    if not is_main:
        return
    if state is None:
        model.save_pretrained(str(folder))
    else:
        model.save_pretrained(str(folder), state_dict=state)
    if extra_names:
        _write_extra(folder, extra if extra is not None else
                     {n: _base_model(model).get_parameter(n).detach().cpu() for n in extra_names})


def save_extra_params(model, names: list[str], folder: str | Path, is_main: bool) -> None:
    """Bare trained parameters (boi/eoi) into `folder`: gathered on every rank when sharded, written by rank 0."""
    if not names:
        return
    base = _base_model(model)
    tensors = {n: full_tensor(base.get_parameter(n)) for n in names}  # collective when sharded
    if is_main:
        _write_extra(Path(folder), tensors)


def _write_extra(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    from .extra_params import FILENAME

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FILENAME}.tmp"
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
    tmp.replace(folder / FILENAME)


def _base_model(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class ConsolidatedAdapterCallback(TrainerCallback):
    """Under sharding the Trainer's checkpoint holds the weights as per-rank shards only; this adds the
    adapter as one consolidated file (adapter_model.safetensors + adapter_config.json), as an unsharded
    run writes it, so every checkpoint can be verified, merged, and resumed on another number of GPUs.
    Add it before CheckpointCallback (the manifest comes last)."""

    def __init__(self, model) -> None:
        self.model = model

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        if not is_sharded(self.model):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_adapter(self.model, folder, [], state.is_world_process_zero)
        if optimizer is not None and not (folder / "optimizer.pt").exists():
            import torch

            plain = plain_optimizer_state(self.model, optimizer)  # collective
            if state.is_world_process_zero:
                tmp = folder / ".optimizer.pt.tmp"
                torch.save(plain, tmp)
                tmp.replace(folder / "optimizer.pt")
        barrier()


def plain_optimizer_state(model, optimizer) -> dict:
    """The whole optimizer state of a sharded model in torch.optim's own layout (parameters numbered in
    param-group order), as an unsharded run's `optimizer.pt` holds it. A collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index: dict[str, int] = {}
    groups = []
    for group in full.get("param_groups", []):  # only rank 0 receives the gathered state
        ids = []
        for fqn in group["params"]:
            index.setdefault(fqn, len(index))
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    return {"state": {index[fqn]: value for fqn, value in full.get("state", {}).items() if fqn in index},
            "param_groups": groups}


def load_consolidated_adapter(model, folder: str | Path) -> bool:
    """Resume an FSDP checkpoint in a run without FSDP (e.g. 2 GPUs -> 1): load its consolidated adapter.

    The Trainer refuses such a folder (its weights are per-rank shards); the consolidated adapter and the
    plain optimizer.pt beside them hold the same state. Returns False when `folder` is not one of those.
    """
    folder = Path(folder)
    adapter = folder / "adapter_model.safetensors"
    if not ((folder / "pytorch_model_fsdp_0").is_dir() and adapter.is_file()):
        return False
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(adapter)))
    return True



def evaluate_on_every_rank(model, examples: list | None, collator, convs: list, processor, max_new_tokens: int,
                           rows: int, batch_size: int = 4, gen_batch_size: int = 8):
    """(eval loss, generation metrics, samples) with the work split over the ranks and the results gathered.

    Every rank runs the same number of forward passes (under FSDP/ZeRO-3 a forward is a collective): batches
    are dealt round-robin and a rank without a batch of its own in a round repeats batch 0 and discards it;
    generation runs with `synced_gpus` when sharded, so ranks whose rows finished keep stepping. Only rank 0
    gets the metrics and samples (others get None for them).
    """
    import torch

    from .generation import generate_answers, score

    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    loss = None
    if examples:
        starts = list(range(0, len(examples), batch_size))
        rounds = -(-len(starts) // world)
        with torch.no_grad():
            for r in range(rounds):
                k = r * world + rank
                real = k < len(starts)
                if not real and world == 1:
                    break
                s = starts[k] if real else 0
                batch = collator(examples[s:s + batch_size])
                batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
                out = model(**batch, loss_only=True, num_items_in_batch=1)  # summed over label tokens
                if real:
                    total += float(out.loss)
                    count += int((batch["labels"][:, 1:] != -100).sum())
        total, count = sum_across_ranks([total, count])
        loss = total / max(count, 1)
    convs = [c for c in convs if c.messages and c.messages[-1].role == "assistant"][:rows]
    metrics, samples = {}, []
    if convs:
        mine = list(range(rank, len(convs), world))
        per_rank = -(-len(convs) // world)
        padded = mine + [0] * (per_rank - len(mine))  # equal work per rank; the padding rows are dropped
        preds = generate_answers(model, processor, [convs[i] for i in padded], max_new_tokens=max_new_tokens,
                                 batch_size=gen_batch_size, synced=is_sharded(model) and world > 1)
        gathered = all_gather_objects(list(zip(mine, preds[:len(mine)])))
        if rank == 0:
            by_index = dict(pair for part in gathered for pair in part)
            preds = [by_index[i] for i in range(len(convs))]
            refs = [c.messages[-1].content for c in convs]
            metrics = score(preds, refs)
            samples = [{"id": c.id, "prediction": p, "reference": ref} for c, p, ref in zip(convs, preds, refs)]
    model.train(was_training)
    if rank != 0:
        return loss, None, None
    return loss, metrics, samples


# ---- the README's scaling table ----

# Shipped full-size recipes and the official config.json their plan is computed from.
PLAN_RECIPES = {
    "cogvlm2-lora": "cogvlm2-llama3-chat-19B",
    "cogvlm2-qlora-24gb": "cogvlm2-llama3-chat-19B",
    "cogvlm2-vision-expert": "cogvlm2-llama3-chat-19B",
    "cogvlm2-dpo": "cogvlm2-llama3-chat-19B",
    "cogvlm-chat-lora": "cogvlm-chat-hf",
    "cogvlm-grounding-lora": "cogvlm-grounding-generalist-hf",
}
# (column title, engine, GPUs)
PLAN_COLUMNS = (("1 GPU", "none", 1), ("ZeRO-3/FSDP x2", "fsdp", 2), ("ZeRO-3/FSDP x4", "fsdp", 4),
                ("ZeRO-3/FSDP x8", "fsdp", 8), ("ZeRO-2 x8", "zero2", 8), ("FSDP-offload x8", "fsdp-offload", 8))


def scaling_table(config_dir: str | Path) -> str:
    """Markdown table: the per-GPU memory plan (GiB) of every shipped full-size recipe by engine and GPU count.

    `config_dir` holds `<model>.config.json` files (official configs; the model is built on the meta device).
    """
    import json

    import torch

    from .config import load_recipe
    from .models.cogvlm.configuration import CogVLMConfig
    from .models.cogvlm.modeling import CogVLMForCausalLM
    from .targets import memory_plan_for, resolve_targets

    lines = ["| recipe | model | " + " | ".join(c[0] for c in PLAN_COLUMNS) + " |",
             "|---|---|" + "---:|" * len(PLAN_COLUMNS)]
    models: dict[str, Any] = {}
    for recipe, ref in PLAN_RECIPES.items():
        cfg = load_recipe(recipe)
        if ref not in models:
            with torch.device("meta"):
                models[ref] = CogVLMForCausalLM(CogVLMConfig(**json.loads(
                    (Path(config_dir) / f"{ref}.config.json").read_text())))
        model = models[ref]
        _, matches, _ = resolve_targets(cfg.lora.targets, model)
        matched = [n for hit in matches.values() for n in hit]
        cells = [f"{memory_plan_for(model, cfg, matched, world=n, engine=engine).total_gib:.1f}"
                 for _, engine, n in PLAN_COLUMNS]
        lines.append(f"| {recipe} | {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
