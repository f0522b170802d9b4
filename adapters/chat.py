"""`cogtune chat --model DIR [--adapter [NAME=]DIR ...] --image PATH [--prompt TEXT]`: talk to a model about an image.

With --prompt: one streamed answer. Without: a loop that keeps the history (rendered exactly as training
renders multi-turn rows, so a fine-tuned model sees familiar tokens). The template is the one stored with
the adapter (run.json / cogtune.json); --template overrides it with a warning (docs/architecture.md §19.7); an unknown
name fails before the model loads. An answer that starts repeating itself (the same few tokens over and
over, common with small or undertrained models) is stopped early; library deprecation messages are kept
out of the answers. Commands in the loop: see HELP.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .merge import DTYPES
from .predict import InferenceModel

HELP = ("commands: /help, /image PATH (talk about another picture; clears history), /image (show the current "
        "one), /image none (text only), /adapter NAME (switch adapter), /reset (forget history), /exit")

# An answer whose last REPEAT_MIN_SPAN+ tokens are one n-gram (n <= REPEAT_MAX_N) repeated at least
# REPEAT_MIN_TIMES times is stopped: greedy decoding never leaves such a loop on its own.
REPEAT_MIN_TIMES = 3
REPEAT_MIN_SPAN = 12
REPEAT_MAX_N = 16


def repeats_itself(ids: list[int], min_times: int = REPEAT_MIN_TIMES, min_span: int = REPEAT_MIN_SPAN,
                   max_n: int = REPEAT_MAX_N) -> bool:
    """True when `ids` ends with one n-gram repeated back to back (see REPEAT_* above)."""
    for n in range(1, max_n + 1):
        times = max(min_times, -(-min_span // n))
        if len(ids) < n * times:
            continue
        tail = ids[-n:]
        if ids[-n * times:] == tail * times:
            return True
    return False


class RepetitionStop(Exception):
    """Raised from the streamer to end a generation that loops."""


def _streamer(tokenizer: Any, echo: bool, stop_on_repetition: bool):
    """A TextStreamer that records the generated ids and stops a looping answer; prints only when `echo`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.generated: list[int] = []

        def put(self, value: Any) -> None:
            if self.skip_prompt and self.next_tokens_are_prompt:
                super().put(value)
                return
            self.generated += [int(t) for t in value.reshape(-1).tolist()]
            super().put(value)
            if stop_on_repetition and repeats_itself(self.generated):
                self.end()
                raise RepetitionStop

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if echo:
                super().on_finalized_text(text, stream_end)

    return Streamer()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep transformers' logging and Python warnings (deprecations) out of a streamed answer."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def answer(im: InferenceModel, image: str | None, history: list[tuple[str, str]], prompt: str, *,
           template: str, max_new_tokens: int = 256, stream: bool = True, stop_on_repetition: bool = True,
           write: Callable[[str], None] | None = None) -> str:
    """The model's answer to `prompt` after `history` [(user, assistant), ...]; streamed to stdout when asked."""
    from data_formats.schema import Conversation, Message
    from finetune.generation import generate_answers

    messages = [Message(role, text) for q, a in history for role, text in (("user", q), ("assistant", a))]
    conv = Conversation("chat", [str(Path(image).resolve())] if image else [], messages + [Message("user", prompt)])
    streamer = _streamer(im.tokenizer, stream, stop_on_repetition)
    try:
        with quiet_libraries():
            return generate_answers(im.model, im.processor(template), [conv], max_new_tokens=max_new_tokens,
                                    stream=streamer)[0]
    except RepetitionStop:
        (write or _note)(f"[stopped after {len(streamer.generated)} tokens: the answer repeats itself "
                         "(--no-repetition-stop lets it run to --max-new-tokens)]")
        return im.tokenizer.decode(streamer.generated, skip_special_tokens=True).strip()


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_image(path: str) -> str:
    """`path` if it is a picture PIL can open (checked before it is used), else ValueError."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise ValueError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {path} cannot be decoded ({err})") from None
    return path


def check_template_name(name: str | None) -> None:
    """An unknown --template fails at once, naming the nearest valid one (before any weight is loaded)."""
    if name is None:
        return
    from finetune.models.cogvlm.processing import TEMPLATES

    valid = sorted({t for table in TEMPLATES.values() for t in table})
    if name not in valid:
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"--template {name!r} is not a template.{hint} Valid: {', '.join(valid)}")


def chat_loop(im: InferenceModel, image: str | None, *, requested_template: str | None = None,
              max_new_tokens: int = 256, stop_on_repetition: bool = True, read: Callable[[str], str] = input,
              write: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Interactive loop; returns the history when the user leaves (/exit or end of input)."""
    history: list[tuple[str, str]] = []
    template = im.template(requested_template)
    write(f"chat: adapter {im.active or 'none'}, template '{template}', image {image or 'none'}. {HELP}")
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/exit", "/quit"):
            break
        if command in ("/help", "/?"):
            write(HELP)
            continue
        if command == "/reset":
            history.clear()
            write("history cleared")
            continue
        if command == "/image":
            if not arg:
                write(f"image: {image or 'none (text only)'}")
                continue
            try:
                image = None if arg.lower() == "none" else check_image(arg)
            except ValueError as err:
                write(f"error: {err}; still talking about {image or 'no image'}")
                continue
            history.clear()  # the earlier answers were about the previous picture
            write(f"image {image or 'none (text only)'}; history cleared")
            continue
        if command == "/adapter":
            try:
                im.use(arg)
            except ValueError as err:
                write(f"error: {err}")
                continue
            template = im.template(requested_template)
            history.clear()  # another adapter did not say the previous answers
            write(f"adapter '{im.active}' active, template '{template}'; history cleared")
            continue
        if line.startswith("/"):
            write(f"unknown command {command}; {HELP}")
            continue
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        try:
            reply = answer(im, image, history, line, template=template, max_new_tokens=max_new_tokens,
                           stop_on_repetition=stop_on_repetition, write=write)
        except ValueError as err:  # e.g. the conversation no longer fits: say so and keep the session
            write(f"\nerror: {err} (/reset clears the history)")
            continue
        history.append((line, reply))
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogtune chat", description=__doc__.splitlines()[0],
                                epilog=HELP.replace("commands:", "Interactive commands:"))
    p.add_argument("--model", required=True, help="base or merged checkpoint folder")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter (run folder or adapter folder); repeat with NAME=DIR for several")
    p.add_argument("--use", default=None, help="named adapter to start with (default: the first)")
    p.add_argument("--image", default=None, help="image the conversation is about (omit for text only)")
    p.add_argument("--prompt", default=None, help="ask once and exit (default: interactive)")
    p.add_argument("--template", default=None, help="override the stored template (warns)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest answer in tokens (default 256; an answer that repeats itself stops earlier)")
    p.add_argument("--repetition-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="stop an answer that repeats the same few tokens over and over (default: on)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer folder (CogVLM1 checkpoints ship none)")
    p.add_argument("--force-base", action="store_true",
                   help="use the adapter even on a base whose weights differ from those it was trained on")
    args = p.parse_args(argv)
    try:
        check_template_name(args.template)  # before the (slow) model load
        if args.image:
            check_image(args.image)
        im = InferenceModel(args.model, args.adapter, args.dtype, args.tokenizer_dir, force_base=args.force_base)
        if args.use:
            im.use(args.use)
        if args.prompt is not None:
            answer(im, args.image, [], args.prompt, template=im.template(args.template),
                   max_new_tokens=args.max_new_tokens, stop_on_repetition=args.repetition_stop)
        else:
            chat_loop(im, args.image, requested_template=args.template, max_new_tokens=args.max_new_tokens,
                      stop_on_repetition=args.repetition_stop)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
