"""Numerical parity of `finetune.models.cogvlm.modeling.CogVLMForCausalLM` against the OFFICIAL CogVLM2 remote code.

Not part of the test suite: the official code is not vendored (clean-room rule) and is not available in CI.
This script contains only our own code; it imports the official files from a folder you supply.

Getting the official files (keep them OUTSIDE this repository, e.g. /tmp/official):
    From the Hugging Face repo THUDM/cogvlm2-llama3-chat-19B download
        modeling_cogvlm.py  visual.py  configuration_cogvlm.py  (util.py: optional, not used - see below)
    e.g. `huggingface-cli download THUDM/cogvlm2-llama3-chat-19B modeling_cogvlm.py visual.py util.py \
          configuration_cogvlm.py --local-dir /tmp/official`
    (GitHub copy of the same code: Niky-san/cogvlm2_surce; its modeling_cogvlm.py wraps every decoder layer in
    torch.utils.checkpoint - harmless for this forward-only comparison, but the HF file is the reference.)

Runtime scaffolding supplied here (ours, test-only), so the official code runs on a CPU box:
  * `xformers.ops.memory_efficient_attention` -> SDPA on the (B, L, H, D) layout (non-causal, given scale).
  * `<pkg>.util.FastRotaryEmbedding` (the official one is a Triton kernel) -> pure torch with the same math:
    persistent fp32 `inv_freq = base^(-2k/d)`, position ramp in the dtype of `inv_freq` when
    `pos_idx_in_fp32=False`, cos/sin cast to the activation dtype, gathered by `position_ids`, GPT-NeoX
    half-split rotation computed in fp32 and rounded once to the input dtype (as the Triton kernel does).
    An official util.py in the folder is ignored.
  * `torchvision.transforms` (imported, only used by build_conversation_input_ids) and, if einops is not
    installed, `einops.rearrange` for the one pattern the forward uses.
No transformers-version shims are applied to the official code.

Usage:
    .venv/bin/python bench/parity_official.py --official-dir /tmp/official [--seed 0] [--no-bf16]

Prints max/mean |logits diff| (and |loss diff|) per case; exits 1 if any gated fp32 case exceeds --tol (1e-4).
bf16 rows are informational: expect ~1 bf16 ulp of the logits. On unpadded input it comes from our RoPE rotating
in bf16 (x*cos + rotate_half(x)*sin, three roundings) where the official kernel rotates in fp32 and rounds once;
padded input adds the official eager fp32-softmax path vs our SDPA (docs/architecture.md §9.4).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PKG = "cogvlm2_official"
PAD_ID = 128002  # hard-coded padding_idx / image placeholder of the official CogVLM2 code
BOS_ID = 128000
EOS_ID = 128001
VOCAB = 128256  # the official embedding hard-codes padding_idx=128002, so the tiny vocab must be the real one


# ----------------------------------------------------------------------------------------------------------------
# Scaffolding for the official code (ours)
# ----------------------------------------------------------------------------------------------------------------


def memory_efficient_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_bias: Any = None,
    p: float = 0.0,
    scale: float | None = None,
    **_: Any,
) -> torch.Tensor:
    """xformers-compatible attention on (B, L, H, D) tensors via SDPA on (B, H, L, D)."""
    if attn_bias is not None:
        raise NotImplementedError("attn_bias is not used by the official vision tower")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
    return out.transpose(1, 2)


class FastRotaryEmbedding(nn.Module):
    """Pure-torch stand-in for the official Triton `FastRotaryEmbedding` (docs/architecture.md §10)."""

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        interleaved: bool = False,
        scale_base: float | None = None,
        pos_idx_in_fp32: bool = True,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if interleaved or scale_base is not None:
            raise NotImplementedError("only the non-interleaved, non-xpos variant is used by CogVLM2")
        self.dim = dim
        self.base = float(base)
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)
        self._cache: tuple[int, torch.dtype, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, seqlen: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._cache
        if c is None or seqlen > c[0] or c[1] != dtype or c[2] != device:
            if self.pos_idx_in_fp32:
                t = torch.arange(seqlen, device=device, dtype=torch.float32)
                inv_freq = self.inv_freq.float()
            else:
                t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)  # ramp in inv_freq dtype
                inv_freq = self.inv_freq
            freqs = torch.outer(t, inv_freq)  # (seqlen, dim/2)
            self._cache = (seqlen, dtype, device, torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        return self._cache[3], self._cache[4]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)  # half-split (GPT-NeoX) layout
        c, s = cos.float(), sin.float()
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, max_seqlen: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (B, Hq, L, D), k: (B, Hk, L, D), position_ids: (B, L)."""
        seqlen = int(max_seqlen) if max_seqlen is not None else int(position_ids.max()) + 1
        cos, sin = self._cos_sin(seqlen, q.dtype, q.device)
        cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]  # (B, 1, L, D/2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def _rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    if pattern.replace(" ", "") != "bnd->(bn)d":
        raise NotImplementedError(f"einops stub only supports 'b n d -> (b n) d', got {pattern!r}")
    return x.reshape(-1, x.shape[-1])


