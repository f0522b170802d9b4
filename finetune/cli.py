"""`cogtune VERB ...`: one entry point, explicit verbs (docs/conventions.md §10).

Each verb lives in the module that does the work and exposes `main(argv) -> int`; this file only
dispatches, and imports the module for the chosen verb alone so that `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, one-line help). Modules are imported only when their verb runs.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("adapters.demo", "run the tiny end-to-end demo (build, train, evaluate, merge, answer)"),
    "make-tiny": ("finetune.tiny", "write a tiny random checkpoint + offline tokenizer in the official layout"),
    "convert": ("data_formats.convert", "convert LLaVA/ShareGPT/CogVLM-SFT/swift/OpenAI/GLM/HF data (and RLAIF-V / "
                "ShareGPT preference pairs) to cogtune JSONL"),
    "validate": ("finetune.validate", "check a JSONL file against a model: every problem at once, then token lengths"),
    "preview": ("finetune.preview", "HTML page of a JSONL file: boxes drawn on the images, tokens, problems per row"),
    "train": ("finetune.recipe", "train from a recipe file or a shipped recipe's name, in this process"),
    "launch": ("finetune.distributed", "check an accelerate config (DDP/FSDP/ZeRO), plan memory per GPU, then launch"),
    "targets": ("finetune.targets", "show which modules a recipe's LoRA targets match, and parameter counts"),
    "check": ("finetune.check", "validate recipe, data and targets, then overfit 8 rows and require the loss to drop"),
    "config": ("finetune.config", "print a recipe fully resolved, with each field's documentation"),
    "merge": ("adapters.merge", "merge an adapter into its base, write the official layout, verify logits"),
    "export": ("adapters.export", "export an adapter (peft), a merged model, or a bnb 4/8-bit merged model"),
    "chat": ("adapters.chat", "chat with a model (and adapter) about an image"),
    "predict": ("adapters.predict", "batched generation over a JSONL file, with metrics when references exist"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: cogtune VERB [args...]", "", "verbs:"]
    lines += [f"  {verb.ljust(width)}  {helptext}" for verb, (_, helptext) in VERBS.items()]
    lines += ["", "Run `cogtune VERB --help` for a verb's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        near = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        print(f"cogtune: unknown verb '{verb}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from . import config

    config.INVOKED_AS = f"cogtune {verb}"  # usage lines and errors name the verb, not the module's script
    try:
        module = importlib.import_module(VERBS[verb][0])
        return int(module.main(rest) or 0)
    finally:
        config.INVOKED_AS = None


if __name__ == "__main__":
    raise SystemExit(main())
