"""Conversation -> model inputs: prompt templates, image spans, labels, image transform, processor, collator, packing.

Pure functions of (tokenizer, config, conversation); no model code runs here (docs/conventions.md §4: the
processor only reads the model class's `model_input_names`, imported lazily). `CogVLMProcessor` holds every
encoding setting and is saved beside adapters and merged models, and the same `encode` serves training and
inference, so a fine-tuned model sees at inference exactly the tokens it was trained on
(docs/architecture.md §19.7, §19.9).

Sequence layout (docs/architecture.md §15; a bare "§N" in this file is a section of that document)::

    [BOS] [image span: image_tokens x placeholder, VISION] [turn 0 prompt] [answer 0] [EOS] [turn 1 prompt] ...

Rendering of a multi-turn conversation (decided here; the official code trains one turn at a time):
  * turn 0's prompt is the official single-turn prompt `build_prompt(q0, [])`, so a one-turn row
    (training or inference) gives exactly the tokens of the official `build_conversation_input_ids`;
  * every answer is tokenized on its own and appended right after its prompt with no inserted space,
    then EOS (§15.2); loss is on every answer and its EOS (or only the last with `last_turn_only`);
  * a later turn k starts after the previous EOS with the text the official history string puts after
    an answer (`"\\n"` for chat/vqa, `" [INST] "` for CogAgent chat, `"\\nQuestion: "` for chat_old),
    then the query and the answer cue. Templates whose official form ignores history (`base`, CogAgent
    `vqa`) repeat their single-turn prompt. Compared with the official history string, history answers
    therefore carry no leading space and end with EOS: the kit's own inference (chat with history,
    `add_generation_prompt=True`) renders history the same way, so training and inference agree.
  * a system message is plain text plus "\\n" before turn 0's prompt (none of the official templates
    has a system slot; the CogVLM1 text-only demo likewise puts its system text first).
  * truncation (`max_length` counts every token, image spans included) never cuts a span: the oldest
    turns are dropped whole (counted in `dropped_turns`); if the last turn alone does not fit,
    `RowTooLong` is raised and the caller counts the dropped row.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from ...families import CLIP_MEAN, CLIP_STD, LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from ...token_types import build_position_ids

if TYPE_CHECKING:
    from data_formats.schema import Conversation

IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100

PromptFamily = Literal["cogvlm", "cogagent"]


# --------------------------------------------------------------------------------------------------
# Templates (docs/architecture.md §14)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One official prompt format, as text pieces (concatenation, never str.format: queries contain braces).

    Official prompt = prefix + sum(hist_pre + q + hist_mid + a + hist_post) + query_pre + query + query_post.
    `hist is None` marks a template whose official code ignores history.
    """

    name: str
    prefix: str
    query_pre: str
    query_post: str
    hist: tuple[str, str, str] | None


_T = Template
TEMPLATES: dict[str, dict[str, Template]] = {
    # CogVLM1 (v1.1 HF code), CogVLM2 image and CogVLM2-Video share one function.
    "cogvlm": {
        "base": _T("base", "", "", "", None),
        "chat": _T("chat", "", "Question: ", " Answer:", ("Question: ", " Answer: ", "\n")),
        "vqa": _T("vqa", "", "Question: ", " Short answer:", ("Question: ", " Short answer: ", "\n")),
    },
    # CogAgent's own table; `<EOI>` is ordinary text in the HF code.
    "cogagent": {
        "base": _T("base", "", "", "", None),
        "chat": _T("chat", " [INST] ", "", " [/INST] ", ("", " [/INST] ", " [INST] ")),
        "chat_old": _T("chat_old", "<EOI>Question: ", "", " Answer:", ("", " Answer: ", "\nQuestion: ")),
        "vqa": _T("vqa", "<EOI>Question: ", "", " Short answer:", None),
    },
}


