"""Video checks for `cogtune validate` and training's up-front validation (docs/architecture.md §21.4).

Every distinct video of the valid rows is opened with PyAV and its frame timestamps read (no pixel decoding:
a packet pass, fast even for long files). A file that does not open, has no video stream or no frame is an
error of each row that uses it; the rest are reported with duration, fps and frame count.
"""

from __future__ import annotations

import statistics
from typing import Any

from .video import FrameSampling, VideoDecodeError, VideoInfo, probe_video, sample_indices


def check_videos(convs: list[Any], problems: list[Any]) -> tuple[list[Any], dict[str, VideoInfo]]:
    """(rows whose video opens, {path: VideoInfo}); a row with a broken video gets an error in `problems`."""
    from data_formats.schema import Problem

    infos: dict[str, VideoInfo] = {}
    broken: dict[str, str] = {}
    for path in sorted({v for c in convs for v in getattr(c, "videos", [])}):
        try:
            infos[path] = probe_video(path)
        except VideoDecodeError as err:
            broken[path] = str(err)
    kept = []
    for conv in convs:
        bad = [v for v in getattr(conv, "videos", []) if v in broken]
        if bad:
            problems.append(Problem(conv.source, "videos[0]", broken[bad[0]],
                                    "re-encode the file (e.g. to H.264 MP4) or drop the row", "error",
                                    "unreadable video"))
        else:
            kept.append(conv)
    return kept, infos


def frames_seen(info: VideoInfo, sampling: FrameSampling) -> int:
    """How many frames the processor takes from this video."""
    return len(sample_indices(info, sampling))


def video_report_lines(infos: dict[str, VideoInfo], sampling: FrameSampling, frame_tokens: int,
                       show: int = 20) -> list[str]:
    """Duration / fps / frame count per video (the first `show`) and over all, plus what the sampling keeps."""
    if not infos:
        return []
    lines = [f"videos ({len(infos)} files; sampling '{sampling.policy}': at most {sampling.num_frames} frames"
             + (f", {sampling.fps:g} per second)" if sampling.policy == "seconds"
                else f" spread over the first {sampling.clip_seconds:g} s)")]
    for path, info in list(infos.items())[:show]:
        n = frames_seen(info, sampling)
        lines.append(f"  {path}: {info.duration:.2f} s, {info.avg_fps:.3g} fps, {info.frames} frames, "
                     f"{info.width}x{info.height} -> {n} frames x {frame_tokens} tokens")
    if len(infos) > show:
        lines.append(f"  ... and {len(infos) - show} more")
    durations = sorted(i.duration for i in infos.values())
    lines.append(f"  duration min {durations[0]:.2f} s / median {statistics.median(durations):.2f} s / max "
                 f"{durations[-1]:.2f} s")
    limit = sampling.num_frames / sampling.fps if sampling.policy == "seconds" else sampling.clip_seconds
    longer = [p for p, i in infos.items() if limit is not None and i.duration > limit + 1]
    if longer:
        lines.append(f"  note: {len(longer)} video(s) are longer than {limit:g} s; the model sees only their first "
                     f"{limit:g} s (raise num_frames, or cut the videos)")
    return lines