def install_stubs() -> list[str]:
    """Register the scaffolding modules in sys.modules; returns the names to drop again after the import.

    transformers is imported first: it probes for torchvision with importlib and must not see our stub.
    """
    import transformers  # noqa: F401

    temporary = []
    xformers = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    xformers.ops = ops
    sys.modules["xformers"], sys.modules["xformers.ops"] = xformers, ops
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms
        temporary += ["torchvision", "torchvision.transforms"]
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = _rearrange
        sys.modules["einops"] = einops
        temporary.append("einops")
    return temporary


def load_official(official_dir: Path) -> types.ModuleType:
    """Import the official modeling_cogvlm.py as `cogvlm2_official.modeling_cogvlm` with our util stub."""
    for name in ("modeling_cogvlm.py", "visual.py", "configuration_cogvlm.py"):
        if not (official_dir / name).is_file():
            raise SystemExit(f"{official_dir / name} not found; see this script's docstring for how to get it")
    temporary = install_stubs()
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [str(official_dir)]
    sys.modules[PKG] = pkg
    util = types.ModuleType(f"{PKG}.util")
    util.FastRotaryEmbedding = FastRotaryEmbedding
    sys.modules[f"{PKG}.util"] = util
    try:
        return importlib.import_module(f"{PKG}.modeling_cogvlm")
    finally:
        for name in temporary:  # the official module keeps its references; nobody else should see the stubs
            sys.modules.pop(name, None)


# ----------------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------------