def _prompt_family(family: str | int) -> PromptFamily:
    if family in (1, 2, "cogvlm", "cogvlm2", "cogvlm2-video"):
        return "cogvlm"
    if family == "cogagent":
        return "cogagent"
    raise ValueError(f"unknown prompt family {family!r}; expected 'cogvlm' (CogVLM, CogVLM2) or 'cogagent'")


def get_template(template_version: str, family: str | int = "cogvlm") -> Template:
    """The template called `template_version`; unknown names fail listing the valid ones."""
    fam = _prompt_family(family)
    table = TEMPLATES[fam]
    if template_version not in table:
        raise ValueError(f"unknown template_version {template_version!r} for {fam}; valid: {', '.join(table)}")
    return table[template_version]


def build_prompt(
    query: str,
    history: Sequence[tuple[str, str]] = (),
    template_version: str = "chat",
    family: str | int = "cogvlm",
    system: str | None = None,
) -> str:
    """The official prompt string (§14) for `query` after `history` [(question, answer), ...].

    This is what the official `build_conversation_input_ids` tokenizes in one piece. The kit encodes
    history turn by turn instead (module docstring); with no history both give the same tokens.
    """
    t = get_template(template_version, family)
    text = t.prefix
    if t.hist is not None:
        pre, mid, post = t.hist
        for q, a in history:
            text += pre + q + mid + a + post
    text += t.query_pre + query + t.query_post
    return _with_system(text, system)


def _with_system(text: str, system: str | None) -> str:
    return text if not system else system + "\n" + text


def _turn_prompt(t: Template, query: str, first: bool, system: str | None) -> str:
    """Text of one turn's prompt piece in the kit's multi-turn rendering (module docstring)."""
    if first or t.hist is None:
        text = t.prefix + t.query_pre + query + t.query_post
        return _with_system(text, system) if first else text
    return t.hist[2] + t.query_pre + query + t.query_post


# --------------------------------------------------------------------------------------------------
# Encoding one conversation
# --------------------------------------------------------------------------------------------------


class RowTooLong(ValueError):
    """Even the last turn (with its image spans) exceeds max_length; the caller drops and counts the row."""

    def __init__(self, message: str, length: int, max_length: int) -> None:
        super().__init__(message)
        self.length = length
        self.max_length = max_length


@dataclass
class EncodedExample:
    """One conversation as token lists (length L each) plus the image refs of its VISION spans, in order."""

    input_ids: list[int]
    token_type_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)  # refs (path / data: URL), or already-transformed tensors
    dropped_turns: int = 0
    id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # per-example values of model inputs a family adds

    def __len__(self) -> int:
        return len(self.input_ids)

    def input(self, name: str) -> Any:
        """The per-example value of model input `name` (a field, else an `extra` entry)."""
        if name in self.extra:
            return self.extra[name]
        if name in _FIELD_NAMES:
            return getattr(self, name)
        raise KeyError(f"example {self.id!r} has no value for model input {name!r}; the processor's encode() "
                       "must fill it (EncodedExample.extra)")

    def to_dict(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "labels": self.labels,
                "images": list(self.images), "dropped_turns": self.dropped_turns, "id": self.id, **self.extra}


_FIELD_NAMES = frozenset(f.name for f in fields(EncodedExample))


