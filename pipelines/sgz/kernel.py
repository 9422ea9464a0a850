"""SGZ's full-resolution pass on the CPU as one compiled kernel (numba): load, factor, recurrences, store.

Per pixel value it reads the image once (uint8 or float), interpolates the factor between two rows of a
low-resolution map that is already resized along W (align_corners=True bilinear, as
:func:`.model.upsample_factor`), runs all recurrences ``x <- x * ((1 - f) + f * x)`` on a small block held in L1,
and writes the output once (uint8 rounded half up, or float). Float inputs are range-checked in the same pass:
the kernel counts values outside ``0..1`` (plus a small slack) or NaN/inf per row, so validation costs no extra
pass over the frame.

Work is split into chunks of rows that worker threads take one at a time (dynamic scheduling, plain Python
threads around a ``nogil`` kernel): when another process holds a core, the thread that runs there simply takes
fewer chunks, and nothing spins at a barrier. The thread count is torch's (``torch.get_num_threads()``), so the
host's settings (ComfyUI, ``OMP_NUM_THREADS``) apply.

numba is imported and the kernels compiled on first use (cached on disk where numba can write its cache). Without
numba, :func:`available` is False and :mod:`.model` uses its torch implementation (noted once).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from ..media.image_convert import RANGE_SLACK

#: Values per block of the recurrence loop: three float32 blocks (x, f, 1 - f) stay in L1 and vectorise.
_BLOCK = 512
#: Values per chunk of rows handed to a thread: large enough that Python's per-chunk cost (~20 us) is noise,
#: small enough for dozens of chunks per frame (load balancing when a core is busy with something else).
_CHUNK_VALUES = 1 << 17

_SUPPORTED_INPUTS = (torch.uint8, torch.float32, torch.float64)
_SUPPORTED_OUTPUTS = (torch.uint8, torch.float32, torch.float64)

_lock = threading.Lock()
_kernels = None  # (rows, widen, guided_rows) once compiled; False when numba is unavailable
_pool: Optional[ThreadPoolExecutor] = None


# numba names a cached kernel's files after the source file and the function only, but the cached code refers to
# this module by its import name, which differs between an install (comfyui_lowlight...) and ComfyUI (which imports
# the pack under its folder's path): code cached under one name fails to load under the other (ModuleNotFoundError).
# So each import name gets its own cache entries, tagged with a digest of the name.
_CACHE_TAG = "_" + hashlib.sha1(__name__.encode()).hexdigest()[:12]


def _compile():
    import numba

    def jit(function):
        function.__qualname__ += _CACHE_TAG
        try:
            return numba.njit(nogil=True, cache=True, fastmath={"contract"})(function)
        except RuntimeError:  # no writable cache location (read-only install): compile in memory each session
            return numba.njit(nogil=True, fastmath={"contract"})(function)

    one, half, u8_max, zero = np.float32(1.0), np.float32(0.5), np.float32(255.0), np.float32(0.0)
    block = _BLOCK

    def rows(src, wide, dst, height, row_scale, first, stop, recurrences, in_scale, to_u8, check, low, high, bad):
        """Rows ``first..stop`` of ``src [P * H, L]`` -> ``dst``; ``wide [P, h, L]`` factor resized along W.

        Indexing goes through per-block slices: indices that are provably >= 0 let LLVM drop numba's
        negative-index handling and vectorise every inner loop (5x faster than indexing the rows directly)."""
        length = src.shape[1]
        small_h = wide.shape[1]
        x = np.empty(block, np.float32)
        f = np.empty(block, np.float32)
        g = np.empty(block, np.float32)
        for r in range(first, stop):
            plane = r // height
            position = (r - plane * height) * row_scale
            upper = min(int(position), small_h - 1)
            lower = min(upper + 1, small_h - 1)
            weight = np.float32(position - upper)
            outside = 0
            for start in range(0, length, block):
                n = min(block, length - start)
                source = src[r, start : start + n]
                top = wide[plane, upper, start : start + n]
                bottom = wide[plane, lower, start : start + n]
                target = dst[r, start : start + n]
                for k in range(n):
                    x[k] = np.float32(source[k]) * in_scale
                    a = top[k]
                    f[k] = a + weight * (bottom[k] - a)
                    g[k] = one - f[k]
                if check:
                    for k in range(n):
                        outside += not (x[k] >= low and x[k] <= high)  # NaN compares false: counted too
                for _ in range(recurrences >> 2):  # four steps per load/store of the block
                    for k in range(n):
                        v = x[k]
                        fk = f[k]
                        gk = g[k]
                        v = v * (gk + fk * v)
                        v = v * (gk + fk * v)
                        v = v * (gk + fk * v)
                        x[k] = v * (gk + fk * v)
                for _ in range(recurrences & 3):
                    for k in range(n):
                        x[k] = x[k] * (g[k] + f[k] * x[k])
                if to_u8:
                    for k in range(n):
                        target[k] = min(max(x[k] * u8_max + half, zero), u8_max)  # truncated = rounded
                else:
                    for k in range(n):
                        target[k] = x[k]
            bad[r] = outside

    def widen(factor, columns_left, columns_right, column_weight, wide, channels_last):
        """``factor [B, 3, h, w]`` -> clamped to -1..1, resized along W into ``wide`` (``[B, h, W * 3]`` for
        channels-last images, ``[B * 3, h, W]`` otherwise)."""
        batch, channels, small_h, _ = factor.shape
        width = columns_left.shape[0]
        for b in range(batch):
            for c in range(channels):
                for j in range(small_h):
                    row = factor[b, c, j]
                    for i in range(width):
                        a = min(max(row[columns_left[i]], -one), one)
                        z = min(max(row[columns_right[i]], -one), one)
                        value = a + column_weight[i] * (z - a)
                        if channels_last:
                            wide[b, j, i * 3 + c] = value
                        else:
                            wide[b * 3 + c, j, i] = value

    def guided_rows(src, dst, coefficients, rows_top, rows_bottom, row_weight, columns_left, columns_right,
                    column_weight, luma_weights, first, stop, in_scale, to_u8, channels_last):
        """Rows ``first..stop`` (of ``B * H``) of the guided filter's last step: ``dst = a * Y(src) + b``.

        ``src``/``dst`` ``[B, 3, H, W]`` or (channels-last) ``[B, H, W, 3]`` arrays, possibly the same one;
        ``coefficients [B, 6, h, w]`` RGB slopes then offsets, resampled bilinearly (align_corners=False source
        positions given per axis) into two line buffers per row."""
        batch, _, small_h, small_w = coefficients.shape
        height = rows_top.shape[0]
        width = columns_left.shape[0]
        between = np.empty((6, small_w), np.float32)
        line = np.empty((6, width), np.float32)
        wr, wg, wb = luma_weights[0], luma_weights[1], luma_weights[2]
        for r in range(first, stop):
            b = r // height
            y = r - b * height
            top = rows_top[y]
            bottom = rows_bottom[y]
            weight = row_weight[y]
            for c in range(6):
                upper = coefficients[b, c, top]
                lower = coefficients[b, c, bottom]
                for i in range(small_w):
                    between[c, i] = upper[i] + weight * (lower[i] - upper[i])
            for c in range(6):
                source = between[c]
                target = line[c]
                for x in range(width):
                    a = source[columns_left[x]]
                    target[x] = a + column_weight[x] * (source[columns_right[x]] - a)
            if channels_last:
                pixels = src[b, y]
                out = dst[b, y]
                for x in range(width):
                    red = np.float32(pixels[x, 0]) * in_scale
                    green = np.float32(pixels[x, 1]) * in_scale
                    blue = np.float32(pixels[x, 2]) * in_scale
                    luma = wr * red + wg * green + wb * blue
                    for c in range(3):
                        v = min(max(line[c, x] * luma + line[3 + c, x], zero), one)
                        if to_u8:
                            out[x, c] = v * u8_max + half  # truncated = rounded
                        else:
                            out[x, c] = v
            else:
                red_row, green_row, blue_row = src[b, 0, y], src[b, 1, y], src[b, 2, y]
                luma_row = np.empty(width, np.float32)
                for x in range(width):
                    luma_row[x] = (wr * np.float32(red_row[x]) + wg * np.float32(green_row[x])
                                   + wb * np.float32(blue_row[x])) * in_scale
                for c in range(3):
                    slope = line[c]
                    offset = line[3 + c]
                    out = dst[b, c, y]
                    if to_u8:
                        for x in range(width):
                            out[x] = min(max(slope[x] * luma_row[x] + offset[x], zero), one) * u8_max + half
                    else:
                        for x in range(width):
                            out[x] = min(max(slope[x] * luma_row[x] + offset[x], zero), one)

    return jit(rows), jit(widen), jit(guided_rows)


def available() -> bool:
    """Whether the compiled kernel can run (numba importable); notes once when it cannot."""
    global _kernels
    if _kernels is None:
        with _lock:
            if _kernels is None:
                try:
                    _kernels = _compile()
                except ImportError:
                    _kernels = False
                    warnings.warn(
                        "numba is not installed: SGZ's full-resolution pass uses its slower torch implementation "
                        "(pip install numba)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return bool(_kernels)


def supports(image: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """The kernel handles CPU images of uint8/float32/float64 (NCHW or channels-last) into those dtypes."""
    return (
        image.device.type == "cpu"
        and image.dtype in _SUPPORTED_INPUTS
        and out_dtype in _SUPPORTED_OUTPUTS
        and available()
    )


def _align_corners_source(out_size: int, in_size: int):
    """Source positions of an align_corners=True resize along one axis: (left index, right index, weight)."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    position = np.arange(out_size, dtype=np.float64) * scale
    left = np.minimum(position.astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    return left, right, (position - left).astype(np.float32)


class _Chunks:
    """Chunks ``0..count`` of one call, handed out one at a time; tracks the ones helpers are still running."""

    def __init__(self, count: int, work):
        self.count, self.work = count, work
        self.next = 0
        self.running = 0
        self.stopped = False  # set when the caller is done or a chunk failed: no more chunks handed out
        self.error: Optional[BaseException] = None
        self.idle = threading.Condition()

    def take(self, helper: bool) -> int:
        with self.idle:
            index = self.next
            if index < self.count and not self.stopped:
                self.next += 1
                self.running += helper
                return index
            return -1

    def run_as_helper(self) -> None:
        while True:
            index = self.take(helper=True)
            if index < 0:
                return
            try:
                self.work(index)
            except BaseException as error:  # re-raised by the calling thread
                self.error, self.stopped = error, True
            finally:
                with self.idle:
                    self.running -= 1
                    self.idle.notify_all()


def run_chunks(chunks: int, work, threads: int) -> None:
    """Call ``work(i)`` for ``i`` in ``range(chunks)`` on the calling thread and up to ``threads - 1`` helpers.

    The calling thread never waits for a helper to start: it takes chunks itself until none is left and then
    waits only for chunks a helper is running. A helper the scheduler has not run yet (the CPU is busy with other
    processes) finds no work when it wakes and returns, so under contention the call degrades to one thread
    instead of stalling at a barrier as OpenMP's join does.
    """
    global _pool
    threads = max(1, min(threads, chunks))
    if threads == 1:
        for i in range(chunks):
            work(i)
        return
    with _lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=max(threads - 1, os.cpu_count() or 1),
                                       thread_name_prefix="sgz-kernel")
        pool = _pool
    state = _Chunks(chunks, work)
    for _ in range(threads - 1):
        pool.submit(state.run_as_helper)
    try:
        while True:
            index = state.take(helper=False)
            if index < 0:
                break
            work(index)
    finally:
        with state.idle:
            state.stopped = True
            while state.running:
                state.idle.wait()
    if state.error is not None:
        raise state.error


