"""Video files -> sampled RGB frames, with PyAV (the `av` wheel bundles FFmpeg: no system FFmpeg, no decord).

Frame sampling follows the official CogVLM2-Video demo (docs/architecture.md §21.4), as two named policies:

* ``"seconds"`` (the `chat` template): for each whole second 0, 1, ... up to round(last timestamp), the frame
  whose timestamp is nearest (the first one on a tie), at most `num_frames` frames. `fps` > 1 samples more
  often than once a second (the official demo uses 1).
* ``"uniform"`` (the `base` template): `num_frames` frame indices spread evenly (and truncated to integers, as
  numpy's `linspace(..., dtype=int)`) over the first `clip_seconds` seconds.

Decoding is the slow part of a video row, so sampled frames are cached on disk (one `.npy` of uint8 frames per
(file, size, mtime, sampling) key): later epochs and later runs read them back instead of decoding again. The
cache stores the exact decoded pixels; the model transform runs on them unchanged, so cached and fresh rows
give the same tensors.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

SamplingPolicy = Literal["seconds", "uniform"]


class VideoDecodeError(ValueError):
    """A video file that does not open or holds no decodable video frame."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` reports: presentation timestamps of every frame (seconds, sorted) and the stream rate."""

    path: str
    timestamps: tuple[float, ...]
    avg_fps: float
    width: int
    height: int

    @property
    def frames(self) -> int:
        return len(self.timestamps)

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last one (frame count / fps when timestamps are even)."""
        if not self.timestamps:
            return 0.0
        step = 1.0 / self.avg_fps if self.avg_fps > 0 else 0.0
        return self.timestamps[-1] - self.timestamps[0] + step


@dataclass(frozen=True)
class FrameSampling:
    """How frames are picked from a video: a processor setting (`num_frames`, `fps`, `clip_seconds`)."""

    policy: SamplingPolicy = "seconds"
    num_frames: int = 24
    fps: float = 1.0  # "seconds" policy: samples per second of video
    clip_seconds: float | None = 60.0  # "uniform" policy: only the first this many seconds (None: whole video)

    def __post_init__(self) -> None:
        if self.policy not in ("seconds", "uniform"):
            raise ValueError(f"frame sampling policy must be 'seconds' or 'uniform', got {self.policy!r}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    @classmethod
    def for_template(cls, template_version: str, num_frames: int | None = None, fps: float | None = None,
                     clip_seconds: float | None = 60.0) -> FrameSampling:
        """The official demo's choice: `chat` -> one frame a second, `base` (and others) -> uniform over 60 s."""
        policy: SamplingPolicy = "seconds" if template_version == "chat" else "uniform"
        return cls(policy, 24 if num_frames is None else num_frames, 1.0 if fps is None else fps, clip_seconds)

    def key(self) -> str:
        return f"{self.policy}:{self.num_frames}:{self.fps:g}:{self.clip_seconds}"


def _open(path: str | Path):
    import av

    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoDecodeError(f"{path}: cannot open as a video ({type(err).__name__}: {err})") from None


def probe_video(path: str | Path) -> VideoInfo:
    """Timestamps of every frame, read from the container's packets (no pixel decoding), plus the stream rate.

    Falls back to decoding when packets carry no timestamps. VideoDecodeError when there is no video stream or
    no frame.
    """
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream (audio-only or not a video file)")
        stream = container.streams.video[0]
        tb = float(stream.time_base) if stream.time_base else 0.0
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    pts.append(packet.pts)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"{path}: damaged video ({err})") from None
        if not pts or not tb:
            times = [f.time for f in _decode_all(path)]
        else:
            pts.sort()
            times = [(p - pts[0]) * tb for p in pts]
        rate = stream.average_rate or stream.guessed_rate
        avg_fps = float(rate) if rate else (len(times) / max(times[-1], 1e-9) if len(times) > 1 else 0.0)
        width, height = stream.codec_context.width, stream.codec_context.height
    if not times:
        raise VideoDecodeError(f"{path}: the video stream holds no frame")
    return VideoInfo(str(path), tuple(float(t) for t in times), avg_fps, int(width), int(height))