class _Piece:
    """A growing (ids, types, labels, images) run; turn blocks are built from these."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.types: list[int] = []
        self.labels: list[int] = []
        self.images: list[Any] = []

    def text(self, ids: list[int], train: bool = False) -> None:
        self.ids += ids
        self.types += [LANGUAGE_TOKEN_TYPE] * len(ids)
        self.labels += list(ids) if train else [IGNORE_INDEX] * len(ids)

    def image(self, ref: Any, n: int, placeholder: int, separator: list[int]) -> None:
        # Two touching VISION runs would merge into one for position ids and boi/eoi (§8).
        if self.types and self.types[-1] == VISION_TOKEN_TYPE:
            self.text(separator)
        self.ids += [placeholder] * n
        self.types += [VISION_TOKEN_TYPE] * n
        self.labels += [IGNORE_INDEX] * n
        self.images.append(ref)

    def extend(self, other: _Piece, separator: list[int]) -> None:
        if self.types and other.types and self.types[-1] == other.types[0] == VISION_TOKEN_TYPE:
            self.text(separator)
        self.ids += other.ids
        self.types += other.types
        self.labels += other.labels
        self.images += other.images


def _strip_markers(text: str) -> str:
    """Single-image rows: the span sits after BOS (official layout), so the marker text goes."""
    if IMAGE_MARKER not in text:
        return text
    return re.sub(r"\s*" + re.escape(IMAGE_MARKER) + r"\s*", " ", text).strip()


def _split_turns(conv: Any, add_generation_prompt: bool) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system text, [(user, assistant or None), ...]); checks roles alternate user/assistant."""
    where = f"row {getattr(conv, 'id', '?')!r}" + (f" ({conv.source})" if getattr(conv, "source", "") else "")
    systems = [m.content for m in conv.messages if m.role == "system"]
    rest = [m for m in conv.messages if m.role != "system"]
    if add_generation_prompt and rest and rest[-1].role == "assistant":
        rest = rest[:-1]  # a reference answer (eval rows): generate it instead
    turns: list[tuple[str, str | None]] = []
    for i in range(0, len(rest), 2):
        user = rest[i]
        answer = rest[i + 1] if i + 1 < len(rest) else None
        if user.role != "user" or (answer is not None and answer.role != "assistant"):
            raise ValueError(f"{where}: roles must alternate user, assistant, ... after an optional system turn")
        turns.append((user.content, None if answer is None else answer.content))
    if not turns:
        raise ValueError(f"{where}: no user turn")
    if not add_generation_prompt and turns[-1][1] is None:
        raise ValueError(f"{where}: the last user turn has no answer (pass add_generation_prompt=True to generate it)")
    return ("\n".join(systems) if systems else None), turns