def enhance_cpu(
    image: torch.Tensor,
    factor_lowres: torch.Tensor,
    recurrences: int,
    out_dtype: torch.dtype,
    threads: Optional[int] = None,
):
    """The fused pass (see the module docstring). ``image [B, 3, H, W]`` CPU, uint8 0..255 or float 0..1;
    ``factor_lowres [B, 3, h, w]``. Returns ``(out, outside)``: ``out`` in ``out_dtype`` with the image's memory
    layout, and ``outside`` the number of float input values outside ``0..1`` (+ :data:`RANGE_SLACK`) or not
    finite (0 for uint8 input)."""
    rows_kernel, widen_kernel, _ = _kernels
    batch, _, height, width = image.shape
    small_h, small_w = factor_lowres.shape[-2:]
    channels_last = image.stride(1) == 1 and not image.is_contiguous()
    if channels_last and not image.is_contiguous(memory_format=torch.channels_last):
        image = image.contiguous(memory_format=torch.channels_last)
    elif not channels_last and not image.is_contiguous():
        image = image.contiguous()
    if channels_last:
        out = torch.empty((batch, height, width, 3), dtype=out_dtype).permute(0, 3, 1, 2)
        src = image.permute(0, 2, 3, 1).numpy().reshape(batch * height, width * 3)
        dst = out.permute(0, 2, 3, 1).numpy().reshape(batch * height, width * 3)
        wide = np.empty((batch, small_h, width * 3), np.float32)
    else:
        out = torch.empty((batch, 3, height, width), dtype=out_dtype)
        src = image.numpy().reshape(batch * 3 * height, width)
        dst = out.numpy().reshape(batch * 3 * height, width)
        wide = np.empty((batch * 3, small_h, width), np.float32)
    factor = np.ascontiguousarray(factor_lowres.detach().to(device="cpu", dtype=torch.float32).numpy())
    widen_kernel(factor, *_align_corners_source(width, small_w), wide, channels_last)

    row_scale = (small_h - 1) / (height - 1) if height > 1 else 0.0
    from_u8 = image.dtype == torch.uint8
    in_scale = np.float32(1.0 / 255.0 if from_u8 else 1.0)
    low, high = np.float32(-RANGE_SLACK), np.float32(1.0 + RANGE_SLACK)
    total = src.shape[0]
    bad = np.zeros(total, np.int64)
    rows_per_chunk = max(1, _CHUNK_VALUES // src.shape[1])
    chunks = math.ceil(total / rows_per_chunk)
    to_u8 = out_dtype == torch.uint8

    def work(i):
        first = i * rows_per_chunk
        rows_kernel(src, wide, dst, height, row_scale, first, min(total, first + rows_per_chunk), recurrences,
                    in_scale, to_u8, not from_u8, low, high, bad)

    run_chunks(chunks, work, torch.get_num_threads() if threads is None else threads)
    return out, int(bad.sum())


def _half_pixel_source(out_size: int, in_size: int):
    """Source positions of an align_corners=False bilinear resize along one axis (as torch's, float32):
    (left index, right index, weight)."""
    scale = np.float32(in_size / out_size)
    position = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    left = np.minimum(position.astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    return left, right, (position - left).astype(np.float32)


def guided_apply_cpu(
    image: torch.Tensor,
    coefficients: torch.Tensor,
    luma_weights,
    out: torch.Tensor,
    threads: Optional[int] = None,
) -> torch.Tensor:
    """The guided filter's full-resolution step in one pass: per pixel, bilinearly resample (align_corners=False)
    the RGB ``coefficients [B, 6, h, w]`` (slopes, offsets) and write ``clamp(a * Y + b, 0, 1)`` with ``Y`` the
    ``luma_weights`` (3 floats) luma of ``image``. ``image`` ``[B, 3, H, W]`` CPU uint8 0..255 or float 0..1,
    ``out`` of the same shape and memory layout (uint8 rounded, or float), which may be ``image`` itself."""
    guided_kernel = _kernels[2]
    batch, _, height, width = image.shape
    channels_last = image.stride(1) == 1 and not image.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if not image.is_contiguous(memory_format=layout) or not out.is_contiguous(memory_format=layout):
        raise ValueError("guided_apply_cpu: image and out must be contiguous in the same memory layout")
    if channels_last:
        src, dst = image.permute(0, 2, 3, 1).numpy(), out.permute(0, 2, 3, 1).numpy()
    else:
        src, dst = image.numpy(), out.numpy()
    small = np.ascontiguousarray(coefficients.detach().to(device="cpu", dtype=torch.float32).numpy())
    rows = _half_pixel_source(height, small.shape[2])
    columns = _half_pixel_source(width, small.shape[3])
    weights = np.asarray(luma_weights, np.float32)
    in_scale = np.float32(1.0 / 255.0 if image.dtype == torch.uint8 else 1.0)
    to_u8 = out.dtype == torch.uint8
    total = batch * height
    rows_per_chunk = max(1, _CHUNK_VALUES // (3 * width))
    chunks = math.ceil(total / rows_per_chunk)

    def work(i):
        first = i * rows_per_chunk
        guided_kernel(src, dst, small, *rows, *columns, weights, first, min(total, first + rows_per_chunk),
                      in_scale, to_u8, channels_last)

    run_chunks(chunks, work, torch.get_num_threads() if threads is None else threads)
    return out
