"""Conversation -> model inputs: prompt templates, image spans, labels, image transform, collator, packing.

Pure functions of (tokenizer, config, conversation); no model import (docs/conventions.md §4). The same
`encode_conversation` serves training and inference, so a fine-tuned model sees at inference exactly
the tokens it was trained on (docs/architecture.md §19.7, §19.9).

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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
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

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_dict(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids, "labels": self.labels,
                "images": list(self.images), "dropped_turns": self.dropped_turns, "id": self.id}


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
    family_version: int,
    image_tokens: int,
    template_version: str,
    max_length: int | None = None,
    last_turn_only: bool = False,
    add_generation_prompt: bool = False,
    allow_multi_image: bool = False,
    family: str | None = None,
) -> EncodedExample:
    """Token ids, token types and labels of one conversation (layout and rules in the module docstring).

    `image_tokens`: length of one VISION span (config.image_tokens). `family`: prompt table, "cogvlm"
    (default, CogVLM1 and CogVLM2) or "cogagent". `add_generation_prompt`: the last user turn is left
    open for generation (a trailing reference answer is ignored) and every label is -100.
    `allow_multi_image`: each `<image>` marker gets its own span at the marker (images without markers
    go after BOS); official checkpoints were only trained on one image right after BOS.
    """
    if family_version not in (1, 2):
        raise ValueError(f"family_version must be 1 or 2, got {family_version!r}")
    t = get_template(template_version, family or "cogvlm")
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
    """Batches examples into model inputs; dynamic padding to the longest row, no device moves.

    Items may be `EncodedExample`s, dicts with `input_ids/token_type_ids/labels/images` (what
    `finetune.dataset` yields; images as refs or transformed tensors), or raw `Conversation`s, which
    are encoded here with the collator's settings (used by predict/chat). Output, all (B, L) long::

        input_ids       pad id from the tokenizer (else config.pad_token_id), never a constant
        token_type_ids  VISION (1) over each image span, LANGUAGE (0) elsewhere, padding included
        attention_mask  1 / 0 (pad); with packing, segment ids 1..k per row, 0 for padding
        labels          answer tokens + EOS, -100 elsewhere (image, BOS, prompt, history, pad)
        position_ids    build_position_ids (§8.1) of each row alone (BOS = 0 with left padding too),
                        restarted per packed segment; leave them out of generate(), the model rebuilds them
        images          (N, 3, S, S) float32, every image in row-major order, or None

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

    tokenizer: Any
    config: Any
    template_version: str | None = None
    max_length: int | None = None
    last_turn_only: bool = False
    packing: bool = False
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"
    add_generation_prompt: bool = False
    allow_multi_image: bool = False
    family: str | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.packing and self.padding_side == "left":
            raise ValueError("packing pads on the right; use padding_side='right' with packing=True")
        if self.packing and not self.max_length:
            raise ValueError("packing needs max_length (the length of a packed row)")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            raise ValueError("no pad id: the tokenizer has no pad token and config.pad_token_id is unset")
        self.pad_token_id = int(pad)
        self.image_size = int(self.config.vision_config["image_size"])

    def encode(self, conv: Conversation) -> EncodedExample:
        """encode_conversation with this collator's settings."""
        return encode_conversation(
            conv, self.tokenizer, family_version=self.config.cogvlm_version, image_tokens=self.config.image_tokens,
            template_version=self.template_version or self.config.template_version, max_length=self.max_length,
            last_turn_only=self.last_turn_only, add_generation_prompt=self.add_generation_prompt,
            allow_multi_image=self.allow_multi_image, family=self.family)

    def _as_example(self, item: Any) -> EncodedExample:
        if isinstance(item, EncodedExample):
            return item
        if isinstance(item, dict):
            return EncodedExample(list(item["input_ids"]), list(item["token_type_ids"]), list(item["labels"]),
                                  list(item.get("images") or []), int(item.get("dropped_turns") or 0),
                                  str(item.get("id") or ""))
        return self.encode(item)

    def _image(self, ref: Any) -> torch.Tensor:
        return ref if isinstance(ref, torch.Tensor) else load_and_transform_image(ref, self.image_size)

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
        images: list[torch.Tensor] = []
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
                images += [self._image(ref) for ref in e.images]
                start += len(e)
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "position_ids": position_ids,
            "images": torch.stack(images) if images else None,  # (N, 3, S, S)
        }
