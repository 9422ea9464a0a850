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

SGZ v2's noise filter has its own kernels here: ``guided_band`` runs the curve and the guided filter of
:mod:`.denoise` in one pass per band of rows (grid statistics streamed down the rows in ring buffers, uint8 in,
uint8 out, no float frame; :func:`guided_filter_cpu`), with small loops for the noise estimate, the curve's gain
and the exposure fit's candidate keys. The filter's constants stay in :mod:`.denoise` and come in as arguments.

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
#: A helper thread joins a pass only for at least this many chunks per thread (8 chunks: ~1 ms of work): below
#: that the time a second thread saves is less than what the caller loses when it waits for a helper the scheduler
#: has stopped mid-chunk (a scheduler slice, several ms, when other processes load the cores). 320x240 uint8 at 2
#: threads on the loaded machine: 0.3 ms at 1 thread, 5.2 ms at 2.
_MIN_CHUNKS_PER_THREAD = 8

#: Bands of image rows per thread in SGZ v2's filter pass (see guided_filter_cpu), and their least height.
_BANDS_PER_THREAD = 8
_MIN_BAND_ROWS = 16

_SUPPORTED_INPUTS = (torch.uint8, torch.float32, torch.float64)
_SUPPORTED_OUTPUTS = (torch.uint8, torch.float32, torch.float64)

_lock = threading.Lock()
_kernels = None  # {name: compiled kernel} once compiled; False when numba is unavailable
_pool: Optional[ThreadPoolExecutor] = None


# numba names a cached kernel's files after the source file and the function only, but the cached code refers to
# this module by its import name, which differs between an install (comfyui_lowlight...) and ComfyUI (which imports
# the pack under its folder's path): code cached under one name fails to load under the other (ModuleNotFoundError).
# So each import name gets its own cache entries, tagged with a digest of the name.
_CACHE_TAG = "_" + hashlib.sha1(__name__.encode()).hexdigest()[:12]


