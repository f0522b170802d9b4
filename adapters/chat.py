"""`cogtune chat --model DIR [--adapter [NAME=]DIR ...] --image PATH [--prompt TEXT]`: talk to a model about an image.

With --prompt: one streamed answer. Without: a loop that keeps the history (rendered exactly as training
renders multi-turn rows, so a fine-tuned model sees familiar tokens). The template is the one stored with
the adapter (run.json / cogtune.json); --template overrides it with a warning (user-pains C5).
Commands in the loop: /adapter NAME (switch without reloading the base), /reset, /exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .merge import DTYPES
from .predict import InferenceModel

HELP = "commands: /adapter NAME, /reset (forget history), /exit"


def answer(im: InferenceModel, image: str | None, history: list[tuple[str, str]], prompt: str, *,
           template: str, max_new_tokens: int = 256, stream: bool = True) -> str:
    """The model's answer to `prompt` after `history` [(user, assistant), ...]; streamed to stdout when asked."""
    from transformers import TextStreamer

    from data_formats.schema import Conversation, Message
    from finetune.generation import generate_answers

    messages = [Message(role, text) for q, a in history for role, text in (("user", q), ("assistant", a))]
    conv = Conversation("chat", [str(Path(image).resolve())] if image else [], messages + [Message("user", prompt)])
    streamer = TextStreamer(im.tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    return generate_answers(im.model, im.tokenizer, [conv], template_version=template,
                            max_new_tokens=max_new_tokens, stream=streamer)[0]


def chat_loop(im: InferenceModel, image: str | None, *, requested_template: str | None = None,
              max_new_tokens: int = 256, read: Callable[[str], str] = input,
              write: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Interactive loop; returns the history when the user leaves (/exit or end of input)."""
    history: list[tuple[str, str]] = []
    template = im.template(requested_template)
    write(f"chat: adapter {im.active or 'none'}, template '{template}'. {HELP}")
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            write("history cleared")
            continue
        if line.startswith("/adapter"):
            try:
                im.use(line.split(maxsplit=1)[1].strip() if " " in line else "")
            except ValueError as err:
                write(f"error: {err}")
                continue
            template = im.template(requested_template)
            history.clear()  # another adapter did not say the previous answers
            write(f"adapter '{im.active}' active, template '{template}'; history cleared")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}")
            continue
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        try:
            reply = answer(im, image, history, line, template=template, max_new_tokens=max_new_tokens)
        except ValueError as err:  # e.g. the conversation no longer fits: say so and keep the session
            write(f"\nerror: {err} (/reset clears the history)")
            continue
        history.append((line, reply))
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="base or merged checkpoint folder")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter (run folder or adapter folder); repeat with NAME=DIR for several")
    p.add_argument("--use", default=None, help="named adapter to start with (default: the first)")
    p.add_argument("--image", default=None, help="image the conversation is about (omit for text only)")
    p.add_argument("--prompt", default=None, help="ask once and exit (default: interactive)")
    p.add_argument("--template", default=None, help="override the stored template (warns)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer folder (CogVLM1 checkpoints ship none)")
    args = p.parse_args(argv)
    try:
        if args.image and not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image} does not exist")
        im = InferenceModel(args.model, args.adapter, args.dtype, args.tokenizer_dir)
        if args.use:
            im.use(args.use)
        if args.prompt is not None:
            answer(im, args.image, [], args.prompt, template=im.template(args.template),
                   max_new_tokens=args.max_new_tokens)
        else:
            chat_loop(im, args.image, requested_template=args.template, max_new_tokens=args.max_new_tokens)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
