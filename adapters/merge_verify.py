"""Merge, step 3: prove the written folder right: probe inputs, logits of base + adapter vs the merged folder
reloaded in a fresh process, tolerances per dtype.

`python -m adapters.merge_verify FOLDER --probe FILE --report FILE` is the entry point the fresh process runs;
users do not call it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from finetune.run_folder import read_json

from .merge_load import load_base

QuantMode = Literal["nf4", "int8"]
REPO_ROOT = Path(__file__).resolve().parents[1]


# Tolerance on max |merged - (base + adapter)| over real (unpadded) probe positions, as a fraction of the
# reference logits' largest magnitude (at least 1). Merging rounds W + BA to the storage dtype once, where
# the unmerged model keeps W and adds BA x in higher precision; the gap is that rounding carried through
# the network. fp32 (unit roundoff 6e-8) leaves ~1e-6 relative on real depths, so 1e-4 only fails on a
# real merge error. fp16 (roundoff 4.9e-4) and bf16 (3.9e-3) round every weight by up to that fraction;
# measured on the tiny models it stays below a tenth of these bounds, and a wrong merge (a missing or
# doubled delta, a wrong scaling) moves logits by the adapter's whole effect, far above them.
MERGE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


# After bnb quantization the weights move by ~5-10% (nf4: 16 levels per block of 64) or ~1% (int8), so the
# repeated check catches gross errors only (lost keys, a quantized vision tower, wrong scales): the MEAN
# abs difference must stay under this fraction of the reference's mean magnitude, and numbers are printed.
QUANT_TOLERANCE = {"nf4": 0.5, "int8": 0.2}


PROBE_QUESTIONS = ("What is in this image?", "Describe the picture in one sentence.")


def probe_image(path: Path, size: int = 64) -> Path:
    """A deterministic colour-gradient PNG (no randomness, no download)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([x, y, 1.0 - (x + y) / 2], axis=-1) * 255
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def probe_conversations(image: Path) -> list[Any]:
    """Two image questions and one text-only row, so both experts and left padding are exercised."""
    from data_formats.schema import Conversation, Message

    rows = [Conversation(f"probe{i}", [str(image)], [Message("user", q)]) for i, q in enumerate(PROBE_QUESTIONS)]
    rows.append(Conversation("probe-text", [], [Message("user", "Say hello.")]))
    return rows


def build_probe(processor: Any, workdir: Path) -> dict[str, Any]:
    """Probe batch built by the run's processor (template, image span, transform): left padded, as at generation
    time, holding every input generate() takes (`model_input_names`, less what the model derives itself)."""
    from finetune.generation import generation_input_names
    from finetune.models.cogvlm.processing import CogVLMCollator

    convs = probe_conversations(probe_image(workdir / "probe.png"))
    collator = CogVLMCollator(processor.with_settings(max_length=None), padding_side="left",
                              add_generation_prompt=True)
    batch = collator(convs)
    return {k: batch[k] for k in generation_input_names(processor.model_input_names)}


def probe_keys(probe: dict[str, Any]) -> tuple[str, ...]:
    """What a probe file stores: the probe's model inputs (None ones left out) and the reference logits."""
    return (*(k for k, v in probe.items() if v is not None and k != "reference"), "reference")


def save_probe(path: Path, probe: dict[str, Any], reference: Any, template: str) -> None:
    """Probe batch + reference logits as safetensors: the verifying process never unpickles anything."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in {**probe, "reference": reference}.items() if k in probe_keys(probe)}
    save_file(tensors, str(path), metadata={"template": template})


def load_probe(path: Path) -> dict[str, Any]:
    """save_probe's file back (tensors only; a pickle or any other format is refused by safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"probe {path} is not a safetensors probe written by merge ({err}); "
                         "it was not loaded") from None
    return tensors  # a model input absent here (a text-only probe's images) is None for prepare_batch


def probe_logits(model: Any, probe: dict[str, Any]) -> Any:
    """(B, L, V) fp32 logits on CPU for the probe batch."""
    import torch

    from finetune.generation import prepare_batch

    with torch.no_grad():
        return model(**prepare_batch(model, probe)).logits.float().cpu()


