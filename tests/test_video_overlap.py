"""video_io.run_overlapped: decode / enhance / encode on three threads, in order, errors raised in the caller,
threads always joined (so the caller can close reader and writer)."""

import threading
import time

import numpy as np
import pytest

from comfyui_lowlight.pipelines.media.video_io import VideoChunk, run_overlapped


def _chunks(count, fail_after=None, delay=0.0):
    for i in range(count):
        if fail_after is not None and i == fail_after:
            raise ValueError("damaged at chunk %d" % i)
        time.sleep(delay)
        yield VideoChunk(np.full((2, 1, 1, 3), i, np.uint8), [2 * i, 2 * i + 1])


def _plus_one(chunk):
    return VideoChunk(chunk.frames + 1, chunk.pts)


def _no_stage_threads_left():
    return not [t for t in threading.enumerate() if t.name in ("video-decode", "video-encode")]


def test_every_chunk_in_order_with_progress_and_stage_times():
    written, seconds = [], {}
    progress = list(run_overlapped(_chunks(20, delay=0.001), _plus_one, written.append, stage_seconds=seconds))
    assert progress == [2] * 20
    assert [int(c.frames[0, 0, 0, 0]) for c in written] == list(range(1, 21))
    assert [c.pts for c in written] == [[2 * i, 2 * i + 1] for i in range(20)]
    assert set(seconds) == {"decode", "enhance", "encode"} and seconds["decode"] > 0
    assert _no_stage_threads_left()


def test_decoding_error_comes_after_the_chunks_before_it():
    enhanced, written = [], []

    def enhance(chunk):
        enhanced.append(chunk)
        return chunk

    with pytest.raises(ValueError, match="damaged at chunk 3"):
        for _ in run_overlapped(_chunks(10, fail_after=3), enhance, written.append):
            pass
    assert len(enhanced) == 3 and len(written) <= 3
    assert _no_stage_threads_left()


def test_encoding_error_is_raised_in_the_caller_and_stops_decoding():
    decoded = []

    def chunks():
        for chunk in _chunks(1000):
            decoded.append(chunk)
            yield chunk

    def write(chunk):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        for _ in run_overlapped(chunks(), _plus_one, write, depth=2):
            pass
    assert len(decoded) < 20  # bounded queues: decoding stopped soon after
    assert _no_stage_threads_left()


def test_interrupt_in_the_caller_joins_both_threads():
    def enhance(chunk):
        if chunk.pts[0] == 6:
            raise KeyboardInterrupt
        return chunk

    written = []
    with pytest.raises(KeyboardInterrupt):
        for _ in run_overlapped(_chunks(50), enhance, written.append):
            pass
    assert len(written) <= 3
    assert _no_stage_threads_left()


def test_stopping_the_iteration_early_joins_both_threads():
    iterator = run_overlapped(_chunks(50), _plus_one, lambda chunk: None)
    assert next(iterator) == 2
    iterator.close()
    assert _no_stage_threads_left()
