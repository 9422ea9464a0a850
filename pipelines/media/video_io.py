"""Streaming video reading and atomic writing with PyAV (FFmpeg), for the CLI and batch tools.

Frames are decoded and encoded in chunks, so memory stays bounded by the chunk size whatever the video length.
``VideoWriter`` keeps the source's timestamps (hence its frame rate, also variable frame rates), its display
rotation, and copies (remuxes, without re-encoding) its first audio track, interleaved with the video as it is
written. The output is written under a hidden temporary name and renamed into place when it is complete.

No silent wrong output: a file that ends before the frame count (or duration) its header announces raises
:class:`VideoTruncatedError` once the frames run out, and HDR (PQ/HLG) or more-than-8-bit videos are refused when
opened (they would come out as 8-bit SDR, untagged, with PQ/HLG code values brightened as if they were SDR).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np

from .atomic_files import temporary_path_for

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".m4v"})


class VideoFileError(ValueError):
    """A video file could not be read or written; the message names the file."""


class VideoTruncatedError(VideoFileError):
    """The frames ran out before the count/duration the file announces (a cut-off copy or recording).

    Attributes: ``decoded`` frames, ``announced`` frames (``None`` if the header gives a duration only).
    """

    def __init__(self, message: str, decoded: int, announced: int | None):
        super().__init__(message)
        self.decoded, self.announced = decoded, announced


# FFmpeg's AVColorTransferCharacteristic values of the two HDR transfer functions.
_HDR_TRANSFERS = {16: "PQ (SMPTE ST 2084)", 18: "HLG (ARIB STD-B67)"}


@dataclass
class VideoChunk:
    """Consecutive decoded frames.

    Attributes:
        frames: ``[N, H, W, 3]`` uint8 RGB.
        pts: N presentation timestamps in the source stream's ``time_base`` (``None`` where the file has none).
    """

    frames: np.ndarray
    pts: list[int | None]


class VideoReader:
    """Decodes the first video track of a file in chunks of RGB frames.

    Attributes:
        path, width, height, fps (``Fraction``), time_base (``Fraction``),
        frame_count: number of frames announced by the container (``None`` if unknown),
        rotation: display rotation in degrees read from the first decoded frame (0 before decoding),
        has_audio: the file has an audio track (``VideoWriter`` copies the first one).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as error:
            raise VideoFileError(f"{self.path}: not a readable video ({error})") from error
        if not self._container.streams.video:
            self._container.close()
            raise VideoFileError(f"{self.path}: no video track")
        self.stream = self._container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame/slice threading inside FFmpeg's decoder
        self.width = self.stream.codec_context.width
        self.height = self.stream.codec_context.height
        self.fps = Fraction(self.stream.average_rate or self.stream.guessed_rate or 25)
        self.time_base = Fraction(self.stream.time_base) if self.stream.time_base else 1 / self.fps
        self.frame_count = self.stream.frames or None
        self.duration = float(self.stream.duration * self.time_base) if self.stream.duration else None
        self.rotation = 0
        self.has_audio = bool(self._container.streams.audio)
        problem = self._unsupported_pixels()
        if problem:
            self._container.close()
            raise VideoFileError(f"{self.path}: {problem}")

    def _unsupported_pixels(self) -> str | None:
        """Why the frames cannot go through 8-bit RGB without silently changing their meaning, or None."""
        codec = self.stream.codec_context
        pix_fmt = codec.pix_fmt
        bits = av.VideoFormat(pix_fmt).components[0].bits if pix_fmt else 8
        transfer = _HDR_TRANSFERS.get(getattr(codec, "color_trc", None))
        if transfer:
            return (f"HDR video ({transfer} transfer, {bits}-bit {pix_fmt}) is not supported: it would come out as "
                    "untagged 8-bit SDR with its HDR values brightened as if they were SDR; tone-map it to 8-bit SDR "
                    "first (e.g. with ffmpeg's zscale and tonemap filters) and enhance that")
        if bits > 8:
            return (f"{bits}-bit video ({pix_fmt}) is not supported: it would silently come out with 8 bits per "
                    f"channel; convert it to 8 bits first (e.g. ffmpeg -i {self.path.name} -pix_fmt yuv420p "
                    "OUT.mp4) if that loss is acceptable")
        return None

    def _shortfall(self, decoded: int, end_time: Fraction | None) -> VideoTruncatedError | None:
        """A :class:`VideoTruncatedError` when the frames ran out clearly before the header's promise, else None.

        One frame of slack on the count and two frame durations on the duration: edit lists and rounding can
        make a complete file decode a frame less than its sample table lists.
        """
        announced = self.frame_count
        seconds = f"{float(end_time or 0):.2f} s" + (f" of {self.duration:.2f} s" if self.duration else "")
        if announced and decoded < announced - 1:
            what = f"after {decoded} of the {announced} frames its header announces ({seconds})"
        elif not announced and self.duration and end_time is not None and end_time < self.duration - 2 / self.fps:
            what = f"at {seconds} its header announces, after {decoded} frames"
        else:
            return None
        return VideoTruncatedError(
            f"{self.path}: the video ends {what}: the file is truncated (an interrupted copy, download or "
            f"recording); nothing was written for it (limit the frames to {decoded}, e.g. --max-frames {decoded}, "
            "to enhance the part that is there)", decoded, announced,
        )

    def chunks(self, chunk_size: int = 8, max_frames: int | None = None) -> Iterator[VideoChunk]:
        """Yield the frames in order, ``chunk_size`` at a time (the last chunk may be shorter).

        Args:
            chunk_size: frames per chunk (>= 1); memory is about ``chunk_size * H * W * 3`` bytes per chunk.
            max_frames: stop after this many frames (``None``: the whole video).
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
        frames: list[np.ndarray] = []
        pts: list[int | None] = []
        count = 0
        end_time: Fraction | None = None  # end of the latest frame shown, in seconds
        stopped_early = False
        try:
            for frame in self._container.decode(self.stream):
                if max_frames is not None and count >= max_frames:
                    stopped_early = True
                    break
                if count == 0:
                    self.rotation = int(round(getattr(frame, "rotation", 0) or 0))
                frames.append(frame.to_ndarray(format="rgb24"))
                pts.append(frame.pts)
                if frame.pts is not None:
                    shown_until = (frame.pts - (self.stream.start_time or 0)) * self.time_base + 1 / self.fps
                    end_time = max(end_time or Fraction(0), shown_until)
                count += 1
                if len(frames) == chunk_size:
                    yield VideoChunk(np.stack(frames), pts)
                    frames, pts = [], []
        except av.FFmpegError as error:
            announced = f" of {self.frame_count}" if self.frame_count else ""
            raise VideoFileError(
                f"{self.path}: decoding failed after {count}{announced} frames ({error}); the file is damaged or "
                "truncated"
            ) from error
        if frames:
            yield VideoChunk(np.stack(frames), pts)
        shortfall = None if stopped_early or (max_frames is not None and count >= max_frames) else (
            self._shortfall(count, end_time))
        if shortfall is not None:
            raise shortfall

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class VideoWriter:
    """Encodes RGB frames to ``path`` (H.264 for every container but AVI, which gets MPEG-4 Part 2).

    Use as a context manager: on a clean exit the file is finalised (``close()``, if not called already) and
    renamed into place; on an exception it is deleted and ``path`` is untouched.

    Args:
        path: destination; the container follows the extension (.mp4, .mov, .mkv, .m4v, .avi).
        source: the reader whose timestamps, frame rate, rotation and audio are carried over.
        crf: H.264 constant rate factor (lower = better; 18 is visually near-lossless).
        copy_audio: remux the source's first audio track (stopping where the written video stops).
    """

    def __init__(self, path: str | os.PathLike, source: VideoReader, *, crf: int = 18, copy_audio: bool = True):
        self.path = Path(path)
        self._source = source
        self._temporary = temporary_path_for(self.path)
        self._container = av.open(str(self._temporary), "w")
        try:
            self._video = self._add_video_stream(crf)
            self._audio_in = self._audio_packets = self._audio = None
            if copy_audio and source.has_audio:
                # A second demuxer on the source: its audio is read alongside, independently of the decoding.
                self._audio_in = av.open(str(source.path))
                audio_stream = self._audio_in.streams.audio[0]
                self._audio = self._container.add_stream_from_template(audio_stream)
                self._audio_packets = self._audio_in.demux(audio_stream)
        except BaseException:
            self._discard()
            raise
        self._pending_audio = None
        self._closed = False
        self._frames_written = 0
        self._end_time = Fraction(0)

    def _add_video_stream(self, crf: int):
        source = self._source
        even = source.width % 2 == 0 and source.height % 2 == 0
        if self.path.suffix.lower() == ".avi":
            stream = self._container.add_stream("mpeg4", rate=source.fps)
            stream.codec_context.bit_rate = 8 * source.width * source.height * int(round(source.fps))
            stream.pix_fmt = "yuv420p"
            if not even:
                raise VideoFileError(f"{self.path}: AVI output needs even width and height, got {source.width}x{source.height}")
        else:
            stream = self._container.add_stream("libx264", rate=source.fps, options={"crf": str(crf), "preset": "medium"})
            # 4:2:0 needs even sizes; odd-sized sources get 4:4:4 rather than a crop or a pad.
            stream.pix_fmt = "yuv420p" if even else "yuv444p"
        stream.width, stream.height = source.width, source.height
        # The source's time base lets every frame keep its own timestamp (exact fps, variable frame rate too).
        stream.time_base = source.time_base
        stream.codec_context.time_base = source.time_base
        return stream

    def write(self, chunk: VideoChunk) -> None:
        """Encode ``chunk.frames`` (``[N, H, W, 3]`` uint8 RGB of the source's size) with ``chunk.pts``."""
        frames = chunk.frames
        if frames.ndim != 4 or frames.shape[1:] != (self._source.height, self._source.width, 3) or frames.dtype != np.uint8:
            raise VideoFileError(
                f"{self.path}: frames must be uint8 [N, {self._source.height}, {self._source.width}, 3], "
                f"got {frames.dtype} {tuple(frames.shape)}"
            )
        if self._frames_written == 0 and self._source.rotation:
            self._video.set_display_rotation(self._source.rotation)
        frame_step = 1 / (self._source.fps * self._source.time_base)  # one frame in time-base ticks
        for array, pts in zip(frames, chunk.pts):
            if pts is None:
                pts = int(round(self._frames_written * frame_step))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = pts, self._source.time_base
            self._container.mux(self._video.encode(frame))
            self._frames_written += 1
            self._end_time = max(self._end_time, (pts + frame_step) * self._source.time_base)
        self._copy_audio(until=self._end_time)

    def _copy_audio(self, until: Fraction | None) -> None:
        """Mux source audio packets that start before ``until`` seconds (``None``: all remaining)."""
        if self._audio_packets is None:
            return
        while True:
            packet = self._pending_audio or next(self._audio_packets, None)
            self._pending_audio = None
            if packet is None:
                self._audio_packets = None
                return
            if packet.dts is None:  # demuxer flush packet
                continue
            if until is not None and packet.pts is not None and packet.pts * packet.time_base >= until:
                self._pending_audio = packet
                return
            packet.stream = self._audio
            self._container.mux(packet)

    def close(self, *, complete: bool = True) -> Path:
        """Flush the encoder and rename the file into place.

        Args:
            complete: the whole source was written, so all of its audio is copied; otherwise the audio stops
                where the video stops.
        """
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            self._copy_audio(until=None if complete else self._end_time)
            self._container.close()
            if self._audio_in is not None:
                self._audio_in.close()
            if self._frames_written == 0:
                raise VideoFileError(f"{self.path}: no frames were written")
            os.replace(self._temporary, self.path)
        except BaseException:
            self._discard()
            raise
        return self.path

    def _discard(self) -> None:
        for container in (self._container, getattr(self, "_audio_in", None)):
            try:
                if container is not None:
                    container.close()
            except (av.FFmpegError, OSError, ValueError):
                pass  # already failing: the original error is the one to report
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._discard()
        elif not self._closed:
            self.close()


def run_overlapped(
    chunks: Iterator[VideoChunk],
    enhance: Callable[[VideoChunk], VideoChunk],
    write: Callable[[VideoChunk], None],
    *,
    depth: int = 2,
    stage_seconds: dict | None = None,
) -> Iterator[int]:
    """Decode, enhance and encode at the same time: ``chunks`` is consumed on a decoder thread, ``write`` runs on
    an encoder thread, ``enhance`` on the calling thread (so Ctrl-C/SIGTERM and state carried across chunks behave
    as in a plain loop). At most ``depth`` chunks wait between two stages (memory stays bounded); order is kept.

    Yields the number of frames of each chunk once it is enhanced (for progress). Errors of any stage are raised
    in the calling thread (decoding errors after the chunks decoded before them, as a plain loop would); on any
    exit both threads are stopped and joined before returning, so the caller may close the reader and writer.
    PyAV releases the GIL while FFmpeg decodes and encodes, and the SGZ kernel while it computes, so the stages
    overlap on separate cores. ``stage_seconds``: if given, accumulates busy seconds under ``"decode"``,
    ``"enhance"``, ``"encode"``.
    """
    timing = stage_seconds if stage_seconds is not None else {}
    for stage in ("decode", "enhance", "encode"):
        timing.setdefault(stage, 0.0)
    decoded: queue.Queue = queue.Queue(maxsize=depth)
    enhanced: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failures: list[BaseException] = []
    finished = object()

    def put(target: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                target.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def decoder():
        iterator = iter(chunks)
        try:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    chunk = next(iterator)
                except StopIteration:
                    put(decoded, finished)
                    return
                except BaseException as error:  # handed over in order, after the chunks before it
                    put(decoded, error)
                    return
                timing["decode"] += time.perf_counter() - start
                if not put(decoded, chunk):
                    return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def encoder():
        while not stop.is_set():
            try:
                chunk = enhanced.get(timeout=0.05)
            except queue.Empty:
                continue
            if chunk is finished:
                return
            start = time.perf_counter()
            try:
                write(chunk)
            except BaseException as error:
                failures.append(error)
                stop.set()
                return
            timing["encode"] += time.perf_counter() - start

    threads = [threading.Thread(target=decoder, name="video-decode", daemon=True),
               threading.Thread(target=encoder, name="video-encode", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        while not failures:
            try:
                item = decoded.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is finished:
                break
            if isinstance(item, BaseException):
                raise item
            start = time.perf_counter()
            result = enhance(item)
            timing["enhance"] += time.perf_counter() - start
            if not put(enhanced, result):
                break
            yield len(item.pts)
        put(enhanced, finished)
        threads[1].join()  # the writer is done before the caller closes the file
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
