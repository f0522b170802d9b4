"""`cogtune predict --model DIR [--adapter [NAME=]DIR ...] DATA.jsonl --out PRED.jsonl`: batched answers + metrics.

Generation is `finetune.generation.generate_answers` (left padding, correct masks; a batch gives the same
answers as one row at a time), so numbers here match the trainer's generation eval. When rows end with an
assistant turn it is the reference: exact match, and for Cog boxes parse rate and IoU@0.5, are printed and
written beside the predictions with `.jsonl` replaced by `.metrics.json` (`--out pred.jsonl` ->
`pred.metrics.json`). Several adapters can share one base (`--adapter a=DIR --adapter b=DIR`); `--use NAME`
picks one without reloading the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.run_folder import AdapterSource, read_json, resolve_adapter

from .merge import DTYPES
from .merge_load import attach_adapters, check_adapters, load_base, load_tokenizer_for, stored_dtype, use_adapter


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, AdapterSource]]:
    """['name=DIR' or 'DIR', ...] -> [(name, source)]; one unnamed adapter is called 'default'."""
    out: list[tuple[str, AdapterSource]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if len(specs) > 1:
                raise ValueError(f"--adapter {spec}: name each adapter when giving several (--adapter NAME=DIR)")
            name, path = "default", spec
        if not name.isidentifier():
            raise ValueError(f"--adapter {spec}: adapter name {name!r} must be a Python identifier")
        if name in dict(out):
            raise ValueError(f"--adapter {spec}: the name {name!r} is used twice")
        out.append((name, resolve_adapter(path)))
    return out


class InferenceModel:
    """A base model with zero or more named adapters; switches adapters (and their templates) in place."""

    def __init__(self, model_dir: str | Path, adapter_specs: list[str] | None = None, dtype: str | None = None,
                 tokenizer_dir: str | Path | None = None, *, force_base: bool = False, log=None):
        from finetune.loading import check_checkpoint_dir, require_folder
        from finetune.models import load_config

        self.model_dir = check_checkpoint_dir(model_dir)
        if tokenizer_dir is not None:
            require_folder(tokenizer_dir, "--tokenizer-dir")
        self.adapters = parse_adapter_specs(adapter_specs or [])
        # Cheap checks first (adapters against the base, tokenizer): they fail before the weights load.
        if self.adapters:
            check_adapters(self.adapters, self.model_dir, force_base=force_base, log=log or _warn)
        config = load_config(self.model_dir)
        self.tokenizer = load_tokenizer_for(self.adapters[0][1] if self.adapters else None, self.model_dir, config,
                                            tokenizer_dir)
        from finetune.models import processor_class_for

        self.processor_class = processor_class_for(config)
        # the encoding each was trained with (processor_config.json beside a merged model or an adapter)
        self.processor_settings = {None: self.processor_class.read_settings(self.model_dir)}
        for name, src in self.adapters:
            self.processor_settings[name] = self.processor_class.read_settings(src.adapter_dir)
        dtype = DTYPES.get(dtype, dtype) if dtype else stored_dtype(self.model_dir)
        model = load_base(self.model_dir, dtype)
        self.config = model.config
        folder_meta = read_json(self.model_dir / "cogtune.json")  # merged/quantized exports record their template
        self.templates = {None: folder_meta.get("template_version") or self.config.template_version}
        for name, src in self.adapters:
            self.templates[name] = src.meta.get("template_version") or self.templates[None]
        if self.adapters:
            model = attach_adapters(model, self.adapters, self.model_dir)
        self.model = model
        self.active = self.adapters[0][0] if self.adapters else None

    def use(self, name: str) -> None:
        """Make adapter `name` active (peft set_adapter: the base stays loaded)."""
        names = [n for n, _ in self.adapters]
        if name not in names:
            raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(names) or 'none'}")
        use_adapter(self.model, name)
        self.active = name

    def processor(self, template: str) -> Any:
        """The processor that prompts the active adapter (or the model) with `template`: the settings saved
        beside it, the loaded tokenizer, the checkpoint's image span and transform."""
        saved = self.processor_settings[self.active]
        return self.processor_class.from_config(self.config, self.tokenizer,
                                                **{**saved, "template_version": template})

    def template(self, requested: str | None = None, warn=None) -> str:
        """The active adapter's stored template; a different `requested` one is used with a warning."""
        stored = self.templates[self.active]
        if requested and requested != stored:
            who = f"adapter '{self.active}'" if self.active else str(self.model_dir)
            (warn or _warn)(f"warning: {who} was trained with template '{stored}'; using '{requested}' as asked - "
                            "answers usually degrade with a template the model was not trained on")
            return requested
        return stored


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