def compare_logits(got: Any, ref: Any, mask: Any) -> dict[str, float]:
    """max/mean |got - ref| and top-1 agreement over unpadded positions; the reference's scale for tolerances."""
    keep = mask.bool()
    diff = (got - ref).abs()[keep]  # (N, V)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ref_max_abs": float(ref[keep].abs().max()), "ref_mean_abs": float(ref[keep].abs().mean()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1))[keep].float().mean())}


def passes(stats: dict[str, float], dtype: str, quant: QuantMode | None) -> tuple[bool, str]:
    """(ok, the rule applied as text) for a comparison."""
    if quant is None:
        bound = MERGE_TOLERANCE[dtype] * max(1.0, stats["ref_max_abs"])
        return stats["max_abs_diff"] <= bound, f"max abs diff <= {bound:.3g} ({dtype} tolerance)"
    bound = QUANT_TOLERANCE[quant] * stats["ref_mean_abs"]
    return stats["mean_abs_diff"] <= bound, f"mean abs diff <= {bound:.3g} ({quant} tolerance)"


def verify_in_fresh_process(folder: Path, probe_file: Path, dtype: str, quant: QuantMode | None,
                            log: Callable[[str], None]) -> dict[str, Any]:
    """Reload `folder` in a new Python process (strict keys, its own tokenizer and template) and compare logits."""
    report = probe_file.with_suffix(f".{quant or 'merged'}.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "adapters.merge_verify", str(folder), "--probe", str(probe_file),
           "--report", str(report), "--dtype", dtype, "--parent-pid", str(os.getpid())]
    cmd += ["--quant", quant] if quant else []
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)  # the child ties itself to us
    if proc.returncode != 0 or not report.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"the written folder {folder} failed to reload in a fresh process:\n{tail}")
    result = json.loads(report.read_text())
    result["reload_seconds"] = round(time.time() - t0, 1)
    return result


def format_stats(label: str, s: dict[str, Any]) -> str:
    return (f"{label}: max abs diff {s['max_abs_diff']:.3e}, mean abs diff {s['mean_abs_diff']:.3e} "
            f"(reference logits: max |x| {s['ref_max_abs']:.2f}, mean |x| {s['ref_mean_abs']:.3f}), "
            f"top-1 agreement {100 * s['top1_agreement']:.1f}%")


def tie_to_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """End this process when `parent_pid` (the merge) dies: a killed merge leaves no verifier running.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); everywhere: a daemon
    thread polls the parent id (it changes when the parent dies) as a fallback.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="cogtune-parent-watch").start()


def verify_folder(folder: Path, probe_file: Path, dtype: str) -> dict[str, Any]:
    """Load `folder` as a user would (strict keys, its processor: tokenizer, processor_config.json, else the
    cogtune.json template); compare; generate."""
    from finetune.generation import generate_answers
    from finetune.models.cogvlm.processing import CogVLMProcessor

    probe = load_probe(probe_file)  # first: a bad probe fails before the model loads
    model = load_base(folder, dtype)  # quantized folders carry their quantization_config
    processor = CogVLMProcessor.from_pretrained(
        folder, template_version=read_json(folder / "cogtune.json").get("template_version"))
    stats = compare_logits(probe_logits(model, probe), probe["reference"], probe["attention_mask"])
    convs = probe_conversations(Path(probe_file).with_name("probe.png"))
    stats["probe_answer"] = generate_answers(model, processor, convs[:1], max_new_tokens=8)[0]
    return stats


def verify_main(argv: list[str]) -> int:
    """Entry point of the fresh verification process: writes verify_folder's numbers to --report."""
    p = argparse.ArgumentParser(prog="python -m adapters.merge")
    p.add_argument("folder")
    p.add_argument("--probe", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--quant", default=None)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    if args.parent_pid is not None:
        tie_to_parent(args.parent_pid)
    stats = verify_folder(Path(args.folder), Path(args.probe), args.dtype)
    Path(args.report).write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(verify_main(sys.argv[1:]))
