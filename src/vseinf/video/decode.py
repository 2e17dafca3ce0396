"""Video files → frames: which frames of a clip to keep, and decoding them with PyAV.

PyAV's wheels bundle FFmpeg; it is an optional extra (``pip install 'vseinf[video]'``), imported
on first use. A file that cannot be decoded raises :class:`VideoDecodeError`, naming the file.

- :class:`FrameSampler` — a uniform count over the clip, or a rate in frames per second;
- :func:`decode_frames` — one pass over a clip, yielding the sampled frames as PIL images
  (:func:`decode_all_frames` is its slow, obviously-right twin, for tests);
- :func:`middle_frame` — a clip's middle frame (a thumbnail); :func:`list_videos` — a folder's clips.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".3gp", ".ts", ".gif")


class VideoDecodeError(ValueError):
    """A file that is not a decodable video (the message names it and says why)."""


def _av():
    # PyAV is an optional extra (vseinf[video]): imported on first decode.
    try:
        import av
    except ImportError:
        raise ValueError("decoding video files needs PyAV (pip install av, or "
                         "pip install 'vseinf[video]')") from None
    return av


@dataclass
class FrameSampler:
    """Which frames of a clip become its feature set.

    Args:
        num_frames: a uniform count: the clip is cut into this many equal segments and the
            middle frame of each is kept (clips with fewer frames keep them all).
        fps: instead of a count, keep frames at this rate (the first frame at or after each
            multiple of 1/fps seconds); ``num_frames`` must then be ``None``.
        max_frames: with ``fps``, keep at most this many (evenly thinned); ``None``: no cap.
    """

    num_frames: int | None = 32
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("frame sampling: give either a frame count or an fps, not both")
        if self.num_frames is not None and int(self.num_frames) <= 0:
            raise ValueError(f"frame sampling: num_frames must be positive, got {self.num_frames}")
        if self.fps is not None and not float(self.fps) > 0:
            raise ValueError(f"frame sampling: fps must be positive, got {self.fps}")
        if self.max_frames is not None and int(self.max_frames) <= 0:
            raise ValueError(f"frame sampling: max_frames must be positive, got {self.max_frames}")

    def uniform_indices(self, n_frames: int) -> list[int]:
        """Frame indices for a clip of ``n_frames`` frames (count mode)."""
        n = int(self.num_frames)
        if n_frames <= n:
            return list(range(n_frames))
        return [int((k + 0.5) * n_frames / n) for k in range(n)]

    def select(self, times: Sequence[float]) -> list[int]:
        """Indices of the frames to keep, given every frame's time in seconds (in order).

        The reference rule that :func:`decode_frames` applies while streaming.
        """
        if self.num_frames is not None:
            return self.uniform_indices(len(times))
        keep, target = [], 0.0
        step = 1.0 / float(self.fps)
        for i, t in enumerate(times):
            if t + 1e-6 >= target:
                keep.append(i)
                target = (math.floor((t + 1e-6) / step) + 1) * step
        return self._cap(keep)

    def _cap(self, keep: list[int]) -> list[int]:
        if self.max_frames is None or len(keep) <= self.max_frames:
            return keep
        m = int(self.max_frames)
        return [keep[int((k + 0.5) * len(keep) / m)] for k in range(m)]


def _open(path: Path):
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: not a readable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-parallel decoding; the output order is unchanged
    return container, stream


def _frame_time(frame, index: int, rate: float) -> float:
    return float(frame.time) if frame.time is not None else index / rate


def _count_frames(path: Path) -> int:
    """Frames in the clip: the container's count, or (when it has none) a count of its packets."""
    container, stream = _open(path)
    try:
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except _av().error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot read ({e})") from None
    finally:
        container.close()


def decode_frames(path: str | os.PathLike, sampler: FrameSampler) -> Iterator:
    """Decodes ``path`` once, yielding the sampled frames as RGB PIL images, in order.

    Only the kept frames are converted, so memory stays at one frame. Raises
    :class:`VideoDecodeError` for a file that cannot be decoded or holds no frame.
    """
    path = Path(path)
    av = _av()
    wanted: set[int] | None = None
    if sampler.num_frames is not None:
        wanted = set(sampler.uniform_indices(_count_frames(path)))
    container, stream = _open(path)
    rate = float(stream.average_rate or 25)
    target, step = 0.0, (1.0 / float(sampler.fps) if sampler.fps else 0.0)
    n = 0
    try:
        if sampler.fps is not None and sampler.max_frames is not None:
            # The cap thins the whole clip evenly, so the kept set is known only at the end:
            # take the times first (cheap: no colour conversion), then decode again.
            times = [_frame_time(f, i, rate) for i, f in enumerate(container.decode(stream))]
            container.close()
            wanted = set(sampler.select(times))
            container, stream = _open(path)
        for i, frame in enumerate(container.decode(stream)):
            n = i + 1
            if wanted is not None:
                if i in wanted:
                    yield frame.to_image()
                continue
            t = _frame_time(frame, i, rate)
            if t + 1e-6 >= target:
                yield frame.to_image()
                target = (math.floor((t + 1e-6) / step) + 1) * step
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed after {n} frames ({e})") from None
    finally:
        container.close()
    if n == 0:
        raise VideoDecodeError(f"{path}: no decodable frame")


def decode_all_frames(path: str | os.PathLike) -> tuple[list, list[float]]:
    """The slow, obviously-right twin of :func:`decode_frames`: every frame and its time.

    ``[frames[i] for i in sampler.select(times)]`` equals ``list(decode_frames(path, sampler))``.
    Holds the whole clip in memory: for tests and short clips only.
    """
    path = Path(path)
    container, stream = _open(path)
    rate = float(stream.average_rate or 25)
    try:
        frames, times = [], []
        for i, frame in enumerate(container.decode(stream)):
            frames.append(frame.to_image())
            times.append(_frame_time(frame, i, rate))
    except _av().error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: decoding failed ({e})") from None
    finally:
        container.close()
    return frames, times


def middle_frame(path: str | os.PathLike):
    """The frame in the middle of a clip, as a PIL image (for thumbnails)."""
    frames = list(decode_frames(path, FrameSampler(num_frames=1)))
    if not frames:
        raise VideoDecodeError(f"{path}: no decodable frame")
    return frames[0]


def list_videos(folder: str | os.PathLike) -> list[Path]:
    """The video files in ``folder`` (by suffix, sorted); an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of videos")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files