def _decode_all(path: str | Path):
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        try:
            yield from container.decode(video=0)
        except av.error.FFmpegError as err:
            raise VideoDecodeError(f"{path}: damaged video ({err})") from None


def sample_indices(info: VideoInfo, sampling: FrameSampling) -> list[int]:
    """Indices (presentation order) of the frames the policy picks; the official demo's rules (§21.4)."""
    n = info.frames
    if sampling.policy == "uniform":
        end = n
        if sampling.clip_seconds is not None:
            end = min(n, int(sampling.clip_seconds * info.avg_fps))
        end = max(end, 1)
        return np.linspace(0, end - 1, sampling.num_frames, dtype=int).tolist()
    times = list(info.timestamps)
    # round() is Python's (half to even), as in the demo; one slot per 1/fps seconds.
    slots = round(max(times) * sampling.fps) + 1
    out: list[int] = []
    for k in range(slots):
        target = k / sampling.fps
        out.append(min(range(n), key=lambda i: abs(times[i] - target)))  # first index on a tie, as list.index
        if len(out) >= sampling.num_frames:
            break
    return out


def decode_frames(path: str | Path, indices: list[int]) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames at `indices` (presentation order; repeats allowed), one decoding pass."""
    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    last = max(indices)
    # Decoded frames come out in presentation order for a single video stream.
    for i, frame in enumerate(_decode_all(path)):
        if i in wanted:
            got[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    missing = sorted(wanted - set(got))
    if missing:
        raise VideoDecodeError(f"{path}: frames {missing[:5]} could not be decoded (the file is shorter than its "
                               f"packets say, or damaged)")
    return np.stack([got[i] for i in indices])


class FrameCache:
    """Sampled frames by (resolved path, size, mtime, sampling): in memory (a few videos) and on disk (`root`).

    Disk entries are written atomically with the user's umask; nothing outside `root` is written or removed.
    """

    def __init__(self, root: str | Path | None = None, memory_items: int = 8) -> None:
        self.root = Path(root) if root is not None else None
        self.memory_items = memory_items
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self.decodes = 0  # how many times a file was actually decoded (tests read it)

    @staticmethod
    def key(path: str | Path, sampling: FrameSampling) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        raw = f"{real}|{st.st_size}|{st.st_mtime_ns}|{sampling.key()}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def frames(self, path: str | Path, sampling: FrameSampling) -> np.ndarray:
        """(T, H, W, 3) uint8 sampled frames of `path`, decoded at most once per key."""
        try:
            key = self.key(path, sampling)
        except OSError as err:
            raise VideoDecodeError(f"{path}: cannot read ({err.strerror})") from None
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        file = self.root / f"{key}.npy" if self.root is not None else None
        arr = None
        if file is not None and file.is_file():
            try:
                arr = np.load(file, allow_pickle=False)
            except (OSError, ValueError):
                arr = None  # a damaged entry is decoded again and replaced
        if arr is None:
            info = probe_video(path)
            arr = decode_frames(path, sample_indices(info, sampling))
            self.decodes += 1
            if file is not None:
                from ...fileio import write_atomic

                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                write_atomic(file, buf.getvalue())
        self._memory[key] = arr
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return arr


def default_cache_dir() -> Path:
    """`$COGTUNE_CACHE/video-frames`, else `~/.cache/cogtune/video-frames`."""
    base = os.environ.get("COGTUNE_CACHE")
    return Path(base) / "video-frames" if base else Path.home() / ".cache" / "cogtune" / "video-frames"


def write_test_video(path: str | Path, colours: list[tuple[int, int, int]], fps: int = 1,
                     size: tuple[int, int] = (32, 24), frames_per_colour: int = 1) -> Path:
    """Write a tiny video of solid colour frames (H.264 if available, else MPEG-4): for tests and the demo."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    with av.open(str(path), mode="w") as out:
        codec = "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for colour in colours:
            img = np.empty((h, w, 3), dtype=np.uint8)
            img[:] = colour
            for _ in range(frames_per_colour):
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path