def build_models(official: types.ModuleType, seed: int) -> tuple[nn.Module, nn.Module, Any]:
    """Seeded random official model; our model gets its state dict with strict=True. Returns (official, ours, cfg)."""
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import tiny_config

    ours_cfg = tiny_config(2, vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    off_cfg = official.CogVLMConfig(
        vocab_size=ours_cfg.vocab_size,
        hidden_size=ours_cfg.hidden_size,
        intermediate_size=ours_cfg.intermediate_size,
        num_hidden_layers=ours_cfg.num_hidden_layers,
        num_attention_heads=ours_cfg.num_attention_heads,
        num_multi_query_heads=ours_cfg.num_multi_query_heads,
        max_position_embeddings=ours_cfg.max_position_embeddings,
        rms_norm_eps=ours_cfg.rms_norm_eps,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        vision_config=dict(ours_cfg.vision_config),
    )
    torch.manual_seed(seed)
    ref = official.CogVLMForCausalLM(off_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # randomise everything (norm weights, biases, boi/eoi, cls) for a stronger check
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or name.endswith("norm1.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    ours = CogVLMForCausalLM(ours_cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # itself checks key/shape compatibility
    return ref, ours, ours_cfg


@dataclass
class Case:
    name: str
    batch: dict[str, Any]  # official layout: input_ids, token_type_ids, attention_mask, images, [labels]
    gated: bool = True
    note: str = ""


def _row(n_text: int, image: bool, n_img_tokens: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    ids, types_ = [BOS_ID], [0]
    if image:
        ids += [PAD_ID] * n_img_tokens
        types_ += [1] * n_img_tokens
    ids += torch.randint(0, 128000, (n_text,), generator=gen).tolist()
    types_ += [0] * n_text
    return ids, types_


def _batch(rows: list[tuple[int, bool]], cfg: Any, gen: torch.Generator, pad: str = "right") -> dict[str, Any]:
    n_img = cfg.image_tokens
    built = [_row(n, img, n_img, gen) for n, img in rows]
    width = max(len(ids) for ids, _ in built)
    ids_t = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    tt = torch.zeros_like(ids_t)
    am = torch.zeros_like(ids_t)
    for b, (ids, types_) in enumerate(built):
        sl = slice(0, len(ids)) if pad == "right" else slice(width - len(ids), width)
        ids_t[b, sl], tt[b, sl], am[b, sl] = torch.tensor(ids), torch.tensor(types_), 1
    s = cfg.vision_config["image_size"]
    images = [[torch.randn(3, s, s, generator=gen)] if img else [] for _, img in rows]
    return {"input_ids": ids_t, "token_type_ids": tt, "attention_mask": am, "images": images}


def _with_labels(batch: dict[str, Any], answer_len: int) -> dict[str, Any]:
    labels = torch.full_like(batch["input_ids"], -100)
    for b in range(labels.shape[0]):
        real = batch["attention_mask"][b].nonzero().squeeze(1)
        ans = real[-answer_len:]
        labels[b, ans] = batch["input_ids"][b, ans]
    return {**batch, "labels": labels}


def build_cases(cfg: Any, seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(seed + 1)
    padded = _batch([(12, True), (5, True)], cfg, gen)
    return [
        Case("a: 1 row, BOS+image+text", _batch([(10, True)], cfg, gen)),
        Case("b: 2 rows right-padded", padded),
        Case("b2: image row + text-only row", _batch([(9, True), (4, False)], cfg, gen)),
        Case("c: text-only", _batch([(16, False)], cfg, gen)),
        Case("d: labels (batch b)", _with_labels(padded, 4)),
        Case("e: long text-only (L=600)", _batch([(599, False)], cfg, gen)),
        Case("f: 2 rows left-padded", _batch([(12, True), (5, True)], cfg, gen, pad="left"), gated=False,
             note="ours deliberately drops the official +1 position shift (docs/architecture.md §8.1)"),
    ]


def _cast(batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = dict(batch)
    out["images"] = [[img.to(dtype) for img in row] for row in batch["images"]]
    return out


@torch.no_grad()
def compare(ref: nn.Module, ours: nn.Module, case: Case, dtype: torch.dtype) -> dict[str, float]:
    """Run both models on one case; diffs over real (attention_mask == 1) positions only."""
    batch = _cast(case.batch, dtype)
    r = ref(**batch, use_cache=False, return_dict=True)
    o = ours(**batch, use_cache=False, loss_only=False)
    keep = batch["attention_mask"].bool()
    diff = (r.logits.float() - o.logits.float()).abs()[keep]  # (N_real, V)
    res = {"max": diff.max().item(), "mean": diff.mean().item(), "ref_scale": r.logits.abs().max().item()}
    if "labels" in batch:
        res["loss_ref"] = r.loss.item()
        res["loss_diff"] = abs(r.loss.item() - o.loss.item())
        lo = ours(**batch, use_cache=False, loss_only=True)  # our logits-free training path
        res["loss_only_diff"] = abs(r.loss.item() - lo.loss.item())
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", type=Path, required=True, help="folder with the official CogVLM2 files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="fp32 max |logits diff| gate")
    parser.add_argument("--no-bf16", action="store_true", help="skip the informational bf16 run")
    args = parser.parse_args(argv)

    official = load_official(args.official_dir.resolve())
    ref, ours, cfg = build_models(official, args.seed)
    cases = build_cases(cfg, args.seed)
    print(f"tiny CogVLM2: H={cfg.hidden_size} layers={cfg.num_hidden_layers} heads={cfg.num_attention_heads}/"
          f"{cfg.num_multi_query_heads} vocab={cfg.vocab_size} image_tokens={cfg.image_tokens}; state_dict strict OK")

    failed = []
    runs = [(torch.float32, "fp32")] + ([] if args.no_bf16 else [(torch.bfloat16, "bf16")])
    header = f"{'dtype':5} {'case':36} {'max|dlogit|':>12} {'mean|dlogit|':>13} {'|dloss|':>10} {'gate':>6}"
    print(header)
    print("-" * len(header))
    for dtype, tag in runs:
        ref.to(dtype)
        ours.to(dtype)
        for case in cases:
            res = compare(ref, ours, case, dtype)
            gated = dtype == torch.float32 and case.gated
            ok = res["max"] <= args.tol and res.get("loss_diff", 0.0) <= args.tol
            verdict = ("ok" if ok else "FAIL") if gated else "info"
            if gated and not ok:
                failed.append(case.name)
            loss = f"{res['loss_diff']:.2e}" if "loss_diff" in res else "-"
            print(f"{tag:5} {case.name:36} {res['max']:12.3e} {res['mean']:13.3e} {loss:>10} {verdict:>6}")
            if "loss_diff" in res:
                print(f"{'':5}   loss ref {res['loss_ref']:.6f}; loss_only path |dloss| {res['loss_only_diff']:.2e}")
            if case.note:
                print(f"{'':5}   note: {case.note}")
        print(f"{'':5}   (max |logit| of the reference ~{res['ref_scale']:.2f})")
    if failed:
        print(f"FAIL: fp32 parity above {args.tol:g} in: {', '.join(failed)}")
        return 1
    print(f"fp32 parity within {args.tol:g} on all gated cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
