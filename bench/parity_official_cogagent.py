"""Numerical parity of `finetune.models.cogagent.modeling.CogAgentForCausalLM` against the OFFICIAL CogAgent code.

Not part of the test suite: the official code is not vendored (clean-room rule). This script holds only our own
code; it imports the official files from a folder you supply (keep it OUTSIDE this repository):

    modeling_cogagent.py       the cogagent-chat-hf remote code (Hugging Face THUDM/cogagent-chat-hf, main)
    configuration_cogagent.py  same repository
    visual.py, cross_visual.py same repository (the EVA2-CLIP-E and EVA02-CLIP-L towers)

Runtime scaffolding supplied here (ours, test-only) so the official code runs on a CPU box without its extras:
  * `xformers.ops.memory_efficient_attention` -> SDPA on the (B, L, H, D) layout (non-causal, given scale);
  * `einops.rearrange` / `repeat` for the few patterns the official files use;
  * `timm.models.layers` (`drop_path`, `to_2tuple`, `trunc_normal_`; only used at construction);
  * `torchvision.transforms` when torchvision is absent (only build_conversation_input_ids uses it).
The official cross tower hard-codes EVA02-CLIP-L (width 1024, 24 blocks); to run it at tiny size this script
replaces the constructor of its `Eva2LargeEncoder` with one that builds the same tower through the official
`_build_vision_tower` with the tiny widths. Forward code is untouched. apex is not needed (the official files
fall back to torch LayerNorm).

The official state dict lists the shared 2-D RoPE table once per block as well (every block holds the same
module); the checkpoints store it once, so those per-block copies are dropped before our strict load.

Cases are batch 1: the official code cannot run batched prefill (its (B, 1) cross mask only broadcasts for B=1).

Usage:
    .venv/bin/python bench/parity_official_cogagent.py --official-dir /tmp/official_cogagent [--seed 0] [--no-bf16]

Prints max/mean |logits diff| and |loss diff| per case; exits 1 if a gated fp32 case exceeds --tol (1e-4).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PKG = "cogagent_official"
FILES = ("modeling_cogagent.py", "configuration_cogagent.py", "visual.py", "cross_visual.py")


# ----------------------------------------------------------------------------------------------------------------
# Scaffolding for the official code (ours)
# ----------------------------------------------------------------------------------------------------------------


def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any = None,
                               p: float = 0.0, scale: float | None = None, **_: Any) -> torch.Tensor:
    """xformers-compatible attention on (B, L, H, D) tensors via SDPA on (B, H, L, D)."""
    if attn_bias is not None:
        raise NotImplementedError("attn_bias is not used by the official towers")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale).transpose(1, 2)


def _rearrange(x: torch.Tensor, pattern: str, **axes: int) -> torch.Tensor:
    p = pattern.replace(" ", "")
    if p == "bnd->(bn)d":
        return x.reshape(-1, x.shape[-1])
    if p == "...(dr)->...dr":
        return x.unflatten(-1, (-1, axes["r"]))
    if p == "...dr->...(dr)":
        return x.flatten(-2)
    raise NotImplementedError(f"einops stub: unsupported pattern {pattern!r}")


def _repeat(x: torch.Tensor, pattern: str, **axes: int) -> torch.Tensor:
    if pattern.replace(" ", "") == "...n->...(nr)":
        return x.repeat_interleave(axes["r"], dim=-1)
    raise NotImplementedError(f"einops stub: unsupported pattern {pattern!r}")


def _to_2tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    if drop_prob:
        raise NotImplementedError("drop_path is 0 in CogAgent")
    return x


def install_stubs() -> list[str]:
    """Register the scaffolding modules in sys.modules; returns the names to drop again after the import."""
    import transformers  # noqa: F401  (probes for torchvision itself; must not see our stub)

    temporary = []

    def add(name: str, **attrs: Any) -> None:
        mod = types.ModuleType(name)
        for k, v in attrs.items():
            setattr(mod, k, v)
        sys.modules[name] = mod
        temporary.append(name)

    add("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    add("xformers", ops=sys.modules["xformers.ops"])
    if importlib.util.find_spec("einops") is None:
        add("einops", rearrange=_rearrange, repeat=_repeat)
    if importlib.util.find_spec("timm") is None:
        layers = dict(drop_path=_drop_path, to_2tuple=_to_2tuple, trunc_normal_=nn.init.trunc_normal_)
        add("timm.models.layers", **layers)
        add("timm.models", layers=sys.modules["timm.models.layers"])
        add("timm", models=sys.modules["timm.models"])
    if importlib.util.find_spec("torchvision") is None:
        add("torchvision.transforms")
        add("torchvision", transforms=sys.modules["torchvision.transforms"])
    return temporary


def load_official(official_dir: Path) -> types.ModuleType:
    """Import the official modeling_cogagent.py as `cogagent_official.modeling_cogagent`."""
    missing = [n for n in FILES if not (official_dir / n).is_file()]
    if missing:
        raise SystemExit(f"{official_dir}: missing {', '.join(missing)}; see this script's docstring")
    temporary = install_stubs()
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [str(official_dir)]
    sys.modules[PKG] = pkg
    try:
        return importlib.import_module(f"{PKG}.modeling_cogagent")
    finally:
        for name in temporary:
            sys.modules.pop(name, None)


def shrink_cross_tower(cross: dict[str, Any]) -> None:
    """Make the official `Eva2LargeEncoder` build the tiny tower (its sizes are constants in the official file)."""
    cv = sys.modules[f"{PKG}.cross_visual"]

    def init(self: nn.Module, image_size: int = 224) -> None:
        nn.Module.__init__(self)
        self.config = {
            "embed_dim": cross["embed_dim"],
            "vision_cfg": {
                "image_size": image_size, "layers": cross["num_hidden_layers"], "width": cross["hidden_size"],
                "drop_path_rate": 0, "head_width": cross["hidden_size"] // cross["num_heads"],
                "mlp_ratio": cross["intermediate_size"] / cross["hidden_size"], "patch_size": cross["patch_size"],
                "eva_model_name": "eva-clip-l-14-336", "xattn": True, "fusedLN": True, "rope": True,
                "pt_hw_seq_len": cross["pt_hw_seq_len"], "intp_freq": True, "naiveswiglu": True, "subln": True,
            },
        }
        self.model = cv._build_vision_tower(**self.config)

    cv.Eva2LargeEncoder.__init__ = init


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------


def build_models(official: types.ModuleType, seed: int) -> tuple[nn.Module, nn.Module, Any]:
    """Seeded random official model; ours gets its state dict with strict=True. Returns (official, ours, cfg)."""
    from finetune.models.cogagent.configuration import tiny_cogagent_config
    from finetune.models.cogagent.modeling import CogAgentForCausalLM

    cfg = tiny_cogagent_config({"vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    shrink_cross_tower(cfg.cross_vision_config)
    off_cfg = official.CogAgentConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, cross_hidden_size=cfg.cross_hidden_size,
        cross_compute_hidden_size=cfg.cross_compute_hidden_size, cross_image_size=cfg.cross_image_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vision_config=dict(cfg.vision_config),
    )
    torch.manual_seed(seed)
    ref = official.CogAgentForCausalLM(off_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # randomise everything (norms, biases, boi/eoi, cls, pos_embeds) for a stronger check
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.rsplit(".", 1)[-1] == "weight" and p.dim() == 1:  # every norm's scale
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    state = {k: v for k, v in ref.state_dict().items() if ".attn.rope." not in k}  # per-block copies of the table
    ours = CogAgentForCausalLM(cfg).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours, cfg


def check_official_load(ours: nn.Module, ref: nn.Module) -> str:
    """Save ours in the official layout (what merge writes) and load the files into the official model."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp, max_shard_size="200KB")
        state: dict[str, torch.Tensor] = {}
        for shard in Path(tmp).glob("*.safetensors"):
            state.update(load_file(str(shard)))
    missing, unexpected = ref.load_state_dict(state, strict=False)
    extra = [k for k in missing if ".attn.rope." not in k]  # per-block views of the one stored table
    if extra or unexpected:
        raise SystemExit(f"official load: missing {extra[:5]}, unexpected {unexpected[:5]}")
    return f"{len(state)} tensors, none missing or unexpected (besides {len(missing)} per-block rope views)"