def encode_conversation(
    conv: Conversation,
    tokenizer: Any,
    *,
    image_tokens: int,
    template_version: str,
    max_length: int | None = None,
    last_turn_only: bool = False,
    add_generation_prompt: bool = False,
    allow_multi_image: bool = False,
    prompt_table: str = "cogvlm",
) -> EncodedExample:
    """Token ids, token types and labels of one conversation (layout and rules in the module docstring).

    The engine behind `CogVLMProcessor.encode`, which holds these settings; call that instead.
    `image_tokens`: length of one VISION span (config.image_tokens). `prompt_table`: "cogvlm"
    (CogVLM1 and CogVLM2) or "cogagent" (config.prompt_table). `add_generation_prompt`: the last user turn is left
    open for generation (a trailing reference answer is ignored) and every label is -100.
    `allow_multi_image`: each `<image>` marker gets its own span at the marker (images without markers
    go after BOS); official checkpoints were only trained on one image right after BOS.
    """
    t = get_template(template_version, prompt_table)
    bos, eos, placeholder = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if bos is None or eos is None or placeholder is None:
        raise ValueError("tokenizer needs bos, eos and pad tokens (pad is the image placeholder); "
                         "load it with finetune.tokenization.load_tokenizer, which sets pad from config.json")
    system, turns = _split_turns(conv, add_generation_prompt)
    images = list(conv.images)
    n_markers = sum(q.count(IMAGE_MARKER) for q, _ in turns)
    where = f"row {conv.id!r}" + (f" ({conv.source})" if getattr(conv, "source", "") else "")
    if len(images) > 1 and not allow_multi_image:
        raise ValueError(f"{where}: {len(images)} images; official checkpoints take one image per conversation. "
                         "Set data.allow_multi_image: true to give each <image> marker its own span (untrained).")
    if n_markers and n_markers != len(images):
        raise ValueError(f"{where}: {n_markers} '{IMAGE_MARKER}' markers but {len(images)} images")
    interleaved = len(images) > 1 and n_markers > 0

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    separator = enc("\n")

    header = _Piece()  # BOS and the images that go right after it
    header.text([bos])
    if not interleaved:
        for ref in images:
            header.image(ref, image_tokens, placeholder, separator)
    image_iter = iter(images)
    refs = [[next(image_iter) for _ in range(q.count(IMAGE_MARKER))] for q, _ in turns] if interleaved else []

    def block(k: int, first: bool) -> _Piece:
        """Turn k: its prompt (images at markers when interleaved), then its answer + EOS."""
        query, answer = turns[k]
        piece = _Piece()
        if not interleaved:
            piece.text(enc(_turn_prompt(t, _strip_markers(query), first, system)))
        else:
            chunks = _turn_prompt(t, query, first, system).split(IMAGE_MARKER)
            for j, chunk in enumerate(chunks):
                piece.text(enc(chunk))
                if j < len(chunks) - 1:
                    piece.image(refs[k][j], image_tokens, placeholder, separator)
        if answer is not None:
            train = not add_generation_prompt and (not last_turn_only or k == len(turns) - 1)
            piece.text(enc(answer) + [eos], train=train)
        return piece

    later = [block(k, first=False) for k in range(len(turns))]
    # Smallest number of oldest turns to drop so that the row fits; images are never cut.
    for dropped in range(len(turns)):
        head = block(dropped, first=True)
        total = len(header.ids) + len(head.ids) + sum(len(b.ids) for b in later[dropped + 1:])
        if max_length is None or total <= max_length:
            break
    else:
        raise RowTooLong(
            f"{where}: the last turn alone needs {total} tokens (BOS, {len(header.images) + len(head.images)} image "
            f"span(s) of {image_tokens}, prompt and answer) but max_length is {max_length}; raise data.max_length "
            "or shorten the row", total, max_length)
    out = _Piece()
    out.extend(header, separator)
    out.extend(head, separator)
    for b in later[dropped + 1:]:
        out.extend(b, separator)
    return EncodedExample(out.ids, out.types, out.labels, out.images, dropped, str(conv.id))


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _open_rgb(ref: Any) -> Image.Image:
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    try:
        from data_formats.schema import load_image
    except ImportError:  # data_formats not installed: plain paths only
        with Image.open(ref) as im:
            return im.convert("RGB")
    return load_image(str(ref))


def load_and_transform_image(ref: Any, image_size: int) -> torch.Tensor:
    """(3, S, S) float32: RGB -> resize (S, S) bicubic, no aspect kept -> [0, 1] -> CLIP mean/std (§13).

    Same numbers as the official torchvision Resize/ToTensor/Normalize on PIL images (PIL's resize is
    antialiased), without torchvision. Runs in DataLoader workers; nothing is moved to a device here.
    """
    img = _open_rgb(ref).resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, S, S)


# --------------------------------------------------------------------------------------------------
# The processor: every setting that turns a conversation into model inputs, in one object
# --------------------------------------------------------------------------------------------------

PROCESSOR_CONFIG = "processor_config.json"

# Model inputs the collator computes per batch from the encoded tokens; every other name in the model's
# `model_input_names` is a per-example value produced by `encode` (and a column of the dataset cache).
BATCH_INPUTS = ("attention_mask", "position_ids")