def _compile():
    import numba

    def jit(function, **options):
        # error_model="numpy": float division without Python's zero check, whose branch kept the filter's
        # divisions (window means, slopes) from vectorising (4x slower there).
        function.__qualname__ += _CACHE_TAG
        options.update(nogil=True, fastmath={"contract"}, error_model="numpy")
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location (read-only install): compile in memory each session
            return numba.njit(**options)(function)

    one, half, u8_max, zero = np.float32(1.0), np.float32(0.5), np.float32(255.0), np.float32(0.0)
    two = np.float32(2.0)
    block = _BLOCK

    def curve_block(source, top, bottom, weight, n, in_scale, recurrences, x, factors):
        """``x[:n]`` <- the curve of one block of values: ``source`` scaled, the factor between the two rows
        ``top``/``bottom`` of the widened factor, all recurrences; ``factors [2, >= n]``: room for ``f`` and
        ``1 - f``. Four steps per pass over the block: one load and store of ``x`` per four recurrences."""
        if recurrences == 0:
            for k in range(n):
                x[k] = np.float32(source[k]) * in_scale
            return
        f, g = factors[0], factors[1]
        for k in range(n):
            x[k] = np.float32(source[k]) * in_scale
            a = top[k]
            f[k] = a + weight * (bottom[k] - a)
            g[k] = one - f[k]
        for _ in range(recurrences >> 2):
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

    curve_block = jit(curve_block, inline="always")  # called per 512-value block: a call cost ~8 % of the plain pass

    def rows(src, wide, dst, height, row_scale, first, stop, recurrences, in_scale, to_u8, check, low, high, bad):
        """Rows ``first..stop`` of ``src [P * H, L]`` -> ``dst``; ``wide [P, h, L]`` factor resized along W.

        Indexing goes through per-block slices: indices that are provably >= 0 let LLVM drop numba's
        negative-index handling and vectorise every inner loop (5x faster than indexing the rows directly)."""
        length = src.shape[1]
        small_h = wide.shape[1]
        x = np.empty(block, np.float32)
        factors = np.empty((2, block), np.float32)
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
                if check:
                    for k in range(n):
                        v = np.float32(source[k]) * in_scale
                        outside += not (v >= low and v <= high)  # NaN compares false: counted too
                curve_block(source, top, bottom, weight, n, in_scale, recurrences, x, factors)
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

    # ---------------------------------------------------------------- SGZ v2's noise filter (see .denoise)
    def box_sum_row(source, target, window):
        """``target`` <- sums over ``window`` neighbours along the row, ends replicated, added left to right (the
        order of :func:`.denoise._box_mean`)."""
        width = source.shape[0]
        half = window // 2
        inner = max(width - 2 * half, 0)
        if inner > 0:  # the inside without index clamping: slices that vectorise
            middle = target[half : half + inner]
            leftmost = source[0:inner]
            for k in range(inner):
                middle[k] = leftmost[k]
            for d in range(1, window):
                shifted = source[d : d + inner]
                for k in range(inner):
                    middle[k] += shifted[k]
        ends = min(half, width)
        for end in range(2):  # the first and the last min(half, width) values, index clamped
            for e in range(ends):
                i = e if end == 0 else width - 1 - e
                if half <= i < half + inner or (end == 1 and i < ends):
                    continue
                total = source[min(max(i - half, 0), width - 1)]
                for d in range(1, window):
                    total += source[min(max(i - half + d, 0), width - 1)]
                target[i] = total

    box_sum_row = jit(box_sum_row)

    def grid_rows_in(src, wide_grid, row_scale, recurrences, in_scale, height, channels_last, grid_rows,
                     grid_columns, to_ycc, b, j, window, values, enhanced, f, work, sums, slot):
        """Stage 1 of ``guided_grid`` for grid row ``j``: its pixels through the curve, then luma/chroma and the
        products ``(Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr)`` summed along the row into ``sums [6, window, gw]`` at ``slot``."""
        grid_w = grid_columns.shape[0]
        length = 3 * grid_w
        small_h = wide_grid.shape[1]
        y = grid_rows[j]
        position = y * row_scale
        upper = min(int(position), small_h - 1)
        lower = min(upper + 1, small_h - 1)
        weight = np.float32(position - upper)
        if channels_last:
            line = src[b * height + y]
            for i in range(grid_w):
                column = grid_columns[i] * 3
                values[3 * i] = line[column]
                values[3 * i + 1] = line[column + 1]
                values[3 * i + 2] = line[column + 2]
            curve_block(values, wide_grid[b, upper], wide_grid[b, lower], weight, length, in_scale, recurrences,
                        enhanced, f)
            for d in range(3):
                target = work[d]
                w0, w1, w2 = to_ycc[d, 0], to_ycc[d, 1], to_ycc[d, 2]
                for i in range(grid_w):
                    target[i] = w0 * enhanced[3 * i] + w1 * enhanced[3 * i + 1] + w2 * enhanced[3 * i + 2]
        else:
            for c in range(3):
                line = src[(b * 3 + c) * height + y]
                channel = values[c * grid_w : (c + 1) * grid_w]
                for i in range(grid_w):
                    channel[i] = line[grid_columns[i]]
                curve_block(channel, wide_grid[b * 3 + c, upper], wide_grid[b * 3 + c, lower], weight, grid_w,
                            in_scale, recurrences, enhanced[c * grid_w : (c + 1) * grid_w], f)
            red, green, blue = enhanced[0:grid_w], enhanced[grid_w : 2 * grid_w], enhanced[2 * grid_w : length]
            for d in range(3):
                target = work[d]
                w0, w1, w2 = to_ycc[d, 0], to_ycc[d, 1], to_ycc[d, 2]
                for i in range(grid_w):
                    target[i] = w0 * red[i] + w1 * green[i] + w2 * blue[i]
        luma = work[0]
        for d in range(3):
            source, target = work[d], work[3 + d]
            for i in range(grid_w):
                target[i] = luma[i] * source[i]
        for d in range(6):
            box_sum_row(work[d], sums[d, slot], window)

    grid_rows_in = jit(grid_rows_in)

    def box_mean_column(ring, row, count, window, target):
        """``target`` <- mean of rows ``row - half .. row + half`` (clamped to ``0..count-1``, held in ``ring``
        at ``index % window``), added top to bottom, divided by ``window^2`` (as :func:`.denoise._box_mean`)."""
        half = window // 2
        n = target.shape[0]
        source = ring[min(max(row - half, 0), count - 1) % window]
        for k in range(n):
            target[k] = source[k]
        for d in range(1, window):
            source = ring[min(max(row - half + d, 0), count - 1) % window]
            for k in range(n):
                target[k] += source[k]
        area = np.float32(window * window)  # divided like torch's box mean (x 1/9 moved float results by 1e-3)
        for k in range(n):
            target[k] = target[k] / area

    box_mean_column = jit(box_mean_column)

    def widen_coefficients(coefficients, columns_left, columns_right, column_weight, wide):
        """One grid row of the coefficients (``[6, gw]``) resampled along W (align_corners=False) into
        ``wide [6, W]``. Exactly twice as wide (the default grid of even widths): fixed weights 1/4 and 3/4, loops
        that vectorise; otherwise the given source positions."""
        width = wide.shape[1]
        grid_w = coefficients.shape[1]
        if width == 2 * grid_w and grid_w > 1:
            quarter, three_quarters = np.float32(0.25), np.float32(0.75)
            for c in range(6):
                source, target = coefficients[c], wide[c]
                left, right = source[0 : grid_w - 1], source[1:grid_w]
                inside = target[1 : width - 1]
                for i in range(grid_w - 1):
                    a = left[i]
                    step = right[i] - a
                    inside[2 * i] = a + quarter * step
                    inside[2 * i + 1] = a + three_quarters * step
                target[0] = source[0]
                target[width - 1] = source[grid_w - 1]
            return
        for c in range(6):
            source, target = coefficients[c], wide[c]
            for x in range(width):
                a = source[columns_left[x]]
                target[x] = a + column_weight[x] * (source[columns_right[x]] - a)

    widen_coefficients = jit(widen_coefficients)

    def guided_row(src, wide, row_scale, recurrences, in_scale, check, low, high, luma_weights, dst, to_u8,
                   channels_last, height, b, y, top, bottom, between, enhanced, luma, f):
        """Image row ``y`` of image ``b`` through the curve (when ``recurrences > 0``) and the guided filter's
        last step: ``dst = clamp(a * Y + b, 0, 1)`` of the enhanced pixel, ``a``/``b`` between the two widened
        coefficient rows ``top``/``bottom`` (``[6, W]``: RGB slopes, then offsets). Returns the count of float
        input values outside ``low..high`` or NaN."""
        length = enhanced.shape[0]
        width = length // 3
        planes = 1 if channels_last else 3
        segment = length // planes
        small_h = wide.shape[1]
        position = y * row_scale
        upper = min(int(position), small_h - 1)
        lower = min(upper + 1, small_h - 1)
        weight = np.float32(position - upper)
        outside = 0
        for p in range(planes):
            plane = b * planes + p
            line = src[plane * height + y]
            for start in range(0, segment, block):
                n = min(block, segment - start)
                x = enhanced[p * segment + start : p * segment + start + n]
                curve_block(line[start : start + n], wide[plane, upper, start : start + n],
                            wide[plane, lower, start : start + n], weight, n, in_scale, recurrences, x, f)
                if check:
                    source = line[start : start + n]
                    for k in range(n):
                        v = np.float32(source[k])
                        outside += not (v >= low and v <= high)  # NaN compares false: counted too
        wr, wg, wb = luma_weights[0], luma_weights[1], luma_weights[2]
        scale, rounding = (u8_max, half) if to_u8 else (one, zero)  # uint8: truncated = rounded
        for start in range(0, width, block):
            n = min(block, width - start)
            if channels_last:  # luma and the three channels of a pixel in one iteration (interleaved access)
                # slopes (r, g, b) and offsets (p, q, u) of the two widened grid rows (0: above, 1: below)
                r0, r1 = top[0, start : start + n], bottom[0, start : start + n]
                g0, g1 = top[1, start : start + n], bottom[1, start : start + n]
                b0, b1 = top[2, start : start + n], bottom[2, start : start + n]
                p0, p1 = top[3, start : start + n], bottom[3, start : start + n]
                q0, q1 = top[4, start : start + n], bottom[4, start : start + n]
                u0, u1 = top[5, start : start + n], bottom[5, start : start + n]
                pixels = enhanced[3 * start : 3 * (start + n)]
                target = dst[b * height + y, 3 * start : 3 * (start + n)]
                for k in range(n):
                    v = wr * pixels[3 * k] + wg * pixels[3 * k + 1] + wb * pixels[3 * k + 2]
                    red = (r0[k] + between * (r1[k] - r0[k])) * v + (p0[k] + between * (p1[k] - p0[k]))
                    green = (g0[k] + between * (g1[k] - g0[k])) * v + (q0[k] + between * (q1[k] - q0[k]))
                    blue = (b0[k] + between * (b1[k] - b0[k])) * v + (u0[k] + between * (u1[k] - u0[k]))
                    target[3 * k] = min(max(red, zero), one) * scale + rounding
                    target[3 * k + 1] = min(max(green, zero), one) * scale + rounding
                    target[3 * k + 2] = min(max(blue, zero), one) * scale + rounding
            else:
                red = enhanced[start : start + n]
                green = enhanced[width + start : width + start + n]
                blue = enhanced[2 * width + start : 2 * width + start + n]
                guide = luma[0:n]
                for k in range(n):
                    guide[k] = wr * red[k] + wg * green[k] + wb * blue[k]
                for c in range(3):
                    s0, s1 = top[c, start : start + n], bottom[c, start : start + n]
                    o0, o1 = top[3 + c, start : start + n], bottom[3 + c, start : start + n]
                    target = dst[(b * 3 + c) * height + y, start : start + n]
                    for k in range(n):
                        slope = s0[k] + between * (s1[k] - s0[k])
                        offset = o0[k] + between * (o1[k] - o0[k])
                        target[k] = min(max(slope * guide[k] + offset, zero), one) * scale + rounding
        return outside

    guided_row = jit(guided_row)

    def guided_band(src, wide, wide_grid, row_scale, recurrences, in_scale, check, low, high, bad, height,
                    channels_last, grid_rows, grid_columns, gain_wide, gain_top, gain_bottom, gain_row_weight,
                    noise_variance, regulariser_scale, floor, window, to_ycc, to_rgb, rows_top, rows_bottom,
                    row_weight, columns_left, columns_right, column_weight, dst, to_u8, b, first, stop):
        """Rows ``first..stop`` of image ``b`` through SGZ v2's noise filter (and the curve before it when
        ``recurrences > 0``): the math of :func:`.denoise.gain_guided_denoise` (``enhance`` first).

        The guided filter's coefficients are computed on the subsampled grid (pixels ``grid_rows`` x
        ``grid_columns`` of ``src``, put through the curve here with the factor ``wide_grid``: ``widen``'s at the
        grid's columns) in stages that stream down the grid rows, each ``window // 2`` rows behind the previous
        one, with ``window`` rows of window sums in ring buffers: (1) luma/chroma and their products summed along
        the row; (2) their means down the column, the coefficients in YCbCr (regulariser from the curve's gain,
        ``gain_wide [B, h, gw]`` resized along W, rows interpolated here), summed along the row; (3) their means
        down the column, to RGB, resampled along W to full width. As soon as grid row ``t`` is done, the image
        rows between grid rows ``t - 1`` and ``t`` are written (curve, luma, ``a * Y + b``, clamp, store): no
        frame-size buffer at all. Only the grid rows this band needs are computed (plus the stages' halos).

        ``src``/``dst``: the image as rows of one plane, ``[B * H, W * 3]`` channels-last or ``[B * 3 * H, W]``
        (possibly the same array: a row is read whole before it is written). Float input values outside
        ``low..high`` or NaN are counted into ``bad`` per row."""
        grid_h, grid_w = grid_rows.shape[0], grid_columns.shape[0]
        half = window // 2
        first3, stop3 = rows_top[first], rows_bottom[stop - 1] + 1  # the grid rows the image rows need
        first1, stop1 = max(0, first3 - half), min(grid_h, stop3 + half)
        first0, stop0 = max(0, first1 - half), min(grid_h, stop1 + half)
        sums0 = np.empty((6, window, grid_w), np.float32)  # rings: Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr summed along rows
        sums1 = np.empty((6, window, grid_w), np.float32)  # rings: slopes, offsets (YCbCr) summed along rows
        work = np.empty((6, grid_w), np.float32)
        column = np.empty((6, grid_w), np.float32)
        coefficients = np.empty((6, grid_w), np.float32)
        length = 3 * grid_w
        values = np.empty(length, np.float32)  # the grid row in the image's layout (x * 3 + c, or c * gw + x)
        enhanced_grid = np.empty(length, np.float32)
        f_grid = np.empty((2, length), np.float32)
        noise = np.empty(grid_w, np.float32)
        offsets = np.empty(grid_w, np.float32)
        variance = np.empty(grid_w, np.float32)
        width = columns_left.shape[0]
        coefficients_wide = np.empty((2, 6, width), np.float32)  # ring of 2: grid rows resampled to full width
        enhanced = np.empty(3 * width, np.float32)
        luma = np.empty(width, np.float32)
        f = np.empty((2, block), np.float32)
        gain_plane = gain_wide[b]
        variance_scale = noise_variance[b]
        y = first
        for j in range(first0, stop3 + 2 * half):
            if j < stop0:
                grid_rows_in(src, wide_grid, row_scale, recurrences, in_scale, height, channels_last, grid_rows,
                             grid_columns, to_ycc, b, j, window, values, enhanced_grid, f_grid, work, sums0,
                             j % window)
            s = j - half  # stage 2 for this grid row: its stage-1 rows up to s + half = j are done
            if first1 <= s < stop1:
                for d in range(6):
                    box_mean_column(sums0[d], s, grid_h, window, column[d])
                upper_gain, lower_gain = gain_plane[gain_top[s]], gain_plane[gain_bottom[s]]
                weight = gain_row_weight[s]
                for i in range(grid_w):
                    g = upper_gain[i] + weight * (lower_gain[i] - upper_gain[i])
                    noise[i] = max(g * g - one, zero) * variance_scale
                mean_luma, mean_square = column[0], column[3]
                for i in range(grid_w):
                    variance[i] = mean_square[i] - mean_luma[i] * mean_luma[i]
                slot = s % window
                for d in range(3):
                    mean_target, correlation = column[d], column[3 + d]
                    scale = regulariser_scale[d]
                    for i in range(grid_w):
                        covariance = correlation[i] - mean_luma[i] * mean_target[i]  # channel 0: the variance
                        slope = covariance / ((noise[i] * scale + floor) + variance[i])
                        correlation[i] = slope  # column[3 + d]: the slope from here on
                        offsets[i] = mean_target[i] - slope * mean_luma[i]
                    box_sum_row(offsets, sums1[3 + d, slot], window)
                for d in range(3):
                    box_sum_row(column[3 + d], sums1[d, slot], window)
            t = s - half  # stage 3 for this grid row, then the image rows up to it
            if first3 <= t < stop3:
                for d in range(6):
                    box_mean_column(sums1[d], t, grid_h, window, column[d])
                for part in range(2):  # slopes, then offsets: YCbCr -> RGB
                    y_, cb, cr = column[3 * part], column[3 * part + 1], column[3 * part + 2]
                    for c in range(3):
                        w0, w1, w2 = to_rgb[c, 0], to_rgb[c, 1], to_rgb[c, 2]
                        target = coefficients[3 * part + c]
                        for i in range(grid_w):
                            target[i] = w0 * y_[i] + w1 * cb[i] + w2 * cr[i]
                widen_coefficients(coefficients, columns_left, columns_right, column_weight,
                                   coefficients_wide[t % 2])
                while y < stop and rows_bottom[y] == t:
                    bad[b * height + y] = guided_row(
                        src, wide, row_scale, recurrences, in_scale, check, low, high, to_ycc[0], dst, to_u8,
                        channels_last, height, b, y, coefficients_wide[rows_top[y] % 2], coefficients_wide[t % 2],
                        row_weight[y], enhanced, luma, f)
                    y += 1

    def noise_responses(src, height, channels_last, starts, in_scale, luma_weights, b, out):
        """Absolute responses of Immerkaer's 3x3 Laplacian on the luma of 3-row strips of image ``b`` starting
        at ``starts``: ``out [len(starts) * (W - 2)]`` (the math of :func:`.denoise.estimate_noise_sigma`)."""
        width = out.shape[0] // starts.shape[0] + 2
        luma = np.empty((3, width), np.float32)
        wr, wg, wb = luma_weights[0], luma_weights[1], luma_weights[2]
        planes = 1 if channels_last else 3
        inner = width - 2
        for s in range(starts.shape[0]):
            for q in range(3):
                y = starts[s] + q
                target = luma[q]
                if channels_last:
                    line = src[b * height + y]
                    for i in range(width):
                        target[i] = (wr * (np.float32(line[3 * i]) * in_scale)
                                     + wg * (np.float32(line[3 * i + 1]) * in_scale)
                                     + wb * (np.float32(line[3 * i + 2]) * in_scale))
                else:
                    red = src[(b * planes) * height + y]
                    green = src[(b * planes + 1) * height + y]
                    blue = src[(b * planes + 2) * height + y]
                    for i in range(width):
                        target[i] = (wr * (np.float32(red[i]) * in_scale) + wg * (np.float32(green[i]) * in_scale)
                                     + wb * (np.float32(blue[i]) * in_scale))
            a, m, z = luma[0], luma[1], luma[2]
            response = out[s * inner : (s + 1) * inner]
            for i in range(inner):
                v = ((a[i] - two * a[i + 1] + a[i + 2]) - two * (m[i] - two * m[i + 1] + m[i + 2])
                     + (z[i] - two * z[i + 1] + z[i + 2]))
                response[i] = abs(v)

    def truncated_mean(responses, kept):
        """(sum, count) of the responses at most the ``kept``-th smallest (ties included). The threshold is found
        exactly by a radix selection on the float bits (non-negative floats order as their bit patterns): two
        passes of 16-bit histograms, ~4x faster than ``np.partition`` on the 92K responses of a 1080p frame."""
        bits = responses.view(np.uint32)
        counts = np.zeros(1 << 16, np.int64)
        for value in bits:
            counts[value >> 16] += 1
        rank = kept
        high = 0
        while counts[high] < rank:
            rank -= counts[high]
            high += 1
        counts[:] = 0
        for value in bits:
            if value >> 16 == high:
                counts[value & 0xFFFF] += 1
        low = 0
        while counts[low] < rank:
            rank -= counts[low]
            low += 1
        threshold = np.uint32((high << 16) | low)
        total = 0.0
        count = 0
        for i in range(bits.shape[0]):
            if bits[i] <= threshold:
                total += responses[i]
                count += 1
        return total, count

    def curve_keys(image, factor, scales, recurrences, luma_weights, epsilon, out):
        """``out [B, K]``: per image and scaling ``scales[k]``, the mean over the pixels of
        ``log(luma(curve(image, clamp(scales[k] * factor, -1, 1))) + epsilon)`` (the math of
        :func:`.exposure.exposure_scale`'s candidates); ``image``, ``factor``: ``[B, 3, N]`` float32."""
        batch, channels, size = image.shape
        x = np.empty(size, np.float32)
        f = np.empty(size, np.float32)
        luma = np.empty(size, np.float32)
        for b in range(batch):
            for k in range(scales.shape[0]):
                scale = scales[k]
                for n in range(size):
                    luma[n] = zero
                for c in range(channels):
                    source, plane = image[b, c], factor[b, c]
                    for n in range(size):
                        x[n] = source[n]
                        f[n] = min(max(plane[n] * scale, -one), one)
                    for _ in range(recurrences):
                        for n in range(size):
                            v = x[n]
                            x[n] = v + f[n] * (v * v - v)
                    weight = luma_weights[c]
                    for n in range(size):
                        luma[n] += weight * x[n]
                total = 0.0
                for n in range(size):
                    total += np.log(luma[n] + epsilon)
                out[b, k] = total / size

    def curve_gain_planes(image, factor, recurrences, out):
        """:func:`.denoise.curve_gain` on ``[B, 3, h * w]`` float32 planes into ``out [B, h * w]``."""
        batch, channels, size = image.shape
        x = np.empty(size, np.float32)
        gain = np.empty(size, np.float32)
        for b in range(batch):
            total = out[b]
            for k in range(size):
                total[k] = zero
            for c in range(channels):
                source, f = image[b, c], factor[b, c]
                for k in range(size):
                    x[k] = source[k]
                    gain[k] = one
                for _ in range(recurrences):
                    for k in range(size):
                        v = x[k]
                        gain[k] = gain[k] * (one + f[k] * (two * v - one))
                        x[k] = v + f[k] * (v * v - v)
                for k in range(size):
                    total[k] += gain[k]
            for k in range(size):
                total[k] = max(total[k] / np.float32(channels), zero)

    return {"rows": jit(rows), "widen": jit(widen), "guided_band": jit(guided_band),
            "noise_responses": jit(noise_responses),
            "truncated_mean": jit(truncated_mean), "curve_gain": jit(curve_gain_planes),
            "curve_keys": jit(curve_keys)}


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
    out: Optional[torch.Tensor] = None,
):
    """The fused pass (see the module docstring). ``image [B, 3, H, W]`` CPU, uint8 0..255 or float 0..1;
    ``factor_lowres [B, 3, h, w]``. Returns ``(out, outside)``: ``out`` in ``out_dtype`` with the image's memory
    layout (written into ``out`` if given: same shape, layout and dtype, e.g. a buffer reused across frames, which
    saves the page faults of a fresh frame), and ``outside`` the number of float input values outside ``0..1``
    (+ :data:`RANGE_SLACK`) or not finite (0 for uint8 input)."""
    rows_kernel, widen_kernel = _kernels["rows"], _kernels["widen"]
    batch, _, height, width = image.shape
    small_h, small_w = factor_lowres.shape[-2:]
    channels_last = image.stride(1) == 1 and not image.is_contiguous()
    if channels_last and not image.is_contiguous(memory_format=torch.channels_last):
        image = image.contiguous(memory_format=torch.channels_last)
    elif not channels_last and not image.is_contiguous():
        image = image.contiguous()
    if out is None:
        out = torch.empty((batch, height, width, 3), dtype=out_dtype).permute(0, 3, 1, 2) if channels_last else (
            torch.empty((batch, 3, height, width), dtype=out_dtype))
    elif out.shape != image.shape or out.dtype != out_dtype:
        raise ValueError(f"out: expected {tuple(image.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    src, dst, channels_last = _image_rows(image, out)
    wide = np.empty((batch, small_h, width * 3) if channels_last else (batch * 3, small_h, width), np.float32)
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

    threads = torch.get_num_threads() if threads is None else threads
    run_chunks(chunks, work, min(threads, max(1, chunks // _MIN_CHUNKS_PER_THREAD)))
    return out, int(bad.sum())


def _half_pixel_source(out_size: int, in_size: int):
    """Source positions of an align_corners=False bilinear resize along one axis (as torch's, float32):
    (left index, right index, weight)."""
    scale = np.float32(in_size / out_size)
    position = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    left = np.minimum(position.astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    return left, right, (position - left).astype(np.float32)


def _image_rows(image: torch.Tensor, out: torch.Tensor):
    """``image`` and ``out`` (same shape and memory layout) as 2-D arrays of rows of one plane: ``[B * H, W * 3]``
    for channels-last, ``[B * 3 * H, W]`` otherwise. Returns ``(src, dst, channels_last)``."""
    channels_last = image.stride(1) == 1 and not image.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if not image.is_contiguous(memory_format=layout) or not out.is_contiguous(memory_format=layout):
        raise ValueError("image and out must be contiguous in the same memory layout")
    batch, _, height, width = image.shape
    if channels_last:
        src = image.permute(0, 2, 3, 1).numpy().reshape(batch * height, width * 3)
        dst = out.permute(0, 2, 3, 1).numpy().reshape(batch * height, width * 3)
    else:
        src = image.numpy().reshape(batch * 3 * height, width)
        dst = out.numpy().reshape(batch * 3 * height, width)
    return src, dst, channels_last


def _widened_factor(factor_lowres: Optional[torch.Tensor], batch: int, width: int, channels_last: bool,
                    columns: Optional[np.ndarray] = None):
    """The factor clamped and resized along W (to ``width``) into the image's row layout (``widen``); only at
    ``columns`` if given; without a factor, a zero map (the curve is then skipped)."""
    count = width if columns is None else len(columns)
    planes, length = (batch, count * 3) if channels_last else (batch * 3, count)
    if factor_lowres is None:
        return np.zeros((planes, 1, length), np.float32)
    factor = np.ascontiguousarray(factor_lowres.detach().to(device="cpu", dtype=torch.float32).numpy())
    wide = np.empty((planes, factor.shape[2], length), np.float32)
    source = _align_corners_source(width, factor.shape[3])
    if columns is not None:
        source = tuple(part[columns] for part in source)
    _kernels["widen"](factor, *source, wide, channels_last)
    return wide


def guided_filter_cpu(
    image: torch.Tensor,
    out: torch.Tensor,
    factor_lowres: Optional[torch.Tensor],
    recurrences: int,
    gain_lowres: torch.Tensor,
    noise_variance: np.ndarray,
    regulariser_scale: np.ndarray,
    regulariser_floor: float,
    window: int,
    to_ycc: np.ndarray,
    to_rgb: np.ndarray,
    grid_rows: np.ndarray,
    grid_columns: np.ndarray,
    threads: Optional[int] = None,
) -> int:
    """SGZ v2's noise filter (:func:`.denoise.gain_guided_denoise`, same math) as one compiled pass over bands of
    image rows (``guided_band``), written into ``out``; with ``factor_lowres`` and ``recurrences > 0`` the curve
    too (``enhance`` then the filter, without the enhanced frame ever being stored: the curve is computed where
    the filter reads a pixel: the grid's pixels, then each pixel once).

    ``image`` ``[B, 3, H, W]`` CPU uint8 0..255 or float 0..1 (curve input, or the curve's output without a
    factor); ``out`` the same shape and memory layout, any supported dtype, not sharing memory with ``image``
    (bands read grid rows of their neighbours);
    ``gain_lowres [B, 1, h, w]``; ``noise_variance [B]``: the input noise's variance; ``regulariser_scale [3]``
    (luma, Cb, Cr multiples of it), ``regulariser_floor``, ``window`` (odd, on the grid), ``to_ycc``/``to_rgb``
    3x3. Returns the number of float input values outside ``0..1`` (+ :data:`RANGE_SLACK`) or not finite.
    """
    batch, _, height, width = image.shape
    if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        raise ValueError("guided_filter_cpu: out must not share memory with image")
    src, dst, channels_last = _image_rows(image, out)
    if factor_lowres is None or recurrences == 0:
        factor_lowres, recurrences = None, 0
    grid_h, grid_w = len(grid_rows), len(grid_columns)
    wide = _widened_factor(factor_lowres, batch, width, channels_last)
    wide_grid = _widened_factor(factor_lowres, batch, width, channels_last, grid_columns)
    row_scale = (wide.shape[1] - 1) / (height - 1) if height > 1 and wide.shape[1] > 1 else 0.0
    from_u8 = image.dtype == torch.uint8
    in_scale = np.float32(1.0 / 255.0 if from_u8 else 1.0)
    threads = torch.get_num_threads() if threads is None else threads

    gain = np.ascontiguousarray(gain_lowres.detach().to(device="cpu", dtype=torch.float32).numpy())[:, 0]
    left, right, weight = _half_pixel_source(grid_w, gain.shape[2])
    gain_wide = gain[:, :, left] + weight * (gain[:, :, right] - gain[:, :, left])  # [B, h, gw]
    gain_rows = _half_pixel_source(grid_h, gain.shape[1])
    rows = _half_pixel_source(height, grid_h)
    columns = _half_pixel_source(width, grid_w)
    bad = np.zeros(batch * height, np.int64)
    # Bands of image rows: each recomputes the grid rows of the stages' halos (2 * (window // 2) + 1 grid rows), so
    # one band per image at one thread; with more threads several per thread, so that a thread the scheduler
    # stops (other processes on the cores) holds up only a small part of the frame.
    wanted = 1 if threads == 1 else max(1, _BANDS_PER_THREAD * threads // batch)
    rows_per_band = max(_MIN_BAND_ROWS, math.ceil(height / wanted))
    bands = math.ceil(height / rows_per_band)
    arguments = (src, wide, wide_grid, row_scale, recurrences, in_scale, not from_u8, np.float32(-RANGE_SLACK),
                 np.float32(1.0 + RANGE_SLACK), bad, height, channels_last, grid_rows.astype(np.int64),
                 grid_columns.astype(np.int64), gain_wide, *gain_rows, np.asarray(noise_variance, np.float32),
                 np.asarray(regulariser_scale, np.float32), np.float32(regulariser_floor), window,
                 np.asarray(to_ycc, np.float32), np.asarray(to_rgb, np.float32), *rows, *columns, dst,
                 out.dtype == torch.uint8)

    def band(i):
        b, index = divmod(i, bands)
        first = index * rows_per_band
        _kernels["guided_band"](*arguments, b, first, min(height, first + rows_per_band))

    run_chunks(batch * bands, band, threads)
    return int(bad.sum())


def noise_responses_cpu(image: torch.Tensor, starts: np.ndarray, luma_weights, quantile: float) -> np.ndarray:
    """Per image of ``image [B, 3, H, W]`` (CPU uint8 or float, NCHW or channels-last): the (sum, count) of the
    smallest ``quantile`` share of the absolute Laplacian responses on the luma of the 3-row strips at ``starts``
    (ties at the threshold included): ``[B, 2]`` float64 (see :func:`.denoise.estimate_noise_sigma`)."""
    batch, _, height, width = image.shape
    src, _, channels_last = _image_rows(image, image)
    in_scale = np.float32(1.0 / 255.0 if image.dtype == torch.uint8 else 1.0)
    starts = np.asarray(starts, np.int64)
    responses = np.empty(len(starts) * (width - 2), np.float32)
    kept = max(1, int(len(responses) * quantile))
    result = np.empty((batch, 2), np.float64)
    weights = np.asarray(luma_weights, np.float32)
    for b in range(batch):
        _kernels["noise_responses"](src, height, channels_last, starts, in_scale, weights, b, responses)
        result[b] = _kernels["truncated_mean"](responses, kept)
    return result


def curve_gain_cpu(image_lowres: torch.Tensor, factor: torch.Tensor, recurrences: int) -> torch.Tensor:
    """:func:`.denoise.curve_gain` compiled: ``[B, 3, h, w]`` float images and factors -> ``[B, 1, h, w]``."""
    batch, channels, height, width = image_lowres.shape
    image = np.ascontiguousarray(image_lowres.to(torch.float32).numpy()).reshape(batch, channels, -1)
    planes = np.ascontiguousarray(factor.to(torch.float32).numpy()).reshape(batch, channels, -1)
    out = torch.empty(batch, 1, height, width)
    _kernels["curve_gain"](image, planes, recurrences, out.numpy().reshape(batch, -1))
    return out


def curve_keys_cpu(image: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor, recurrences: int, luma_weights,
                   epsilon: float) -> torch.Tensor:
    """:func:`.exposure.exposure_scale`'s candidate keys compiled: ``image``, ``factor`` ``[B, 3, N]`` float32,
    ``scales [K]`` -> ``[B, K]`` float32 (see ``curve_keys``)."""
    out = np.empty((image.shape[0], scales.shape[0]), np.float32)
    _kernels["curve_keys"](np.ascontiguousarray(image.detach().numpy()), np.ascontiguousarray(factor.detach().numpy()),
                           np.ascontiguousarray(scales.to(torch.float32).numpy()), recurrences,
                           np.asarray(luma_weights, np.float32), np.float32(epsilon), out)
    return torch.from_numpy(out)