def make_case(cfg: Any, n_text: int, gen: torch.Generator, image: bool = True, answer: int = 0) -> dict[str, Any]:
    ids, tt = [cfg.bos_token_id], [0]
    if image:
        ids += [cfg.pad_token_id] * cfg.image_tokens
        tt += [1] * cfg.image_tokens
    ids += torch.randint(3, cfg.vocab_size, (n_text,), generator=gen).tolist()
    tt += [0] * n_text
    s, cs = cfg.vision_config["image_size"], cfg.cross_image_size
    batch = {
        "input_ids": torch.tensor([ids]), "token_type_ids": torch.tensor([tt]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "images": [[torch.randn(3, s, s, generator=gen)]] if image else [[]],
        "cross_images": [[torch.randn(3, cs, cs, generator=gen)]] if image else [[]],
    }
    if answer:
        labels = torch.full_like(batch["input_ids"], -100)
        labels[0, -answer:] = batch["input_ids"][0, -answer:]
        batch["labels"] = labels
    return batch


def ours_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Official List[List[Tensor]] images -> our (N, 3, S, S) tensors."""
    out = dict(batch)
    for key in ("images", "cross_images"):
        flat = [t for row in batch[key] for t in row]
        out[key] = torch.stack(flat) if flat else None
    return out


def cast(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = dict(batch)
    for key in ("images", "cross_images"):
        out[key] = [[t.to(dtype) for t in row] for row in batch[key]]
    return out


@torch.no_grad()
def compare(ref: nn.Module, ours: nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, float]:
    batch = cast(batch, dtype)
    r = ref(**batch, use_cache=False, return_dict=True, output_attentions=False, output_hidden_states=False)
    o = ours(**ours_inputs(batch), use_cache=False, loss_only=False)
    diff = (r.logits.float() - o.logits.float()).abs()
    res = {"max": diff.max().item(), "mean": diff.mean().item(), "scale": r.logits.abs().max().item()}
    if "labels" in batch:
        res["loss_diff"] = abs(r.loss.item() - o.loss.item())
        res["loss_ref"] = r.loss.item()
    return res


@torch.no_grad()
def compare_generation(ref: nn.Module, ours: nn.Module, batch: dict[str, Any], steps: int) -> float:
    """Greedy decode `steps` tokens with each model's own KV cache (cross K/V cached); max |dlogit| over steps."""
    worst = 0.0
    r_out = ref(**batch, use_cache=True, return_dict=True, output_attentions=False, output_hidden_states=False)
    o_out = ours(**ours_inputs(batch), use_cache=True, loss_only=False)
    r_cache, o_cache = r_out.past_key_values, getattr(o_out, "cache", None) or o_out.past_key_values
    ids, tt, am = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    from finetune.token_types import build_position_ids

    for _ in range(steps):
        worst = max(worst, (r_out.logits[:, -1].float() - o_out.logits[:, -1].float()).abs().max().item())
        nxt = r_out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, nxt), dim=1)
        tt = torch.cat((tt, torch.zeros_like(nxt)), dim=1)
        am = torch.cat((am, torch.ones_like(nxt)), dim=1)
        pos = build_position_ids(tt, am)[:, -1:]
        r_out = ref(input_ids=nxt, token_type_ids=tt[:, -1:], position_ids=pos, attention_mask=am,
                    past_key_values=r_cache, use_cache=True, return_dict=True, output_attentions=False,
                    output_hidden_states=False)
        r_cache = r_out.past_key_values
        o_out = ours(input_ids=nxt, token_type_ids=tt, attention_mask=am, cache=o_cache, use_cache=True,
                     loss_only=False)
    return max(worst, (r_out.logits[:, -1].float() - o_out.logits[:, -1].float()).abs().max().item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=Path, required=True, help="folder with the official CogAgent files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="fp32 gate for max |dlogit| and |dloss|")
    parser.add_argument("--no-bf16", action="store_true", help="skip the informational bf16 run")
    args = parser.parse_args(argv)

    official = load_official(args.official_dir.resolve())
    ref, ours, cfg = build_models(official, args.seed)
    cv = cfg.cross_vision_config
    print(f"tiny CogAgent: H={cfg.hidden_size} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads} "
          f"image_tokens={cfg.image_tokens} cross {cfg.cross_image_size}px grid {cfg.cross_grid}x{cfg.cross_grid} "
          f"width {cv['hidden_size']} blocks {cv['num_hidden_layers']} (last skipped); state_dict strict OK")
    print(f"our saved checkpoint loads into the official model: {check_official_load(ours, ref)}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    cases = [
        ("a: BOS+image+text", make_case(cfg, 10, gen), True),
        ("b: labels (answer 4)", make_case(cfg, 12, gen, answer=4), True),
        ("c: long text after image (L=300)", make_case(cfg, 293, gen, answer=8), True),
    ]
    failed = []
    header = f"{'dtype':5} {'case':36} {'max|dlogit|':>12} {'mean|dlogit|':>13} {'|dloss|':>10} {'gate':>6}"
    print(header)
    print("-" * len(header))
    # Cached decoding first, in fp32: a bf16 run would leave the official rotary cos/sin cache (built once, in the
    # dtype of its first call) and both models' inv_freq buffers rounded to bf16.
    worst = compare_generation(ref, ours, cases[0][1], steps=5)
    ok = worst <= args.tol
    verdict = "ok" if ok else "FAIL"
    print(f"fp32  {'g: prefill + 5 cached decode steps':36} {worst:12.3e} {'':>13} {'-':>10} {verdict:>6}")
    if not ok:
        failed.append("g: cached decoding")
    for dtype, tag in [(torch.float32, "fp32")] + ([] if args.no_bf16 else [(torch.bfloat16, "bf16")]):
        ref.to(dtype)
        ours.to(dtype)
        for module in ref.modules():  # the official rotary caches cos/sin of its first call: rebuild them in this
            if hasattr(module, "max_seq_len_cached"):  # dtype, as a model loaded in it would (from its inv_freq)
                module.max_seq_len_cached = 0
        for name, batch, gated in cases:
            res = compare(ref, ours, batch, dtype)
            gated = gated and dtype == torch.float32
            ok = res["max"] <= args.tol and res.get("loss_diff", 0.0) <= args.tol
            if gated and not ok:
                failed.append(name)
            loss = f"{res['loss_diff']:.2e}" if "loss_diff" in res else "-"
            verdict = ("ok" if ok else "FAIL") if gated else "info"
            print(f"{tag:5} {name:36} {res['max']:12.3e} {res['mean']:13.3e} {loss:>10} {verdict:>6}")
        print(f"{'':5}   (max |logit| of the reference ~{res['scale']:.2f})")
    if not args.no_bf16:  # where the bf16 difference comes from: switch the cross branch off in both models
        with torch.no_grad():
            for model in (ref, ours):
                for layer in model.model.layers:
                    layer.cross_attn.dense.weight.zero_()
        res = compare(ref, ours, cases[0][1], torch.bfloat16)
        print(f"bf16  {'a without the cross branch':36} {res['max']:12.3e} {res['mean']:13.3e} {'-':>10} {'info':>6}")
        print("        (the official cross-attention adds 1.0 to bf16 scores on an eager path; ours is SDPA)")
    if failed:
        print(f"FAIL: fp32 parity above {args.tol:g} in: {', '.join(failed)}")
        return 1
    print(f"fp32 parity within {args.tol:g} on all gated cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
