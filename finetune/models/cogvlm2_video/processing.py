"""CogVLM2-Video inputs: frame transform, the video span with time-index tokens, conversations, the processor.

Sequence layout (docs/architecture.md §21.3, §21.4)::

    chat:  [BOS] [frame 0: span VISION] "0" [frame 1: span VISION] "1" ... [turn 0 prompt] [answer] [EOS] ...
    base:  [BOS] [frame 0 span][frame 1 span] ... (one VISION run) [turn 0 prompt] [answer] [EOS] ...

`span` is `config.image_tokens` (66 for 224-px frames: 8x8 features + boi + eoi). In `chat` every frame is
followed by the LANGUAGE tokens of `str(t)` (its index, no separator): each frame is its own VISION run with 3
position ids plus its time tokens. In `base` the frames touch, so the whole video is one run and costs 3
position ids in all. The text part is exactly the image models' (`encode_conversation`: templates, multi-turn,
labels, truncation by whole turns); the video replaces the image span right after BOS and is never cut.

Frames: `FrameSampling` (video.py) picks them as the official demo does (chat: 1 fps up to 24; base: 24
uniform over the first 60 s); `num_frames`, `fps` and `clip_seconds` are settings of `CogVLMVideoProcessor`
(saved in processor_config.json, part of its fingerprint), which every consumer reaches through the family
table (finetune/models/__init__.py), so the dataset, collator, generation and merge probes need no video case.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...families import CLIP_MEAN, CLIP_STD, LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from ..cogvlm.processing import IGNORE_INDEX, CogVLMProcessor, EncodedExample, RowTooLong, encode_conversation
from .video import FrameCache, FrameSampling, VideoDecodeError, default_cache_dir, probe_video, sample_indices

if TYPE_CHECKING:
    from data_formats.schema import Conversation

VIDEO_MARKER = "<video>"


def transform_video(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (T, 3, S, S) float32, in the official order (§21.4).

    /255 -> CLIP mean/std per channel -> short side to S (bilinear, align_corners=False, no antialias; the long
    side floor(long/short*S)) -> centre crop S x S (offsets rounded). Normalising before the resize is the
    official order; the crop offset uses Python's round (half to even), as torchvision's video crop does.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(3, 0, 1, 2) / 255.0  # (3, T, H, W) float32
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype)[:, None, None, None]
    std = torch.tensor(CLIP_STD, dtype=x.dtype)[:, None, None, None]
    x = (x - mean) / std
    _, _, h, w = x.shape
    if w < h:
        new_h, new_w = int(np.floor(h / w * image_size)), image_size
    else:
        new_h, new_w = image_size, int(np.floor(w / h * image_size))
    # (3, T, H, W) read as a batch of 3 "images" with T channels: a plain 2-D bilinear resize of every frame.
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    x = x[..., top:top + image_size, left:left + image_size]
    return x.transpose(0, 1).contiguous()  # (T, 3, S, S)


def video_span(tokenizer: Any, n_frames: int, frame_tokens: int, template_version: str) -> tuple[list[int], list[int]]:
    """(ids, types) of a video's placeholders; `chat` adds each frame's time index as LANGUAGE tokens."""
    placeholder = tokenizer.pad_token_id
    ids: list[int] = []
    types: list[int] = []
    for t in range(n_frames):
        ids += [placeholder] * frame_tokens
        types += [VISION_TOKEN_TYPE] * frame_tokens
        if template_version == "chat":
            stamp = tokenizer.encode(str(t), add_special_tokens=False)
            ids += stamp
            types += [LANGUAGE_TOKEN_TYPE] * len(stamp)
    return ids, types


def _without_video_markers(conv: Conversation) -> Conversation:
    """The conversation with `<video>` markers removed from the text and no video (the span sits after BOS)."""
    import copy

    out = copy.copy(conv)
    out.messages = [copy.copy(m) for m in conv.messages]
    for m in out.messages:
        if VIDEO_MARKER in m.content:
            m.content = re.sub(r"\s*" + re.escape(VIDEO_MARKER) + r"\s*", " ", m.content).strip()
    out.videos = []
    return out


def encode_video_conversation(
    conv: Conversation,
    tokenizer: Any,
    *,
    n_frames: int,
    frame_tokens: int,
    template_version: str,
    max_length: int | None = None,
    last_turn_only: bool = False,
    add_generation_prompt: bool = False,
) -> EncodedExample:
    """Token ids, types and labels of a video conversation; `images` holds the video path (one entry).

    A row without a video is encoded as text only (the model accepts it). Truncation drops the oldest turns
    whole; the video span is never cut (RowTooLong when the last turn and the video do not fit).
    """
    videos = list(getattr(conv, "videos", []) or [])
    if len(videos) > 1:
        raise ValueError(f"row {conv.id!r}: {len(videos)} videos; CogVLM2-Video takes one per conversation")
    if conv.images:
        raise ValueError(f"row {conv.id!r}: images given to a video model; give the row a video instead")
    span_ids, span_types = video_span(tokenizer, n_frames, frame_tokens, template_version) if videos else ([], [])
    budget = None if max_length is None else max_length - len(span_ids)
    try:
        text = encode_conversation(_without_video_markers(conv), tokenizer, image_tokens=frame_tokens,
                                   template_version=template_version, max_length=budget,
                                   last_turn_only=last_turn_only, add_generation_prompt=add_generation_prompt)
    except RowTooLong as err:
        raise RowTooLong(f"{err} (after {len(span_ids)} tokens of video: {n_frames} frames)", err.length +
                         len(span_ids), max_length or 0) from None
    # text = [BOS] + turns; the video goes right after BOS (official layout).
    ids = text.input_ids[:1] + span_ids + text.input_ids[1:]
    types = text.token_type_ids[:1] + span_types + text.token_type_ids[1:]
    labels = text.labels[:1] + [IGNORE_INDEX] * len(span_ids) + text.labels[1:]
    return EncodedExample(ids, types, labels, videos, text.dropped_turns, str(conv.id))


def sampling_from(settings: dict[str, Any] | FrameSampling) -> FrameSampling:
    return settings if isinstance(settings, FrameSampling) else FrameSampling(**settings)


@functools.lru_cache(maxsize=4096)
def _frame_count(path: str, size: int, mtime_ns: int, sampling: FrameSampling) -> int:
    return len(sample_indices(probe_video(path), sampling))


def frame_count(path: str, sampling: FrameSampling) -> int:
    """Frames the sampling takes from `path`, from its timestamps only (no pixel decoding); memoised per file."""
    st = os.stat(path)
    return _frame_count(path, st.st_size, st.st_mtime_ns, sampling)


class CogVLMVideoProcessor(CogVLMProcessor):
    """`CogVLMProcessor` for CogVLM2-Video: the video layout in `encode`, sampled frames as the model's `images`.

    Extra settings (saved, fingerprinted; None in `from_config` keeps the default):
      num_frames    frames sampled per video (24, the official demo's)
      fps           `chat` template: samples per second of video (1, the demo's)
      clip_seconds  `base` template: frames spread over the first this many seconds (60; None: whole video)

    `encode` reads the frame count off the file's timestamps (no decoding) and puts the video right after BOS
    (chat: time-index tokens after each frame; base: one VISION run). `transform_image(path)` gives the
    (T, 3, S, S) sampled frames, decoded once per (file, sampling) and kept in memory and on disk (`cache_dir`,
    default `default_cache_dir()`), so later epochs never decode again; `batch_input("images")` concatenates
    the frames of every row in row order (N_frames, 3, S, S), the order the model cuts them into spans.
    A video that cannot be read is a ValueError in `encode` (the dataset counts the row invalid) and an
    `ImageError` in `transform_image` (the trainer's decode-failure path).
    """

    SETTINGS = CogVLMProcessor.SETTINGS + ("num_frames", "fps", "clip_seconds")
    media = "video"  # what a row's media file is (chat --video, merge probes)

    def __init__(self, tokenizer: Any, *, num_frames: int = 24, fps: float = 1.0, clip_seconds: float | None = 60.0,
                 cache_dir: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.num_frames = int(num_frames)
        self.fps = float(fps)
        self.clip_seconds = None if clip_seconds is None else float(clip_seconds)
        self.sampling = FrameSampling.for_template(self.template_version, self.num_frames, self.fps, self.clip_seconds)
        self.cache_dir = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
        self._cache: FrameCache | None = None

    @classmethod
    def model_class(cls) -> type:
        from .modeling import CogVLMVideoForCausalLM

        return CogVLMVideoForCausalLM

    @classmethod
    def config_class(cls) -> type:
        from .configuration import CogVLMVideoConfig

        return CogVLMVideoConfig

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any, **settings: Any) -> CogVLMVideoProcessor:
        """As `CogVLMProcessor.from_config`; `cache_dir` (not a setting: it never changes the bytes) also passes."""
        cache_dir = settings.pop("cache_dir", None)
        clip_given, clip = "clip_seconds" in settings, settings.pop("clip_seconds", None)
        out = super().from_config(config, tokenizer, **settings)
        if clip_given:  # None here means "the whole video" (a saved setting), not "the default"
            out = out.with_settings(clip_seconds=clip)
        if cache_dir is not None:
            out.cache_dir = str(cache_dir)
        return out

    def with_settings(self, **changes: Any) -> CogVLMVideoProcessor:
        out = super().with_settings(**changes)
        out.cache_dir = self.cache_dir
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # DataLoader workers build their own (no frame arrays pickled)

    @property
    def cache(self) -> FrameCache:
        """The decoded-frame cache (memory + `cache_dir`), built on first use in each process."""
        if self._cache is None:
            self._cache = FrameCache(self.cache_dir)
        return self._cache

    def encode(self, conversation: Conversation, add_generation_prompt: bool = False) -> EncodedExample:
        """The video layout (module docstring); `images` holds the video path (one entry) or nothing."""
        videos = list(getattr(conversation, "videos", None) or [])
        try:
            n = frame_count(videos[0], self.sampling) if videos else 0
        except (VideoDecodeError, OSError) as err:
            raise ValueError(f"row {conversation.id!r}: videos[0]: {err}") from None
        return encode_video_conversation(
            conversation, self.tokenizer, n_frames=n, frame_tokens=self.image_tokens,
            template_version=self.template_version, max_length=self.max_length, last_turn_only=self.last_turn_only,
            add_generation_prompt=add_generation_prompt)

    def transform_image(self, ref: Any) -> torch.Tensor:
        """(T, 3, S, S) float32 sampled frames of one video path; a tensor passes through."""
        from data_formats.schema import ImageError

        if isinstance(ref, torch.Tensor):
            return ref
        try:
            return transform_video(self.cache.frames(str(ref), self.sampling), self.image_size)
        except VideoDecodeError as err:
            raise ImageError(str(err)) from None

    def batch_input(self, name: str, values: Sequence[Any]) -> torch.Tensor | None:
        """`images`: the frames of every row's video, concatenated in row order, (N_frames, 3, S, S), or None."""
        if name == "images":
            frames = [self.transform_image(ref) for refs in values for ref in refs]
            return torch.cat([f if f.dim() == 4 else f[None] for f in frames]) if frames else None
        return super().batch_input(name, values)