def metrics_path(out: str | Path) -> Path:
    """Where the metrics of predictions `out` go: pred.jsonl -> pred.metrics.json (one rule for help and code)."""
    out = Path(out)
    return out.with_name(out.stem + ".metrics.json")


def reference_of(conv: Any) -> str | None:
    """The last assistant turn when the row ends with one (the answer to grade against)."""
    return conv.messages[-1].content if conv.messages and conv.messages[-1].role == "assistant" else None


def predict(im: InferenceModel, data: str | Path, out: str | Path, *, template: str | None = None,
            batch_size: int = 8, max_new_tokens: int = 64, image_root: str | None = None,
            allow_outside_images: bool = False, log=print) -> dict[str, Any] | None:
    """Answer every row of `data`, write PRED.jsonl atomically; returns metrics when references exist."""
    from tqdm import tqdm

    from data_formats.schema import read_jsonl
    from finetune.fileio import write_atomic
    from finetune.generation import generate_answers, score
    from finetune.loading import respect_umask

    # Test rows may end with a question (no reference); images are decoded up front so a corrupt one is
    # reported with its line before any generation runs. Warnings (e.g. duplicate ids) are shown, not fatal.
    convs, problems = read_jsonl(data, image_root, require_answer=False, check_images=True,
                                 allow_outside_images=allow_outside_images)
    errors = [p for p in problems if p.level == "error"]
    for p in problems:
        if p.level != "error":
            log(str(p))
    if errors:
        shown = "\n  ".join(str(p) for p in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{data}: {len(errors)} error(s); fix them (or run `cogtune validate`):\n  {shown}{more}")
    tmpl = im.template(template)
    log(f"predict: {len(convs)} rows, adapter {im.active or 'none'}, template '{tmpl}', batch size {batch_size}")
    with tqdm(total=len(convs), desc="predict", unit="row") as bar:
        answers = generate_answers(im.model, im.processor(tmpl), convs, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=bar.update)
    rows = []
    for conv, answer in zip(convs, answers):
        row = {"id": conv.id, "prediction": answer}
        ref = reference_of(conv)
        if ref is not None:
            row["reference"] = ref
        rows.append(row)
    out = Path(out)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    respect_umask(out)  # the atomic writer's temporary file is owner-only
    log(f"wrote {len(rows)} predictions to {out}")
    graded = [r for r in rows if "reference" in r]
    if not graded:
        return None
    metrics = score([r["prediction"] for r in graded], [r["reference"] for r in graded])
    from finetune.gui_metrics import is_action, score_actions

    if any(is_action(r["reference"]) for r in graded):  # GUI-agent rows (CogAgent): step-level action metrics
        metrics.update(score_actions([r["prediction"] for r in graded], [r["reference"] for r in graded]))
    metrics.update({"adapter": im.active, "template_version": tmpl, "data": str(data)})
    write_atomic(metrics_path(out), json.dumps(metrics, indent=2) + "\n")
    respect_umask(metrics_path(out))
    log("metrics: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune predict", description=__doc__.splitlines()[0])
    p.add_argument("data", metavar="DATA.jsonl")
    p.add_argument("--model", required=True, help="base or merged checkpoint folder")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter (run folder or adapter folder); repeat with NAME=DIR for several")
    p.add_argument("--use", default=None, help="which named adapter answers (default: the first)")
    p.add_argument("--out", required=True, metavar="PRED.jsonl",
                   help="predictions JSONL; metrics, when rows have reference answers, go beside it with .jsonl "
                        "replaced by .metrics.json (pred.jsonl -> pred.metrics.json)")
    p.add_argument("--report", metavar="REPORT.html", help="also write an HTML report: boxes, IoU, failures first")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--template", default=None, help="override the stored template (warns)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--image-root", default=None, help="folder relative image paths are resolved against")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="open images outside the data file's folder (or --image-root); refused by default")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer folder (CogVLM1 checkpoints ship none)")
    p.add_argument("--force-base", action="store_true",
                   help="use the adapter even on a base whose weights differ from those it was trained on")
    args = p.parse_args(argv)
    try:
        from .chat import check_template_name

        check_template_name(args.template)  # before the (slow) model load
        im = InferenceModel(args.model, args.adapter, args.dtype, args.tokenizer_dir, force_base=args.force_base)
        if args.use:
            im.use(args.use)
        metrics = predict(im, args.data, args.out, template=args.template, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, image_root=args.image_root,
                          allow_outside_images=args.allow_outside_images)
        if args.report:
            from finetune.report import report_from_files

            print(f"wrote report {report_from_files(args.report, args.data, args.out, metrics, args.image_root)}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
