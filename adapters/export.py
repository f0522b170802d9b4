"""`cogtune export RUN_OR_ADAPTER_DIR --format {peft,merged,bnb-4bit,bnb-8bit} --out DIR`.

  peft      the adapter alone (PEFT files + tokenizer) plus `cogtune.json` (template, base, recipe metadata),
            so `chat`/`predict` on another machine use the template it was trained with;
  merged    exactly `cogtune merge` (official layout, fresh-process logits check);
  bnb-4bit  merged in high precision and verified first, then quantized with bitsandbytes (nf4 / int8) and
  bnb-8bit  checked again against base + adapter with a looser tolerance. Only the decoder's linears are
            quantized: the model class keeps the vision tower, GLU adapter and lm_head in full precision
            (merging into a quantized model loses the delta, so quantization comes last: docs/architecture.md §19.11).
Every format is written beside the output and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.run_folder import AdapterSource, resolve_adapter

from .merge import DTYPES, merge_adapter
from .merge_write import check_output, clean_stale, publish, staging_dir, stale_candidates

FORMATS = ("peft", "merged", "bnb-4bit", "bnb-8bit")


def export_peft(src: AdapterSource, out: Path, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Adapter files + tokenizer + cogtune.json (the run's metadata) + the resolved recipe when there is one."""
    check_output(out, force, [src.adapter_dir])
    clean_stale(stale_candidates(out.parent), log)
    staging = staging_dir(out)
    try:
        for f in sorted(src.adapter_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, staging / f.name)
        recipe = src.run_dir / "recipe.resolved.yaml" if src.run_dir else None
        if recipe is not None and recipe.is_file():
            shutil.copy2(recipe, staging / "recipe.resolved.yaml")
        meta = {k: v for k, v in src.meta.items() if k != "format"}
        info = {"format": "peft", **meta}
        if "template_version" not in info:
            log(f"warning: {src.adapter_dir} has no run metadata; cogtune.json cannot record its template")
        (staging / "cogtune.json").write_text(json.dumps(info, indent=2) + "\n")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote adapter export {out} (template '{info.get('template_version', '?')}', base "
        f"{info.get('base_checkpoint', '?')})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune export", description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="base checkpoint (default: the one recorded in run.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="merge dtype; for bnb also the compute dtype (default: the base's saved dtype)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--force-base", action="store_true",
                   help="merge even when the base's weights differ from those the adapter was trained on")
    args = p.parse_args(argv)
    try:
        src = resolve_adapter(args.source)
        if args.format == "peft":
            export_peft(src, Path(args.out), force=args.force)
        else:
            quant = {"merged": None, "bnb-4bit": "nf4", "bnb-8bit": "int8"}[args.format]
            merge_adapter(src, args.out, base=args.base, dtype=args.dtype, force=args.force,
                          force_base=args.force_base, quantize=quant,
                          max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
