"""`cogtune merge RUN_OR_ADAPTER_DIR --out DIR`: adapter + base -> one checkpoint in the official layout, verified.

Why each step (docs/architecture.md §19.11):
  * the base is read from run.json / cogtune.json, so nothing is repeated on the command line, and it is
    checked (family version, config hash, weight fingerprint, image tokens, every adapter key against a base
    Linear of the right shape) before any weight is loaded: merging onto the wrong base "works" and gives
    garbage, and two checkpoints with the same config.json (another seed, another fine-tune) differ only in
    their weights, hence the fingerprint (`finetune.loading.base_fingerprint`; --force-base overrides);
  * the base is loaded UNquantized in the chosen dtype even for QLoRA adapters: peft cannot merge into
    4-bit weights without rounding the delta away, and a deployable checkpoint is high precision first;
  * weights are written as sharded safetensors + `model.safetensors.index.json` with the official keys,
    next to the base's config.json (official fields, `torch_dtype` set), generation_config.json, the
    tokenizer, every other base file (remote code `*.py`, README) and `cogtune.json` (template, origin);
  * everything is written to a hidden folder beside the output and renamed at the very end, after the
    merged folder was reloaded in a FRESH process (strict keys, its own tokenizer) and its logits on
    probe inputs matched base + adapter. A failure or Ctrl-C leaves no output; an existing output is
    replaced only with --force. Staging folders carry a marker file; a later run removes those whose merge
    was killed (the process that made them is gone) and reports any hidden folder it cannot attribute;
  * the probe is stored as safetensors (never a pickle), and the verifying process dies with its parent.

The steps live in their own modules: finding the adapter and its base (`finetune.run_folder`), checking and
loading (`merge_load`), writing and publishing (`merge_write`), verifying (`merge_verify`, whose
`python -m adapters.merge_verify` is the entry point of the fresh process). This module runs them in order.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.run_folder import AdapterSource, resolve_adapter, resolve_base

from .merge_load import attach_adapters, check_adapters, load_base, load_processor_for, stored_dtype
from .merge_verify import (
    MERGE_TOLERANCE,
    QuantMode,
    build_probe,
    compare_logits,
    format_stats,
    passes,
    probe_logits,
    save_probe,
    verify_in_fresh_process,
)
from .merge_write import (
    SKIP_BASE_FILES,
    WEIGHT_SUFFIXES,
    check_output,
    checkpoint_keys,
    clean_stale,
    parse_size,
    publish,
    staging_dir,
    stale_candidates,
    work_dir,
    write_shards,
    write_side_files,
)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class MergeReport:
    out: Path
    dtype: str
    stats: dict[str, Any]
    adapter_effect: float
    quant_stats: dict[str, Any] | None = None


def merge_adapter(
    source: str | Path | AdapterSource,
    out: str | Path,
    *,
    base: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
    force_base: bool = False,
    quantize: QuantMode | None = None,
    max_shard_size: str = "5GB",
    log: Callable[[str], None] = print,
) -> MergeReport:
    """Merge, write the official layout, verify in a fresh process, then publish `out` (see module docstring).

    `dtype`: bfloat16 / float16 / float32 (default: the dtype the base was saved in). `quantize`: additionally
    quantize the verified merged weights with bitsandbytes (vision tower and GLU adapter stay unquantized).
    `force` replaces an existing output; `force_base` accepts a base whose weights differ from the recorded ones.
    """
    import torch

    src = source if isinstance(source, AdapterSource) else resolve_adapter(source)
    out = Path(out)
    base_dir = resolve_base(src, base)
    check_output(out, force, [base_dir, src.adapter_dir])
    clean_stale(stale_candidates(out.parent), log)
    check_adapters([("default", src)], base_dir, force_base=force_base, log=log)  # before any weight is read
    dtype = DTYPES.get(dtype, dtype) if dtype else stored_dtype(base_dir)
    if dtype not in MERGE_TOLERANCE:
        raise ValueError(f"dtype {dtype!r} is not one of bf16, fp16, fp32")
    if src.meta.get("quant_mode", "none") != "none":
        log(f"note: the adapter was trained on a {src.meta['quant_mode']}-quantized base (QLoRA); it is merged "
            f"into the UNquantized base in {dtype}, and verified against that")
    if not src.meta:
        log(f"warning: {src.adapter_dir} has no run.json/cogtune.json; family and config hash cannot be checked, "
            "only that every adapter tensor fits a base layer")

    staging = staging_dir(out)
    hp_dir = staging_dir(out, "merged") if quantize else staging
    work = work_dir()
    try:
        # ---- Base + adapter (reference) ----
        t0 = time.time()
        model = load_base(base_dir, dtype)
        config = model.config
        model = attach_adapters(model, [("default", src)], base_dir)
        processor = load_processor_for(src, base_dir, config)  # tokenizer, template, image span: saved beside
        template = processor.template_version
        log(f"loaded base {base_dir} (CogVLM{config.cogvlm_version}, {dtype}, unquantized) + adapter "
            f"{src.adapter_dir} in {time.time() - t0:.1f}s; template '{template}'")
        probe = build_probe(processor, work)
        reference = probe_logits(model, probe)
        with model.disable_adapter():
            base_logits = probe_logits(model, probe)
        effect = compare_logits(reference, base_logits, probe["attention_mask"])["max_abs_diff"]
        save_probe(work / "probe.safetensors", probe, reference, template)

        # ---- Merge and write ----
        merged = model.merge_and_unload()
        state = merged.state_dict()
        expected = checkpoint_keys(base_dir)
        if expected and set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise RuntimeError(f"merged keys differ from the base checkpoint's: extra {extra[:5]}, missing "
                               f"{missing[:5]}; the merge left adapter modules behind")
        info = {"format": "merged", "family_version": config.cogvlm_version, "template_version": template,
                "image_tokens": config.image_tokens, "dtype": dtype, "base_checkpoint": str(base_dir.resolve()),
                "adapter": str(src.adapter_dir.resolve()), "adapter_meta": src.meta}
        write_shards(state, hp_dir, parse_size(max_shard_size))
        del state, merged, model
        write_side_files(hp_dir, base_dir, processor, dtype, info)

        # ---- Verify (fresh process) ----
        stats = verify_in_fresh_process(hp_dir, work / "probe.safetensors", dtype, None, log)
        ok, rule = passes(stats, dtype, None)
        noise = MERGE_TOLERANCE[dtype] * max(1.0, stats["ref_max_abs"])
        if ok and effect > noise:  # the merge must carry the adapter, not just stay near the base
            ok = stats["max_abs_diff"] <= 0.5 * effect
            rule += f" and <= half the adapter's effect ({0.5 * effect:.3g})"
        log(format_stats("merged vs base+adapter", stats) + f"; adapter effect on logits: max {effect:.3e}")
        if effect <= noise:
            log(f"WARNING: the adapter moves the probe logits by at most {effect:.3g}, within {dtype} merge noise "
                f"({noise:.3g}): this check cannot tell a correct merge from one that lost the adapter. "
                "Re-run with --dtype fp32 to verify it.")
        log(f"fresh-process reload: strict keys OK, probe answer {stats['probe_answer']!r} "
            f"({stats['reload_seconds']}s)")
        if not ok:
            raise RuntimeError(f"verification FAILED: {rule} does not hold; the merged weights differ from base + "
                               "adapter. Nothing was written to the output.")
        log(f"verification passed: {rule}")
        quant_stats = None

        # ---- Optional bnb quantization of the verified merge ----
        if quantize:
            from finetune.config import QuantSection
            from finetune.loading import to_bnb_config
            from finetune.models import model_class_for

            bnb = to_bnb_config(QuantSection(mode=quantize), getattr(torch, dtype),
                                model_class_for(config).full_precision_modules)
            qmodel = load_base(hp_dir, dtype, quantization_config=bnb)
            qmodel.save_pretrained(str(staging), max_shard_size=max_shard_size)
            del qmodel
            for f in hp_dir.iterdir():
                if not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in ("config.json", *SKIP_BASE_FILES):
                    shutil.copy2(f, staging / f.name)
            qinfo = {**info, "format": f"bnb-{'4bit' if quantize == 'nf4' else '8bit'}", "quant_mode": quantize}
            (staging / "cogtune.json").write_text(json.dumps(qinfo, indent=2) + "\n")
            quant_stats = verify_in_fresh_process(staging, work / "probe.safetensors", dtype, quantize, log)
            ok, rule = passes(quant_stats, dtype, quantize)
            log(format_stats(f"{quantize} export vs base+adapter", quant_stats))
            if not ok:
                raise RuntimeError(f"quantized verification FAILED: {rule} does not hold. Nothing was written.")
            log(f"quantized verification passed: {rule}")

        publish(staging, out)
        log(f"wrote {out}")
        return MergeReport(out, dtype, stats, effect, quant_stats)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if hp_dir != staging:
            shutil.rmtree(hp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune merge", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="run folder (run.json + adapter/) or adapter folder")
    p.add_argument("--base", default=None, help="base checkpoint (default: the one recorded in run.json)")
    p.add_argument("--out", required=True, help="output folder (written beside, renamed when verified)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: the dtype the base was saved in)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--force-base", action="store_true",
                   help="merge even when the base's weights differ from those the adapter was trained on")
    args = p.parse_args(argv)
    try:
        merge_adapter(args.source, args.out, base=args.base, dtype=args.dtype, force=args.force,
                      force_base=args.force_base, max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
