"""CogVLM2-Video inputs: frame transform, the video span with time-index tokens, conversations, collator.

Sequence layout (docs/architecture.md §21.3, §21.4)::

    chat:  [BOS] [frame 0: span VISION] "0" [frame 1: span VISION] "1" ... [turn 0 prompt] [answer] [EOS] ...
    base:  [BOS] [frame 0 span][frame 1 span] ... (one VISION run) [turn 0 prompt] [answer] [EOS] ...

`span` is `config.image_tokens` (66 for 224-px frames: 8x8 features + boi + eoi). In `chat` every frame is
followed by the LANGUAGE tokens of `str(t)` (its index, no separator): each frame is its own VISION run with 3
position ids plus its time tokens. In `base` the frames touch, so the whole video is one run and costs 3
position ids in all. The text part is exactly the image models' (`encode_conversation`: templates, multi-turn,
labels, truncation by whole turns); the video replaces the image span right after BOS and is never cut.

Frames: `FrameSampling` (video.py) picks them as the official demo does (chat: 1 fps up to 24; base: 24
uniform over the first 60 s); `num_frames`, `fps` and `clip_seconds` are settings of the processor.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ...families import CLIP_MEAN, CLIP_STD, LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE
from ..cogvlm.processing import IGNORE_INDEX, CogVLMCollator, EncodedExample, RowTooLong, encode_conversation
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
        text = encode_conversation(_without_video_markers(conv), tokenizer, family_version=2,
                                   image_tokens=frame_tokens, template_version=template_version, max_length=budget,
                                   last_turn_only=last_turn_only, add_generation_prompt=add_generation_prompt)
    except RowTooLong as err:
        raise RowTooLong(f"{err} (after {len(span_ids)} tokens of video: {n_frames} frames)", err.length +
                         len(span_ids), max_length or 0) from None
    # text = [BOS] + turns; the video goes right after BOS (official layout).
    ids = text.input_ids[:1] + span_ids + text.input_ids[1:]
    types = text.token_type_ids[:1] + span_types + text.token_type_ids[1:]
    labels = text.labels[:1] + [IGNORE_INDEX] * len(span_ids) + text.labels[1:]
    return EncodedExample(ids, types, labels, videos, text.dropped_turns, str(conv.id))


@dataclass
class CogVLMVideoCollator(CogVLMCollator):
    """`CogVLMCollator` for video rows: encodes with the video layout, loads each row's sampled frames.

    Output as the image collator's, except `images`: (N_frames, 3, S, S), the frames of every row's video
    concatenated in row order (the model cuts them into 66-token spans in the same order).
    Frame sampling is a setting (`num_frames`, `fps`, `clip_seconds`; defaults per template); decoded frames
    are cached (memory + `cache_dir`), so later epochs never decode again.
    """

    num_frames: int | None = None
    fps: float | None = None
    clip_seconds: float | None = 60.0
    cache_dir: str | Path | None = None
    cache: FrameCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        template = self.template_version or self.config.template_version
        self.sampling = FrameSampling.for_template(template, self.num_frames, self.fps, self.clip_seconds)
        if self.cache is None:
            self.cache = FrameCache(self.cache_dir if self.cache_dir is not None else default_cache_dir())

    def frames(self, path: str) -> torch.Tensor:
        """(T, 3, S, S) model-ready frames of one video file."""
        return transform_video(self.cache.frames(path, self.sampling), self.image_size)

    def encode(self, conv: Conversation) -> EncodedExample:
        n = self.cache.frames(conv.videos[0], self.sampling).shape[0] if getattr(conv, "videos", None) else 0
        return encode_video_conversation(
            conv, self.tokenizer, n_frames=n, frame_tokens=self.config.image_tokens,
            template_version=self.template_version or self.config.template_version, max_length=self.max_length,
            last_turn_only=self.last_turn_only, add_generation_prompt=self.add_generation_prompt)

    def _image(self, ref: Any) -> torch.Tensor:
        return ref if isinstance(ref, torch.Tensor) else self.frames(str(ref))


def sampling_from(settings: dict[str, Any] | FrameSampling) -> FrameSampling:
    return settings if isinstance(settings, FrameSampling) else FrameSampling(**settings)


@functools.lru_cache(maxsize=4096)
def _frame_count(path: str, size: int, mtime_ns: int, sampling: FrameSampling) -> int:
    return len(sample_indices(probe_video(path), sampling))


def frame_count(path: str, sampling: FrameSampling) -> int:
    """Frames the sampling takes from `path`, from its timestamps only (no pixel decoding); memoised per file."""
    st = os.stat(path)
    return _frame_count(path, st.st_size, st.st_mtime_ns, sampling)


def encode_video_row(conv: Conversation, tokenizer: Any, *, video_sampling: dict[str, Any], image_tokens: int,
                     template_version: str, max_length: int | None = None, last_turn_only: bool = False,
                     **_: Any) -> EncodedExample:
    """`encode_video_conversation` with the frame count read off the file (the dataset's encoder for video rows).

    Takes the image encoder's settings (the unused ones are ignored) plus `video_sampling` (FrameSampling
    fields). A video that cannot be read is a ValueError, which the dataset counts as an invalid row.
    """
    sampling = sampling_from(video_sampling)
    try:
        n = frame_count(conv.videos[0], sampling) if conv.videos else 0
    except (VideoDecodeError, OSError) as err:
        raise ValueError(f"videos[0]: {err}") from None
    return encode_video_conversation(conv, tokenizer, n_frames=n, frame_tokens=image_tokens,
                                     template_version=template_version, max_length=max_length,
                                     last_turn_only=last_turn_only)


class VideoFrameLoader:
    """video path -> (T, 3, S, S) frames, for DataLoader workers; each worker keeps its own memory cache and all
    share the disk cache. A video that fails to decode raises `ImageError` (the trainer's decode-failure path)."""

    def __init__(self, video_sampling: dict[str, Any] | FrameSampling, image_size: int,
                 cache_dir: str | Path | None = None) -> None:
        self.sampling = sampling_from(video_sampling)
        self.image_size = image_size
        self.cache_dir = str(cache_dir) if cache_dir is not None else str(default_cache_dir())
        self._cache: FrameCache | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # workers build their own (no arrays pickled across)

    def __call__(self, ref: Any) -> torch.Tensor:
        from data_formats.schema import ImageError

        if isinstance(ref, torch.Tensor):
            return ref
        if self._cache is None:
            self._cache = FrameCache(self.cache_dir)
        try:
            return transform_video(self._cache.frames(str(ref), self.sampling), self.image_size)
        except VideoDecodeError as err:
            raise ImageError(str(err)) from None


def collator_class(config: Any) -> type[CogVLMCollator]:
    """The video collator for a CogVLM2-Video config (no vision experts), else the image one."""
    return CogVLMCollator if getattr(config, "vision_expert", True) else CogVLMVideoCollator


def video_settings(config: Any, template_version: str, num_frames: int | None = None,
                   fps: float | None = None) -> dict[str, Any] | None:
    """FrameSampling fields for a video config (None for image models): what the dataset encoder and loader take."""
    if getattr(config, "vision_expert", True):
        return None
    s = FrameSampling.for_template(template_version, num_frames, fps)
    return {"policy": s.policy, "num_frames": s.num_frames, "fps": s.fps, "clip_seconds": s.clip_seconds}
