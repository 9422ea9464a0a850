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
:mod:`.denoise` in one pass per band of rows (3x3 window statistics streamed down the rows in ring buffers of
3 rows, uint8 in, uint8 out, no float frame; :func:`guided_filter_cpu`), with small loops for the noise estimate, the curve's gain
and the exposure fit's candidate keys. The filter's constants stay in :mod:`.denoise` and come in as arguments.

numba is imported and the kernels compiled on first use (cached on disk where numba can write its cache). Without
numba, :func:`available` is False and :mod:`.model` uses its torch implementation (noted once).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
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
#: A helper thread joins a pass only for at least this many chunks per thread (16 chunks: ~1.5 ms of work): below
#: that the time a second thread saves is less than what the caller loses when it waits for a helper the scheduler
#: has stopped mid-chunk (a scheduler slice, several ms, when other processes load the cores). Measured at 2 vs 1
#: thread, machine at load 7.5, paired runs: 320x240 uint8 5.2 vs 0.3 ms; 1200x900 (25 chunks) 1.48x slower (1.14x
#: with a core-burning neighbour); 1920x1080 (50 chunks) 1.20x / 0.97x; 2560x1440 (85 chunks) 1.11x / 0.80x.
_MIN_CHUNKS_PER_THREAD = 16

#: The box window of SGZ v2's guided filter the compiled pass is written for (pixels; see .denoise._WINDOW).
GUIDED_WINDOW = 3

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
    def widen_rows(source, columns_left, columns_right, column_weight, wide):
        """``source [B, h, w]`` resized along W (given source positions) into ``wide [B, h, W]``."""
        for b in range(source.shape[0]):
            for j in range(source.shape[1]):
                row, target = source[b, j], wide[b, j]
                for i in range(target.shape[0]):
                    a = row[columns_left[i]]
                    target[i] = a + column_weight[i] * (row[columns_right[i]] - a)

    # The guided filter's 3x3 window sums, as torch's (:func:`.denoise._box_mean`: borders replicated, sums along
    # the row first, then down the column, each added in order). Each loop reads and writes few arrays: with more,
    # LLVM's run-time overlap checks give up and the loop stays scalar (measured: 8x slower).
    def sum3_with_products(luma, values, sums, product_sums):
        """``sums`` <- 3-wide sums of ``values`` along the row, ``product_sums`` <- those of ``luma * values``."""
        width = luma.shape[0]
        inner = width - 2
        if inner > 0:
            y0, y1, y2 = luma[0:inner], luma[1 : inner + 1], luma[2:width]
            v0, v1, v2 = values[0:inner], values[1 : inner + 1], values[2:width]
            middle, product_middle = sums[1 : inner + 1], product_sums[1 : inner + 1]
            for k in range(inner):
                middle[k] = (v0[k] + v1[k]) + v2[k]
                product_middle[k] = (y0[k] * v0[k] + y1[k] * v1[k]) + y2[k] * v2[k]
        for i in (0, width - 1):  # replicated borders (a 1- or 2-pixel row is all border)
            left, right = max(i - 1, 0), min(i + 1, width - 1)
            sums[i] = (values[left] + values[i]) + values[right]
            product_sums[i] = (luma[left] * values[left] + luma[i] * values[i]) + luma[right] * values[right]

    sum3_with_products = jit(sum3_with_products)

    def sum3_with_squares(luma, sums, square_sums):
        """``sum3_with_products(luma, luma, ...)`` with half the loads."""
        width = luma.shape[0]
        inner = width - 2
        if inner > 0:
            y0, y1, y2 = luma[0:inner], luma[1 : inner + 1], luma[2:width]
            middle, square_middle = sums[1 : inner + 1], square_sums[1 : inner + 1]
            for k in range(inner):
                a, b, c = y0[k], y1[k], y2[k]
                middle[k] = (a + b) + c
                square_middle[k] = (a * a + b * b) + c * c
        for i in (0, width - 1):
            left, right = max(i - 1, 0), min(i + 1, width - 1)
            sums[i] = (luma[left] + luma[i]) + luma[right]
            square_sums[i] = (luma[left] * luma[left] + luma[i] * luma[i]) + luma[right] * luma[right]

    sum3_with_squares = jit(sum3_with_squares)

    def sum3_pair(first, second, first_sums, second_sums):
        """3-wide sums along the row of two rows at once."""
        width = first.shape[0]
        inner = width - 2
        if inner > 0:
            a0, a1, a2 = first[0:inner], first[1 : inner + 1], first[2:width]
            b0, b1, b2 = second[0:inner], second[1 : inner + 1], second[2:width]
            first_middle, second_middle = first_sums[1 : inner + 1], second_sums[1 : inner + 1]
            for k in range(inner):
                first_middle[k] = (a0[k] + a1[k]) + a2[k]
                second_middle[k] = (b0[k] + b1[k]) + b2[k]
        for i in (0, width - 1):
            left, right = max(i - 1, 0), min(i + 1, width - 1)
            first_sums[i] = (first[left] + first[i]) + first[right]
            second_sums[i] = (second[left] + second[i]) + second[right]

    sum3_pair = jit(sum3_pair)

    def statistics_row(src, wide, row_scale, recurrences, in_scale, check, low, high, height, channels_last,
                       to_ycc, b, y, enhanced, f, luma, chroma, sums, slot):
        """Stage 1 of ``guided_band`` for image row ``y``: its pixels through the curve, the luma into ``luma``
        (kept for the last stage), Cb and Cr into ``chroma [2, W]``, and the 3-wide sums along the row of
        ``(Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr)`` into ``sums [6, 3, W]`` at ``slot``. Returns the count of float input
        values outside ``low..high`` or NaN."""
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
                curve_block(line[start : start + n], wide[plane, upper, start : start + n],
                            wide[plane, lower, start : start + n], weight, n, in_scale, recurrences,
                            enhanced[p * segment + start : p * segment + start + n], f)
                if check:
                    source = line[start : start + n]
                    for k in range(n):
                        v = np.float32(source[k])
                        outside += not (v >= low and v <= high)  # NaN compares false: counted too
        blue_cb, red_cr = chroma[0], chroma[1]
        y0, y1, y2 = to_ycc[0, 0], to_ycc[0, 1], to_ycc[0, 2]
        b0, b1, b2 = to_ycc[1, 0], to_ycc[1, 1], to_ycc[1, 2]
        r0, r1, r2 = to_ycc[2, 0], to_ycc[2, 1], to_ycc[2, 2]
        if channels_last:
            for i in range(width):
                red, green, blue = enhanced[3 * i], enhanced[3 * i + 1], enhanced[3 * i + 2]
                luma[i] = y0 * red + y1 * green + y2 * blue
                blue_cb[i] = b0 * red + b1 * green + b2 * blue
                red_cr[i] = r0 * red + r1 * green + r2 * blue
        else:
            reds, greens, blues = enhanced[0:width], enhanced[width : 2 * width], enhanced[2 * width : length]
            for i in range(width):
                red, green, blue = reds[i], greens[i], blues[i]
                luma[i] = y0 * red + y1 * green + y2 * blue
                blue_cb[i] = b0 * red + b1 * green + b2 * blue
                red_cr[i] = r0 * red + r1 * green + r2 * blue
        sum3_with_squares(luma, sums[0, slot], sums[3, slot])
        sum3_with_products(luma, blue_cb, sums[1, slot], sums[4, slot])
        sum3_with_products(luma, red_cr, sums[2, slot], sums[5, slot])
        return outside

    statistics_row = jit(statistics_row)

    def coefficients_row(sums, y, height, gain_upper, gain_lower, gain_weight, variance_scale, regulariser_scale,
                         floor, column, noise, coefficient_sums, slot):
        """Stage 2 of ``guided_band`` for image row ``y``: the 3x3 window means of its statistics (rows ``y - 1 ..
        y + 1`` of ``sums``, clamped), the regulariser from the curve's gain (between the rows ``gain_upper`` /
        ``gain_lower`` of the gain resized along W), the guided filter's slopes and offsets for Y, Cb, Cr (guided
        by Y), summed along the row into ``coefficient_sums [6, 3, W]`` at ``slot``; ``column [6, W]`` and
        ``noise [W]``: room. The window means are taken where they are used (fewer loads and stores: these loops
        are bound by memory access, not by the divisions)."""
        width = noise.shape[0]
        for i in range(width):
            g = gain_upper[i] + gain_weight * (gain_lower[i] - gain_upper[i])
            noise[i] = max(g * g - one, zero) * variance_scale
        above, centre, below = max(y - 1, 0) % 3, min(y, height - 1) % 3, min(y + 1, height - 1) % 3
        area = np.float32(9.0)  # divided like torch's box mean
        mean_luma, variance, slopes, offsets = column[0], column[1], column[2], column[3]
        y0, y1, y2 = sums[0, above], sums[0, centre], sums[0, below]
        q0, q1, q2 = sums[3, above], sums[3, centre], sums[3, below]
        scale = regulariser_scale[0]
        for i in range(width):
            m = ((y0[i] + y1[i]) + y2[i]) / area
            v = ((q0[i] + q1[i]) + q2[i]) / area - m * m
            mean_luma[i] = m
            variance[i] = v
            slope = v / ((noise[i] * scale + floor) + v)
            slopes[i] = slope
            offsets[i] = m - slope * m
        sum3_pair(slopes, offsets, coefficient_sums[0, slot], coefficient_sums[3, slot])
        for d in (1, 2):
            c0, c1, c2 = sums[d, above], sums[d, centre], sums[d, below]
            p0, p1, p2 = sums[3 + d, above], sums[3 + d, centre], sums[3 + d, below]
            scale = regulariser_scale[d]
            for i in range(width):
                m = mean_luma[i]
                t = ((c0[i] + c1[i]) + c2[i]) / area
                slope = (((p0[i] + p1[i]) + p2[i]) / area - m * t) / ((noise[i] * scale + floor) + variance[i])
                slopes[i] = slope
                offsets[i] = t - slope * m
            sum3_pair(slopes, offsets, coefficient_sums[d, slot], coefficient_sums[3 + d, slot])

    coefficients_row = jit(coefficients_row)

    def filtered_row(coefficient_sums, y, height, column, luma, to_rgb, dst, to_u8, channels_last, b):
        """Stage 3 of ``guided_band`` for image row ``y``: the 3x3 window means of the coefficients, the filtered
        ``(Y, Cb, Cr) = a * Y + b`` of the row's own luma, to RGB, clamped to 0..1, stored into ``dst``."""
        width = luma.shape[0]
        above, centre, below = max(y - 1, 0) % 3, min(y, height - 1) % 3, min(y + 1, height - 1) % 3
        area = np.float32(9.0)
        for d in range(3):
            a0, a1, a2 = coefficient_sums[d, above], coefficient_sums[d, centre], coefficient_sums[d, below]
            b0, b1, b2 = (coefficient_sums[3 + d, above], coefficient_sums[3 + d, centre],
                          coefficient_sums[3 + d, below])
            target = column[d]
            for i in range(width):
                target[i] = ((a0[i] + a1[i]) + a2[i]) / area * luma[i] + ((b0[i] + b1[i]) + b2[i]) / area
        filtered_y, filtered_cb, filtered_cr = column[0], column[1], column[2]
        scale, rounding = (u8_max, half) if to_u8 else (one, zero)  # uint8: truncated = rounded
        if channels_last:
            target = dst[b * height + y]
            r0, r1, r2 = to_rgb[0, 0], to_rgb[0, 1], to_rgb[0, 2]
            g0, g1, g2 = to_rgb[1, 0], to_rgb[1, 1], to_rgb[1, 2]
            b0, b1, b2 = to_rgb[2, 0], to_rgb[2, 1], to_rgb[2, 2]
            for i in range(width):
                v, p, q = filtered_y[i], filtered_cb[i], filtered_cr[i]
                target[3 * i] = min(max(r0 * v + r1 * p + r2 * q, zero), one) * scale + rounding
                target[3 * i + 1] = min(max(g0 * v + g1 * p + g2 * q, zero), one) * scale + rounding
                target[3 * i + 2] = min(max(b0 * v + b1 * p + b2 * q, zero), one) * scale + rounding
        else:
            for c in range(3):
                target = dst[(b * 3 + c) * height + y]
                w0, w1, w2 = to_rgb[c, 0], to_rgb[c, 1], to_rgb[c, 2]
                for i in range(width):
                    value = w0 * filtered_y[i] + w1 * filtered_cb[i] + w2 * filtered_cr[i]
                    target[i] = min(max(value, zero), one) * scale + rounding

    filtered_row = jit(filtered_row)

    def guided_band(src, wide, row_scale, recurrences, in_scale, check, low, high, bad, height, channels_last,
                    gain_wide, gain_top, gain_bottom, gain_row_weight, noise_variance, regulariser_scale, floor,
                    to_ycc, to_rgb, dst, to_u8, b, first, stop):
        """Rows ``first..stop`` of image ``b`` through SGZ v2's noise filter (and the curve before it when
        ``recurrences > 0``): the math of :func:`.denoise.gain_guided_denoise` (``enhance`` first), 3x3 windows.

        Three stages stream down the image rows, each a row behind the previous one, with 3 rows of row sums in
        ring buffers: (1) the row through the curve, luma/chroma and their products summed along the row; (2)
        their window means down the column, the coefficients in YCbCr (regulariser from the curve's gain,
        ``gain_wide [B, h, W]`` resized along W, rows interpolated here), summed along the row; (3) their window
        means down the column, ``a * Y + b`` with the row's luma, to RGB, clamp, store. Each pixel goes through
        the curve once (plus the bands' halo rows), no frame-size buffer.

        ``src``/``dst``: the image as rows of one plane, ``[B * H, W * 3]`` channels-last or ``[B * 3 * H, W]``.
        Float input values outside ``low..high`` or NaN are counted into ``bad`` per row."""
        first2, stop2 = max(0, first - 1), min(height, stop + 1)  # the rows of stage 2 the band needs
        first1, stop1 = max(0, first2 - 1), min(height, stop2 + 1)  # ... and of stage 1
        length = src.shape[1] * (1 if channels_last else 3)  # values per image row
        width = length // 3
        sums = np.empty((6, 3, width), np.float32)  # ring: Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr summed along rows
        coefficient_sums = np.empty((6, 3, width), np.float32)  # ring: slopes, offsets summed along rows
        lumas = np.empty((3, width), np.float32)  # ring: the rows' luma, for stage 3
        chroma = np.empty((2, width), np.float32)
        column = np.empty((6, width), np.float32)
        noise = np.empty(width, np.float32)
        enhanced = np.empty(length, np.float32)
        f = np.empty((2, block), np.float32)
        gain_plane = gain_wide[b]
        variance_scale = noise_variance[b]
        for r in range(first1, stop + 2):
            if r < stop1:
                outside = statistics_row(src, wide, row_scale, recurrences, in_scale, check, low, high, height,
                                         channels_last, to_ycc, b, r, enhanced, f, lumas[r % 3], chroma, sums,
                                         r % 3)
                if first <= r < stop:
                    bad[b * height + r] = outside
            s = r - 1
            if first2 <= s < stop2:
                coefficients_row(sums, s, height, gain_plane[gain_top[s]], gain_plane[gain_bottom[s]],
                                 gain_row_weight[s], variance_scale, regulariser_scale, floor, column, noise,
                                 coefficient_sums, s % 3)
            t = s - 1
            if first <= t < stop:
                filtered_row(coefficient_sums, t, height, column, lumas[t % 3], to_rgb, dst, to_u8, channels_last,
                             b)


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

    return {"rows": jit(rows), "widen": jit(widen), "widen_rows": jit(widen_rows), "guided_band": jit(guided_band),
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


# Cores the last shared calls actually got (CPU time of their threads / wall time), a running average. On an idle
# 2-core machine about 1.8; when another process keeps a core busy the scheduler often leaves both our threads on
# the other one (measured: process CPU time = wall time at 2 threads), and about 1.0. Below _SHARING_PAYS a second
# thread only adds overhead: run_chunks keeps to the calling thread except for one call in _PROBE_EVERY (which
# keeps measuring), and the factor network is not cut into overlapping bands. A measurement older than
# _STALE_SECONDS is forgotten (the next calls share and measure afresh).
_OPTIMISTIC_CORES = 2.0
_cores_in_use = _OPTIMISTIC_CORES
_SHARING_PAYS = 1.3
_PROBE_EVERY = 8
_STALE_SECONDS = 5.0
# Calls shorter than this say little (a scheduler slice decides them) and are not counted.
_MIN_MEASURED_SECONDS = 2e-3
_AVERAGING = 0.25
_measured_at = 0.0
_calls_kept_serial = 0


def sharing_pays() -> bool:
    """Whether recent calls of :func:`run_chunks` with helpers ran on more than one core's worth of CPU."""
    return _cores_in_use >= _SHARING_PAYS or time.monotonic() - _measured_at > _STALE_SECONDS


def _keep_serial() -> bool:
    """Whether this call of :func:`run_chunks` stays on the calling thread (sharing does not pay; not a probe)."""
    global _calls_kept_serial
    if sharing_pays():
        return False
    _calls_kept_serial += 1
    return _calls_kept_serial % _PROBE_EVERY != 0


def _record_cores(busy_seconds: float, wall_seconds: float) -> None:
    global _cores_in_use, _measured_at
    if wall_seconds >= _MIN_MEASURED_SECONDS:
        if time.monotonic() - _measured_at > _STALE_SECONDS:
            _cores_in_use = _OPTIMISTIC_CORES
        _cores_in_use += _AVERAGING * (busy_seconds / wall_seconds - _cores_in_use)
        _measured_at = time.monotonic()


class _Chunks:
    """Chunks ``0..count`` of one call, handed out one at a time; tracks the ones helpers are still running."""

    def __init__(self, count: int, work):
        self.count, self.work = count, work
        self.next = 0
        self.running = 0
        self.stopped = False  # set when the caller is done or a chunk failed: no more chunks handed out
        self.error: Optional[BaseException] = None
        self.idle = threading.Condition()
        self.busy_seconds = 0.0  # CPU time of the helpers' threads while they ran chunks

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
            started = time.thread_time()
            try:
                self.work(index)
            except BaseException as error:  # re-raised by the calling thread
                self.error, self.stopped = error, True
            finally:
                with self.idle:
                    self.busy_seconds += time.thread_time() - started
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
    if threads == 1 or _keep_serial():
        for i in range(chunks):
            work(i)
        return
    with _lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=max(threads - 1, os.cpu_count() or 1),
                                       thread_name_prefix="sgz-kernel")
        pool = _pool
    state = _Chunks(chunks, work)
    wall, cpu = time.perf_counter(), time.thread_time()
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
    _record_cores(time.thread_time() - cpu + state.busy_seconds, time.perf_counter() - wall)


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


