"""SGZ v2 noise control: an edge-preserving filter after the curve, as strong as the curve amplified the noise.

The curve multiplies the input's sensor noise by its own slope, pixel by pixel: a dark pixel lifted 8x comes out
with 8x the noise, a bright one with about none. That slope (the *local gain*) is known from the low-resolution
factor, so the filter needs no guess about where the noise is, only about how much the input had (estimated from
the input itself, :func:`estimate_noise_sigma`).

The filter is the guided filter (He et al.) with the output's luma as guide, run as a *fast* guided filter
(box means on a subsampled grid): its regulariser per pixel is ``(amount * sigma * gain)^2`` for luma
and a larger multiple for chroma (colour speckle is what eyes see first), so flat regions whose variation is
within the amplified noise are smoothed and edges well above it are kept. Every step but the last runs on the
subsampled grid; the last is one multiply-add per pixel and channel (``rgb = a * Y + b``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ..media.image_convert import check_unit_range
from . import kernel
from .model import _check_enhance_arguments, enhance

# Regulariser multiples of the amplified noise (in standard deviations) for luma and chroma at amount 1, and the
# window (full-resolution pixels; the subsampled grid uses the nearest odd size, at least 3). Chosen on ../shared/data/unpaired looks and checked on LOL eval15
# (benchmarks/bench_sgz_v2.py).
_LUMA_NOISE_MULTIPLE = 2.0
_CHROMA_NOISE_MULTIPLE = 4.0
_WINDOW = 5
# Rows of Rec.601 luma and the chroma differences (Kornia's YCbCr without the 0.5 offset), and their inverse.
_RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Added to every regulariser (about a quarter of an 8-bit level, squared): where the curve adds no noise the filter
# stays near the identity, and flat patches (variance ~ float rounding) cannot make the slope blow up.
_REGULARISER_FLOOR = 1e-6
# The noise floor of 8-bit input (quantisation, 1/sqrt(12) of a level): very dark JPEGs estimate as noiseless.
_MIN_SIGMA = 0.3 / 255.0
# The filter is sized for at most this much input noise (luma standard deviation, 0..1): noisier inputs are filtered
# as if they had this much. Smoothing all of a heavy noise away also flattens texture of the same contrast, which
# costs more than the grain left (an image classifier's agreement with its normal-light prediction: 37.2 -> 42.6 %
# with the subsample-2 filter, 47.2 -> 49.3 % at full resolution; 519 samples, benchmarks/bench_sgz_v2.py classify,
# where cap values 1.0 / 1.15 / 1.3 / 1.6 / 2.0 levels gave 48.6 / 48.6 / 49.3 / 48.2 / 47.4 %). ``denoise``
# above 1 still smooths harder. About LOL eval15's noisiest input (1.28 levels): typical camera noise is not capped.
_MAX_FILTERED_SIGMA = 1.3 / 255.0
# The noise estimate averages the smallest 80 % of the Laplacian responses; for Gaussian noise of standard deviation
# s that mean is s * sqrt(2 / pi) * (1 - exp(-q^2 / 2)) / 0.8 with q = 1.2816, the half-normal's 80 % quantile.
_NOISE_QUANTILE = 0.8
_TRUNCATED_HALF_NORMAL_MEAN = (2.0 / 3.141592653589793) ** 0.5 * (1.0 - 2.718281828459045 ** (-1.2816 ** 2 / 2)) / 0.8
# Strips of 3 rows the noise estimate reads (spread over the frame): its cost does not grow with the frame.
_NOISE_STRIPS = 48


def curve_gain(
    image_lowres: torch.Tensor, factor: torch.Tensor, recurrences: int, *, use_kernel: bool = True
) -> torch.Tensor:
    """Slope of the SGZ curve at each low-resolution pixel, averaged over the channels: ``[B, 1, h, w]``.

    Each step ``x <- x + f (x^2 - x)`` has slope ``1 + f (2x - 1)``; the curve's slope is their product along the
    path of ``x``. ``image_lowres`` and ``factor``: ``[B, 3, h, w]`` (the image resampled to the factor's grid).
    float32 on the CPU without autograd: a compiled loop (:mod:`.kernel`) unless ``use_kernel=False`` (these
    torch ops, its reference, differentiable; both compute in float32).
    """
    if (use_kernel and image_lowres.dtype == factor.dtype == torch.float32 and factor.device.type == "cpu"
            and not (torch.is_grad_enabled() and (image_lowres.requires_grad or factor.requires_grad))
            and kernel.supports(image_lowres, torch.float32)):
        return kernel.curve_gain_cpu(image_lowres, factor, recurrences)
    x = image_lowres.float()
    gain = torch.ones_like(x)
    for _ in range(recurrences):
        gain = gain * (1.0 + factor * (2.0 * x - 1.0))
        x = x + factor * (x * x - x)
    return gain.mean(dim=1, keepdim=True).clamp_(min=0.0)


def estimate_noise_sigma(image: torch.Tensor, *, use_kernel: bool = True) -> torch.Tensor:
    """Standard deviation of the noise of the input's luma in 0..1 units, per image: ``[B]`` float32 (for noise
    independent in R, G and B that is 0.67 x the per-channel one).

    Laplacian estimate (Immerkaer's 3x3 mask, whose response to white noise has 6 sigma standard deviation) on the
    luma of ``_NOISE_STRIPS`` strips of 3 rows spread over the frame. Edges and texture give the largest
    responses, so only the smallest ``_NOISE_QUANTILE`` of them are averaged (with the matching factor of a
    truncated half-normal); a mean rather than a median, because 8-bit input makes the responses discrete.
    ``image``: ``[B, 3, H, W]`` float 0..1 or uint8. On the CPU the responses and their truncated mean are
    compiled loops (:mod:`.kernel`) unless ``use_kernel=False`` (these torch ops, its reference).
    """
    height = image.shape[2]
    if height < 3 or image.shape[3] < 3:
        return torch.full((image.shape[0],), _MIN_SIGMA, device=image.device)
    starts = torch.linspace(0, height - 3, min(_NOISE_STRIPS, height // 3), device=image.device).long()
    if use_kernel and kernel.supports(image, torch.float32):
        sums = kernel.noise_responses_cpu(_contiguous(image), starts.numpy(), _RGB_TO_YCC[0].tolist(), _NOISE_QUANTILE)
        sigma = torch.from_numpy(sums[:, 0] / sums[:, 1]).float() / (_TRUNCATED_HALF_NORMAL_MEAN * 6.0)
        return sigma.clamp_(min=_MIN_SIGMA)
    rows = (starts[:, None] + torch.arange(3, device=image.device)).flatten()
    strips = image.index_select(2, rows).float()
    if image.dtype == torch.uint8:
        strips = strips / 255.0
    luma = torch.einsum("c,bchw->bhw", _RGB_TO_YCC[0].to(strips.device), strips)
    luma = luma.reshape(image.shape[0] * len(starts), 1, 3, -1)
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=image.device)
    response = F.conv2d(luma, mask.view(1, 1, 3, 3)).abs().reshape(image.shape[0], -1)
    kept = max(1, int(response.shape[1] * _NOISE_QUANTILE))
    threshold = response.kthvalue(kept, dim=1, keepdim=True).values
    smallest = torch.where(response <= threshold, response, torch.zeros_like(response))
    sigma = smallest.sum(dim=1) / (response <= threshold).sum(dim=1) / (_TRUNCATED_HALF_NORMAL_MEAN * 6.0)
    return sigma.clamp_(min=_MIN_SIGMA)


def _box_mean(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a ``size`` x ``size`` window, borders replicated (works down to 1x1 images).

    Separable sums of shifted views: a few adds per value, several times faster on the CPU than ``avg_pool2d``."""
    half = size // 2
    height, width = tensor.shape[-2:]
    padded = F.pad(tensor, (half, half, half, half), mode="replicate")
    rows = padded[..., :width] + padded[..., 1 : 1 + width]
    for shift in range(2, size):
        rows += padded[..., shift : shift + width]
    total = rows[..., :height, :] + rows[..., 1 : 1 + height, :]
    for shift in range(2, size):
        total += rows[..., shift : shift + height, :]
    return total.div_(size * size)


def _subsample_grid(size: int, step: int, device: torch.device) -> torch.Tensor:
    count = max(1, size // step)
    return ((torch.arange(count, device=device) + 0.5) * (size / count)).long().clamp_(max=size - 1)


def _subsample(image: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """The grid's pixels along ``dim``: a strided view where the grid is regular (size a multiple of ``step``:
    every ``step``-th pixel from ``step // 2``), ``index_select`` otherwise (12x slower along W at 1920x1080)."""
    size = image.shape[dim]
    if size % step == 0:
        return image.narrow(dim, step // 2, size - step // 2)[(slice(None),) * dim + (slice(None, None, step),)]
    return image.index_select(dim, _subsample_grid(size, step, image.device))


def gain_guided_denoise(
    image: torch.Tensor,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float = 1.0,
    subsample: int = 2,
    *,
    out_dtype: Optional[torch.dtype] = None,
    in_place: bool = False,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Filter the enhanced ``image`` where the curve amplified noise; returns ``[B, 3, H, W]`` clamped to 0..1.

    Args:
        image: the curve's output, ``[B, 3, H, W]`` float 0..1 or uint8 0..255 (NCHW or channels-last).
        gain_lowres: :func:`curve_gain` ``[B, 1, h, w]`` on the factor's grid.
        noise_sigma: ``[B]`` noise of the input (:func:`estimate_noise_sigma`).
        amount: scales the regulariser's noise multiples; 0 returns the image unchanged (in ``out_dtype``).
        subsample: the guided filter's coefficients are computed on every ``subsample``-th pixel (fast guided
            filter) and interpolated back; 1 = exact.
        out_dtype: the result's dtype (uint8: rounded); the image's by default.
        in_place: write the result into ``image`` (when ``out_dtype`` is its dtype): no second full-size frame.
        use_kernel: on the CPU the filter runs as one compiled pass per band of rows (:mod:`.kernel`); ``False``
            forces the torch implementation (its reference, used on other devices and without numba).
    """
    out_dtype = out_dtype or image.dtype
    if amount <= 0.0:
        return _to_unit_dtype(image, out_dtype)
    if use_kernel and kernel.supports(image, out_dtype):
        source = _contiguous(image)
        out = _new_like(source, out_dtype)
        kernel.guided_filter_cpu(source, out, None, 0, gain_lowres,
                                 **_kernel_arguments(source, noise_sigma, amount, subsample))
        if in_place and out_dtype == image.dtype:
            return image.copy_(out)  # the compiled pass reads neighbouring rows: it cannot write over its input
        return out
    return _guided_filter_torch(image, gain_lowres, noise_sigma, amount, subsample, out_dtype)


def enhance_denoised(
    image: torch.Tensor,
    factor_lowres: torch.Tensor,
    recurrences: int,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float = 1.0,
    subsample: int = 2,
    *,
    out_dtype: Optional[torch.dtype] = None,
    what: str = "image",
    use_kernel: bool = True,
) -> torch.Tensor:
    """The curve (:func:`.model.enhance`) and then :func:`gain_guided_denoise`, without storing the curve's
    output: on the CPU the compiled passes compute the curve where they read a pixel (the grid's pixels, then
    each pixel once), so uint8 in gives uint8 out with no float frame in between. Elsewhere (``use_kernel=False``,
    other devices, no numba) the curve's output as float32, then the torch filter: the reference.

    ``image [B, 3, H, W]`` uint8 or float 0..1; ``factor_lowres [B, 3, h, w]``; ``out_dtype``: the image's by
    default. Raises ValueError naming ``what`` when a float image has NaN/inf or values outside 0..1.
    """
    out_dtype = out_dtype or image.dtype
    if amount <= 0.0 or recurrences == 0:
        return enhance(image, factor_lowres, recurrences, out_dtype=out_dtype, what=what, use_kernel=use_kernel)
    _check_enhance_arguments(image, factor_lowres, recurrences)
    if use_kernel and kernel.supports(image, out_dtype) and factor_lowres.device.type == "cpu":
        image = _contiguous(image)
        out = _new_like(image, out_dtype)
        outside = kernel.guided_filter_cpu(image, out, factor_lowres, recurrences, gain_lowres,
                                           **_kernel_arguments(image, noise_sigma, amount, subsample))
        if outside:
            check_unit_range(image, what)  # the error path: a second pass only to report the range found
        return out
    enhanced = enhance(image, factor_lowres, recurrences, out_dtype=torch.float32, what=what, use_kernel=use_kernel)
    return gain_guided_denoise(enhanced, gain_lowres, noise_sigma, amount, subsample, out_dtype=out_dtype,
                               in_place=True, use_kernel=use_kernel)


def _kernel_arguments(image: torch.Tensor, noise_sigma: torch.Tensor, amount: float, subsample: int) -> dict:
    """The filter's constants for :func:`.kernel.guided_filter_cpu` (the same values as the torch path's)."""
    height, width = image.shape[-2:]
    return dict(
        noise_variance=_filtered_noise_variance(noise_sigma.detach().cpu()).numpy(),
        regulariser_scale=_regulariser_scale(amount).numpy(),
        regulariser_floor=_REGULARISER_FLOOR,
        window=_grid_window(subsample),
        to_ycc=_RGB_TO_YCC.numpy(),
        to_rgb=torch.linalg.inv(_RGB_TO_YCC).numpy(),
        grid_rows=_subsample_grid(height, subsample, torch.device("cpu")).numpy(),
        grid_columns=_subsample_grid(width, subsample, torch.device("cpu")).numpy(),
    )


def _filtered_noise_variance(noise_sigma: torch.Tensor) -> torch.Tensor:
    """The input noise variance the filter is sized for, per image: the estimate capped at ``_MAX_FILTERED_SIGMA``."""
    return noise_sigma.float().clamp(max=_MAX_FILTERED_SIGMA).square()


def _regulariser_scale(amount: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """Multiples of the amplified noise variance for luma, Cb and Cr at ``amount``: ``[3]``."""
    multiples = torch.tensor([_LUMA_NOISE_MULTIPLE, _CHROMA_NOISE_MULTIPLE, _CHROMA_NOISE_MULTIPLE], device=device)
    return (amount * multiples).square()


def _grid_window(subsample: int) -> int:
    """The box window on the subsampled grid: ``_WINDOW`` full-resolution pixels, odd, at least 3."""
    return max(3, (_WINDOW - 1) // subsample + 1) | 1


def _contiguous(image: torch.Tensor) -> torch.Tensor:
    return image.contiguous(memory_format=_layout(image))


def _new_like(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(image, dtype=dtype, memory_format=_layout(image))


def _guided_filter_torch(image, gain_lowres, noise_sigma, amount, subsample, out_dtype) -> torch.Tensor:
    """:func:`gain_guided_denoise` with torch ops (any device and dtype): the compiled passes' reference."""
    height, width = image.shape[-2:]
    with single_torch_thread(image.device.type == "cpu"):
        coefficients = _rgb_coefficients(image, gain_lowres, noise_sigma, amount, subsample)
    full = _to_unit_dtype(image, torch.float32)
    if coefficients.shape[-2:] != (height, width):
        coefficients = F.interpolate(coefficients, size=(height, width), mode="bilinear", align_corners=False)
    full_luma = torch.einsum("c,bchw->bhw", _RGB_TO_YCC[0].to(image.device), full).unsqueeze(1)
    result = torch.addcmul(coefficients[:, 3:], coefficients[:, :3], full_luma).clamp_(0.0, 1.0)
    return _to_unit_dtype(result, out_dtype)


@contextlib.contextmanager
def single_torch_thread(enabled: bool):
    """torch at one thread for the block (when ``enabled``). The filter's low-resolution ops (gain, noise
    estimate, the subsampled grid) are a few ms each: OpenMP gains little on them and its barriers stall for whole
    scheduler slices when other processes load the CPU (1920x1080 frame on 2 busy cores, 2 threads vs 1: the
    coefficients ~290 vs ~35 ms, the curve's gain ~600 vs ~5 ms, measured)."""
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled and threads > 1:
            torch.set_num_threads(threads)


def _layout(image: torch.Tensor) -> torch.memory_format:
    channels_last = image.stride(1) == 1 and not image.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _to_unit_dtype(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``image`` (uint8 0..255 or float 0..1) as ``dtype`` in the same convention (uint8: rounded half up)."""
    if image.dtype == dtype:
        return image
    if dtype == torch.uint8:
        return image.float().mul(255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)
    if image.dtype == torch.uint8:
        return image.to(dtype).div_(255.0)
    return image.to(dtype)


def _rgb_coefficients(
    image: torch.Tensor,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float,
    subsample: int,
) -> torch.Tensor:
    """The guided filter's coefficients on the subsampled grid, in RGB: ``[B, 6, h, w]`` (slopes, then offsets,
    of ``rgb = a * Y + b``). Reads only the grid's pixels of ``image``."""
    height, width = image.shape[-2:]
    small = _to_unit_dtype(_subsample(_subsample(image, 2, subsample), 3, subsample), torch.float32).contiguous()
    # Noise the curve added on the subsampled grid: the input's variance times (slope^2 - 1). Where the curve does
    # not amplify (slope <= 1: bright regions, strength 0) nothing is filtered.
    gain = F.interpolate(gain_lowres.float(), size=small.shape[-2:], mode="bilinear", align_corners=False)
    noise_variance = gain.square_().sub_(1.0).clamp_(min=0.0).mul_(
        _filtered_noise_variance(noise_sigma).view(-1, 1, 1, 1))
    regulariser_scale = _regulariser_scale(amount, image.device)
    window = _grid_window(subsample)
    to_rgb = torch.linalg.inv(_RGB_TO_YCC).to(image.device)
    ycc = torch.einsum("dc,bchw->bdhw", _RGB_TO_YCC.to(image.device), small)
    luma = ycc[:, :1]

    # All window means in two calls: (Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr), then the coefficients (slopes, offsets).
    box = functools.partial(_box_mean, size=window)
    means = box(torch.cat([ycc, luma * ycc], dim=1))
    mean_luma, mean_target, correlation = means[:, :1], means[:, :3], means[:, 3:]
    covariance = torch.addcmul(correlation, mean_luma, mean_target, value=-1.0)  # channel 0: the luma variance
    regulariser = noise_variance * regulariser_scale.view(1, 3, 1, 1) + _REGULARISER_FLOOR
    slopes = covariance / regulariser.add_(covariance[:, :1])
    offsets = torch.addcmul(mean_target, slopes, mean_luma, value=-1.0)
    coefficients = box(torch.cat([slopes, offsets], dim=1))
    # Back to RGB on the small grid (linear): the full-resolution step is then one multiply-add per value.
    return torch.einsum("cd,bdhw->bchw", torch.block_diag(to_rgb, to_rgb), coefficients)