class CogVLMProcessor:
    """Tokenizer + template + image transform + image span + truncation: conversation -> model inputs.

    transformers' conventions: `from_pretrained(dir)` (a checkpoint, a run's adapter/ folder, an export or a
    merged model), `save_pretrained(dir)` (`processor_config.json` + the tokenizer), `from_config(config,
    tokenizer)`. Every consumer (training data, validation, preview, DPO, generation, merge probes, chat and
    predict) encodes through one of these, so the settings below travel together instead of as separate
    arguments, and a fine-tuned model is prompted at inference exactly as it was trained.

    Settings (`settings()`, saved in processor_config.json):
      template_version   prompt template name in the prompt table (docs/architecture.md §14)
      prompt_table       "cogvlm" (CogVLM1, CogVLM2) or "cogagent": which family's templates
      image_tokens       length of one image's VISION span, boi and eoi included (config.image_tokens)
      image_size         side of the square image the vision tower takes (config.vision_config.image_size)
      max_length         tokens per row, image spans included; older turns are dropped to fit (None: no limit)
      last_turn_only     loss on the last answer only (else on every answer)
      allow_multi_image  one span per `<image>` marker (official checkpoints saw one image after BOS)

    The model's input names come from the model class (`CogVLMForCausalLM.model_input_names`), read once,
    lazily: the collator's output keys and the dataset's columns follow them.
    """

    SETTINGS = ("template_version", "prompt_table", "image_tokens", "image_size", "max_length", "last_turn_only",
                "allow_multi_image")

    def __init__(self, tokenizer: Any, *, image_tokens: int, image_size: int, template_version: str = "chat",
                 prompt_table: str = "cogvlm", max_length: int | None = None, last_turn_only: bool = False,
                 allow_multi_image: bool = False, pad_token_id: int | None = None,
                 model_input_names: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = int(image_tokens)
        self.image_size = int(image_size)
        self.template_version = str(template_version)
        self.prompt_table = str(prompt_table)
        self.max_length = None if max_length is None else int(max_length)
        self.last_turn_only = bool(last_turn_only)
        self.allow_multi_image = bool(allow_multi_image)
        get_template(self.template_version, self.prompt_table)  # an unknown name fails here, once
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = pad_token_id
        if pad is None:
            raise ValueError("no pad id: the tokenizer has no pad token and config.pad_token_id is unset")
        self.pad_token_id = int(pad)
        self._model_input_names = None if model_input_names is None else tuple(model_input_names)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def model_class(cls) -> type:
        """The model class whose inputs this processor makes (imported lazily: only its input names are read)."""
        from .modeling import CogVLMForCausalLM

        return CogVLMForCausalLM

    @classmethod
    def config_class(cls) -> type:
        from .configuration import CogVLMConfig

        return CogVLMConfig

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, **settings: Any) -> CogVLMProcessor:
        """The processor of a checkpoint's config; `settings` (see the class docstring) override its defaults.

        A setting given as None keeps the default (so `template_version=cfg.data.template_version` works when
        the recipe leaves it unset); `model_input_names` overrides the model class's.
        """
        unknown = sorted(set(settings) - set(cls.SETTINGS) - {"model_input_names"})
        if unknown:
            raise TypeError(f"unknown processor setting(s) {', '.join(unknown)}; valid: {', '.join(cls.SETTINGS)}")
        base = {"template_version": config.template_version, "prompt_table": getattr(config, "prompt_table", "cogvlm"),
                "image_tokens": config.image_tokens, "image_size": int(config.vision_config["image_size"])}
        base.update({k: v for k, v in settings.items() if v is not None or k == "max_length"})
        return cls(tokenizer, pad_token_id=getattr(config, "pad_token_id", None), **base)

    @classmethod
    def read_settings(cls, folder: str | Path) -> dict[str, Any]:
        """The settings saved in `folder/processor_config.json` ({} when there is none)."""
        path = Path(folder) / PROCESSOR_CONFIG
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable JSON file ({err}); delete it to use config.json's "
                             "settings, or save the processor again") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: expected a JSON object of processor settings")
        kind = saved.get("processor_class", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"{path}: written by {kind}, not {cls.__name__}; load it with that family's processor")
        unknown = sorted(set(saved) - set(cls.SETTINGS) - {"processor_class"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(cls.SETTINGS)}")
        return {k: saved[k] for k in cls.SETTINGS if k in saved}

    @classmethod
    def from_pretrained(cls, folder: str | Path, tokenizer_dir: str | Path | None = None,
                        **overrides: Any) -> CogVLMProcessor:
        """The processor saved in `folder` (processor_config.json + tokenizer), else built from its config.json.

        Works on a checkpoint, a run folder (its adapter/), an adapter export and a merged model: settings come
        from config.json (when there), then processor_config.json, then `overrides` (None values ignored).
        The tokenizer is `folder`'s (or `tokenizer_dir`'s), loaded by `finetune.tokenization.load_tokenizer`.
        """
        from ...tokenization import load_tokenizer

        folder = Path(folder)
        if not (folder / PROCESSOR_CONFIG).is_file() and (folder / "adapter" / PROCESSOR_CONFIG).is_file():
            folder = folder / "adapter"  # a run folder: its adapter's processor
        saved = cls.read_settings(folder)
        config = None
        if (folder / "config.json").is_file():
            config = cls.config_class()(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
        elif not saved:
            raise FileNotFoundError(f"{folder}: neither {PROCESSOR_CONFIG} nor config.json; pass a checkpoint, a "
                                    "merged model, a run's adapter/ folder or an adapter export")
        tokenizer = load_tokenizer(folder, tokenizer_dir, config)
        settings = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
        if config is not None:
            return cls.from_config(config, tokenizer, **settings)
        missing = [k for k in ("image_tokens", "image_size") if k not in settings]
        if missing:
            raise ValueError(f"{folder / PROCESSOR_CONFIG}: missing {', '.join(missing)} and no config.json to "
                             "read them from; save the processor again")
        return cls(tokenizer, **settings)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write processor_config.json (atomically) and the tokenizer into `folder`; returns the JSON's path."""
        from ...fileio import write_atomic

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        blob = {"processor_class": type(self).__name__, **self.settings()}
        return write_atomic(folder / PROCESSOR_CONFIG, json.dumps(blob, indent=2, sort_keys=True) + "\n")

    def with_settings(self, **changes: Any) -> CogVLMProcessor:
        """A copy with some settings changed (same tokenizer); e.g. `with_settings(max_length=None)`."""
        unknown = sorted(set(changes) - set(self.SETTINGS))
        if unknown:
            raise TypeError(f"unknown processor setting(s) {', '.join(unknown)}; valid: {', '.join(self.SETTINGS)}")
        return type(self)(self.tokenizer, **{**self.settings(), **changes}, pad_token_id=self.pad_token_id,
                          model_input_names=self._model_input_names)

    # ---- what it holds -----------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """Every encoding setting, JSON-ready (what save_pretrained writes and the dataset cache keys on)."""
        return {k: getattr(self, k) for k in self.SETTINGS}

    @property
    def model_input_names(self) -> tuple[str, ...]:
        """The model's inputs, in its order: `model_class().model_input_names` unless given explicitly."""
        if self._model_input_names is None:
            self._model_input_names = tuple(self.model_class().model_input_names)
        return self._model_input_names

    @property
    def example_input_names(self) -> tuple[str, ...]:
        """Model inputs produced per example by `encode` (the rest, BATCH_INPUTS, are built per batch)."""
        return tuple(n for n in self.model_input_names if n not in BATCH_INPUTS)

    @property
    def template(self) -> Template:
        return get_template(self.template_version, self.prompt_table)

    def fingerprint(self) -> str:
        """Hash of everything that changes the encoded bytes: tokenizer (vocab, merges, special ids), settings
        and processor class. Keys the dataset cache (finetune/dataset.py)."""
        tok = self.tokenizer
        tok_json = tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer") else repr(tok)
        blob = json.dumps({
            "processor_class": type(self).__name__,
            "tokenizer": hashlib.sha256(tok_json.encode()).hexdigest(),
            "specials": [tok.bos_token_id, tok.eos_token_id, self.pad_token_id],
            "settings": self.settings(),
            "example_inputs": list(self.example_input_names),
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({inner})"

    # ---- encoding ----------------------------------------------------------------------------------

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False) -> EncodedExample:
        """Token ids, token types, labels and image refs of one conversation (rules in the module docstring).

        `add_generation_prompt`: the last user turn is left open for generation (a trailing reference answer
        is ignored) and every label is -100. Raises `RowTooLong` when even the last turn exceeds max_length.
        """
        return encode_conversation(
            conversation, self.tokenizer, image_tokens=self.image_tokens, template_version=self.template_version,
            max_length=self.max_length, last_turn_only=self.last_turn_only,
            add_generation_prompt=add_generation_prompt, allow_multi_image=self.allow_multi_image,
            prompt_table=self.prompt_table)

    def example_from_dict(self, row: dict[str, Any]) -> EncodedExample:
        """A dataset row (the example columns) back as an `EncodedExample`."""
        extra = {n: row[n] for n in self.example_input_names if n not in _FIELD_NAMES}
        return EncodedExample(list(row["input_ids"]), list(row["token_type_ids"]), list(row["labels"]),
                              list(row.get("images") or []), int(row.get("dropped_turns") or 0),
                              str(row.get("id") or ""), extra)

    # ---- images ------------------------------------------------------------------------------------

    def transform_image(self, ref: Any) -> torch.Tensor:
        """(3, S, S) float32 for one image ref (path, data: URL or PIL image); a tensor passes through.

        The one place images are decoded for the model (training rows, generation, probes).
        """
        return ref if isinstance(ref, torch.Tensor) else load_and_transform_image(ref, self.image_size)

    def load_images(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with its image refs decoded and transformed (run in DataLoader workers, not on a device)."""
        row = dict(row)
        row["images"] = [self.transform_image(ref) for ref in row.get("images") or []]  # each (3, S, S)
        return row

    def batch_input(self, name: str, values: Sequence[Any]) -> torch.Tensor | None:
        """One batched model input from its per-example values (examples in row-major order).

        CogVLM knows `images`: every image of every example, transformed, stacked (N, 3, S, S), or None
        when the batch has none. A family that adds an input overrides this; an unknown one is an error,
        never dropped.
        """
        if name == "images":
            images = [self.transform_image(ref) for refs in values for ref in refs]
            return torch.stack(images) if images else None  # (N, 3, S, S)
        raise ValueError(f"{type(self).__name__} cannot batch model input {name!r} (declared by "
                         f"{self.model_class().__name__}.model_input_names); override batch_input for it")


# --------------------------------------------------------------------------------------------------
# Collator and packing
# --------------------------------------------------------------------------------------------------


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best fit: each example joins the row with the least room that still holds it (input order kept per
    row; an example longer than max_length gets a row of its own, never cut). O(n log n), so it also packs
    whole datasets before training."""
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i, n in enumerate(lengths):
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - n, len(rows) - 1))
    return rows


@dataclass
class CogVLMCollator:
    """Pads (and packs) encoded examples into one batch of model inputs; no device moves.

    Encoding is the processor's: items may be `EncodedExample`s, dicts with the processor's example
    columns (what `finetune.dataset` yields; images as refs or transformed tensors), or raw
    `Conversation`s, which `processor.encode` turns into examples here (used by predict/chat). The
    output keys are the model's `model_input_names` (read through the processor) plus `labels`; the
    token-aligned ones the collator builds itself, every other input (images, and any input a family
    adds) is batched by `processor.batch_input`. Output for CogVLM, (B, L) long unless said::

        input_ids       pad id from the tokenizer (else config.pad_token_id), never a constant
        token_type_ids  VISION (1) over each image span, LANGUAGE (0) elsewhere, padding included
        attention_mask  1 / 0 (pad); with packing, segment ids 1..k per row, 0 for padding
        position_ids    build_position_ids (§8.1) of each row alone (BOS = 0 with left padding too),
                        restarted per packed segment; leave them out of generate(), the model rebuilds them
        images          (N, 3, S, S) float32, every image in row-major order, or None
        labels          answer tokens + EOS, -100 elsewhere (image, BOS, prompt, history, pad)

    Real output (tests/test_collator.py golden) for the tiny v2 tokenizer and tiny CogVLM2 config (span 6),
    row "<image>\\nWhat color is the shape?" -> "red", "Where is it?" -> "left"::

        input_ids       [508, 510 x6, 286, 25, 297, 313, 260, 263, 361, 30, 288, 25, 495, 509,
                         198, 286, 25, 502, 260, 276, 30, 288, 25, 374, 509]
                        (BOS, image placeholders, "Question: What color is the shape? Answer:", "red", EOS,
                         "\\n", "Question: Where is it? Answer:", "left", EOS)
        token_type_ids  [0, 1 x6, 0 x23]
        labels          [-100 x17, 495, 509, -100 x9, 374, 509]
        position_ids    [0, 1, 2, 2, 2, 2, 3, 4, 5, ..., 26]
        attention_mask  [1 x30]
    """

    processor: CogVLMProcessor
    packing: bool = False
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"
    add_generation_prompt: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.packing and self.padding_side == "left":
            raise ValueError("packing pads on the right; use padding_side='right' with packing=True")
        if self.packing and not self.processor.max_length:
            raise ValueError("packing needs max_length (the length of a packed row): set the processor's max_length")
        self.pad_token_id = self.processor.pad_token_id
        self.max_length = self.processor.max_length

    def encode(self, conv: Conversation) -> EncodedExample:
        """The processor's encoding, with this collator's `add_generation_prompt`."""
        return self.processor.encode(conv, add_generation_prompt=self.add_generation_prompt)

    def _as_example(self, item: Any) -> EncodedExample:
        if isinstance(item, EncodedExample):
            return item
        if isinstance(item, dict):
            return self.processor.example_from_dict(item)
        return self.encode(item)

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor | None]:
        if any(isinstance(x, (list, tuple)) for x in items):  # packs planned over the dataset: one row each
            if not self.packing:
                raise ValueError("the dataset yields packed rows but the collator was built with packing=False")
            packs = [list(x) if isinstance(x, (list, tuple)) else [x] for x in items]
            examples = [self._as_example(x) for pack in packs for x in pack]
            starts = [0]
            for pack in packs:
                starts.append(starts[-1] + len(pack))
            groups = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
        else:
            examples = [self._as_example(x) for x in items]
            if self.packing:
                groups = pack_examples([len(e) for e in examples], self.max_length)
            else:
                groups = [[i] for i in range(len(examples))]
        width = max(sum(len(examples[i]) for i in g) for g in groups)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(groups)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)  # (B, L)
        token_type_ids = torch.full((b, width), LANGUAGE_TOKEN_TYPE, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        order: list[EncodedExample] = []  # examples in row-major order, for the per-example inputs
        for r, group in enumerate(groups):
            used = sum(len(examples[i]) for i in group)
            start = width - used if self.padding_side == "left" else 0
            for seg, i in enumerate(group, start=1):
                e = examples[i]
                sl = slice(start, start + len(e))
                input_ids[r, sl] = torch.tensor(e.input_ids, dtype=torch.long)
                token_type_ids[r, sl] = torch.tensor(e.token_type_ids, dtype=torch.long)
                labels[r, sl] = torch.tensor(e.labels, dtype=torch.long)
                attention_mask[r, sl] = seg if self.packing else 1
                # Positions of each row (packed: each segment) as if alone: BOS = 0 also when left-padded,
                # where the official rule would give 1 (§8.1); equals the model's default_position_ids.
                position_ids[r, sl] = build_position_ids(token_type_ids[r:r + 1, sl])[0]
                order.append(e)
                start += len(e)
        built = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        out: dict[str, torch.Tensor | None] = {}
        for name in self.processor.model_input_names:
            out[name] = built[name] if name in built else self.processor.batch_input(
                name, [e.input(name) for e in order])
        out["labels"] = labels
        return out