def _widened_factor(factor_lowres: Optional[torch.Tensor], batch: int, width: int, channels_last: bool):
    """The factor clamped and resized along W (to ``width``) into the image's row layout (``widen``); without a
    factor, a zero map (the curve is then skipped)."""
    planes, length = (batch, width * 3) if channels_last else (batch * 3, width)
    if factor_lowres is None:
        return np.zeros((planes, 1, length), np.float32)
    factor = np.ascontiguousarray(factor_lowres.detach().to(device="cpu", dtype=torch.float32).numpy())
    wide = np.empty((planes, factor.shape[2], length), np.float32)
    _kernels["widen"](factor, *_align_corners_source(width, factor.shape[3]), wide, channels_last)
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
    threads: Optional[int] = None,
) -> int:
    """SGZ v2's noise filter (:func:`.denoise.gain_guided_denoise`, same math) as one compiled pass over bands of
    image rows (``guided_band``), written into ``out``; with ``factor_lowres`` and ``recurrences > 0`` the curve
    too (``enhance`` then the filter, without the enhanced frame ever being stored: each pixel goes through the
    curve once where the filter reads it).

    ``image`` ``[B, 3, H, W]`` CPU uint8 0..255 or float 0..1 (curve input, or the curve's output without a
    factor); ``out`` the same shape and memory layout, any supported dtype, not sharing memory with ``image``
    (bands read their neighbours' rows);
    ``gain_lowres [B, 1, h, w]``; ``noise_variance [B]``: the input noise's variance; ``regulariser_scale [3]``
    (luma, Cb, Cr multiples of it), ``regulariser_floor``, ``window`` (must be :data:`GUIDED_WINDOW`),
    ``to_ycc``/``to_rgb`` 3x3. Returns the number of float input values outside ``0..1`` (+ :data:`RANGE_SLACK`)
    or not finite.
    """
    batch, _, height, width = image.shape
    if out.untyped_storage().data_ptr() == image.untyped_storage().data_ptr():
        raise ValueError("guided_filter_cpu: out must not share memory with image")
    if window != GUIDED_WINDOW:
        raise ValueError(f"guided_filter_cpu: the compiled pass has {GUIDED_WINDOW}x{GUIDED_WINDOW} windows, "
                         f"got {window}")
    src, dst, channels_last = _image_rows(image, out)
    if factor_lowres is None or recurrences == 0:
        factor_lowres, recurrences = None, 0
    wide = _widened_factor(factor_lowres, batch, width, channels_last)
    row_scale = (wide.shape[1] - 1) / (height - 1) if height > 1 and wide.shape[1] > 1 else 0.0
    from_u8 = image.dtype == torch.uint8
    in_scale = np.float32(1.0 / 255.0 if from_u8 else 1.0)
    threads = torch.get_num_threads() if threads is None else threads
    if threads > 1 and _keep_serial():  # decided here: one thread needs one band per image (no halo work)
        threads = 1

    gain = np.ascontiguousarray(gain_lowres.detach().to(device="cpu", dtype=torch.float32).numpy())[:, 0]
    gain_wide = np.empty((batch, gain.shape[1], width), np.float32)
    _kernels["widen_rows"](gain, *_half_pixel_source(width, gain.shape[2]), gain_wide)
    gain_rows = _half_pixel_source(height, gain.shape[1])
    bad = np.zeros(batch * height, np.int64)
    # Bands of image rows: each recomputes the rows of the stages' halos (2 rows on each side), so
    # one band per image at one thread; with more threads several per thread, so that a thread the scheduler
    # stops (other processes on the cores) holds up only a small part of the frame.
    wanted = 1 if threads == 1 else max(1, _BANDS_PER_THREAD * threads // batch)
    rows_per_band = max(_MIN_BAND_ROWS, math.ceil(height / wanted))
    bands = math.ceil(height / rows_per_band)
    arguments = (src, wide, row_scale, recurrences, in_scale, not from_u8, np.float32(-RANGE_SLACK),
                 np.float32(1.0 + RANGE_SLACK), bad, height, channels_last, gain_wide,
                 *gain_rows, np.asarray(noise_variance, np.float32), np.asarray(regulariser_scale, np.float32),
                 np.float32(regulariser_floor), np.asarray(to_ycc, np.float32),
                 np.asarray(to_rgb, np.float32), dst, out.dtype == torch.uint8)

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
