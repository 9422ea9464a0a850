"""SGZ v2 noise control: an edge-preserving filter after the curve, as strong as the curve amplified the noise.

The curve multiplies the input's sensor noise by its own slope, pixel by pixel: a dark pixel lifted 8x comes out
with 8x the noise, a bright one with about none. That slope (the *local gain*) is known from the low-resolution
factor, so the filter needs no guess about where the noise is, only about how much the input had (estimated from
the input itself, :func:`estimate_noise_sigma`).

The filter is the guided filter (He et al.) at full resolution with the output's luma as guide, 3x3 windows: its
regulariser per pixel is ``(amount * sigma * gain)^2`` for luma and a larger multiple for chroma (colour speckle is
what eyes see first), so flat regions whose variation is within the amplified noise are smoothed and edges well
above it are kept. The windows are small on purpose: the same filter on a subsample-2 grid (the "fast" guided
filter, about 11 pixels of support) flattened the fine luma detail an image classifier relies on (agreement
with the normal-light prediction 37 % vs 46 %, benchmarks/bench_sgz_v2.py classify) at equal LOL scores and noise.
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
# box window (pixels, odd). Chosen on ../shared/data/unpaired looks and the classify set, checked on LOL eval15
# (benchmarks/bench_sgz_v2.py).
_LUMA_NOISE_MULTIPLE = 2.0
_CHROMA_NOISE_MULTIPLE = 4.0
_WINDOW = 3
# Rows of Rec.601 luma and the chroma differences (Kornia's YCbCr without the 0.5 offset), and their inverse.
_RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Added to every regulariser (about a quarter of an 8-bit level, squared): where the curve adds no noise the filter
# stays near the identity, and flat patches (variance ~ float rounding) cannot make the slope blow up.
_REGULARISER_FLOOR = 1e-6
# The noise floor of 8-bit input (quantisation, 1/sqrt(12) of a level): very dark JPEGs estimate as noiseless.
_MIN_SIGMA = 0.3 / 255.0
# The filter is sized for at most this much input noise (luma standard deviation, 0..1): noisier inputs are filtered
# as if they had this much. Smoothing all of a heavy noise away also flattens texture of the same contrast, which
# costs more than the grain left: an image classifier's agreement with its normal-light prediction rises from 47.2
# to 49.3 % (519 samples, benchmarks/bench_sgz_v2.py classify; caps of 1.0 / 1.15 / 1.3 / 1.6 / 2.0 levels gave
# 48.6 / 48.6 / 49.3 / 48.2 / 47.4 %). LOL eval15's low images estimate at 0.6-1.28 levels, so ordinary camera
# noise stays below the cap; the darkened copies of the benchmarks at 1.7-3.6. ``denoise`` > 1 still smooths harder.
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
    del padded
    total = rows[..., :height, :] + rows[..., 1 : 1 + height, :]
    for shift in range(2, size):
        total += rows[..., shift : shift + height, :]
    return total.div_(size * size)


def gain_guided_denoise(
    image: torch.Tensor,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float = 1.0,
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
        out_dtype: the result's dtype (uint8: rounded); the image's by default.
        in_place: write the result into ``image`` (when ``out_dtype`` is its dtype): no second full-size frame.
        use_kernel: on the CPU the filter runs as one compiled pass per band of rows (:mod:`.kernel`, 3x3
            windows); ``False`` forces the torch implementation (its reference, used on other devices, without
            numba and for other windows).
    """
    out_dtype = out_dtype or image.dtype
    if amount <= 0.0:
        return _to_unit_dtype(image, out_dtype)
    if _compiled_filter_applies(use_kernel, image, out_dtype):
        source = _contiguous(image)
        out = _new_like(source, out_dtype)
        kernel.guided_filter_cpu(source, out, None, 0, gain_lowres,
                                 **_kernel_arguments(noise_sigma, amount))
        if in_place and out_dtype == image.dtype:
            return image.copy_(out)  # the compiled pass reads neighbouring rows: it cannot write over its input
        return out
    return _guided_filter_torch(image, gain_lowres, noise_sigma, amount, out_dtype)


def enhance_denoised(
    image: torch.Tensor,
    factor_lowres: torch.Tensor,
    recurrences: int,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float = 1.0,
    *,
    out_dtype: Optional[torch.dtype] = None,
    what: str = "image",
    use_kernel: bool = True,
) -> torch.Tensor:
    """The curve (:func:`.model.enhance`) and then :func:`gain_guided_denoise`, without storing the curve's
    output: on the CPU the compiled pass computes the curve where it reads a pixel (each pixel once), so uint8 in
    gives uint8 out with no float frame in between. Elsewhere (``use_kernel=False``, other devices, no numba, or a
    ``_WINDOW`` the pass is not written for) the curve's output as float32, then the torch filter: the
    reference.

    ``image [B, 3, H, W]`` uint8 or float 0..1; ``factor_lowres [B, 3, h, w]``; ``out_dtype``: the image's by
    default. Raises ValueError naming ``what`` when a float image has NaN/inf or values outside 0..1.
    """
    out_dtype = out_dtype or image.dtype
    if amount <= 0.0 or recurrences == 0:
        return enhance(image, factor_lowres, recurrences, out_dtype=out_dtype, what=what, use_kernel=use_kernel)
    _check_enhance_arguments(image, factor_lowres, recurrences)
    if _compiled_filter_applies(use_kernel, image, out_dtype) and factor_lowres.device.type == "cpu":
        image = _contiguous(image)
        out = _new_like(image, out_dtype)
        outside = kernel.guided_filter_cpu(image, out, factor_lowres, recurrences, gain_lowres,
                                           **_kernel_arguments(noise_sigma, amount))
        if outside:
            check_unit_range(image, what)  # the error path: a second pass only to report the range found
        return out
    enhanced = enhance(image, factor_lowres, recurrences, out_dtype=torch.float32, what=what, use_kernel=use_kernel)
    return gain_guided_denoise(enhanced, gain_lowres, noise_sigma, amount, out_dtype=out_dtype,
                               in_place=True, use_kernel=use_kernel)


def _compiled_filter_applies(use_kernel: bool, image: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the compiled pass (:func:`.kernel.guided_filter_cpu`) can run: asked for, a CPU image it supports,
    and the window it is written for."""
    return use_kernel and _WINDOW == kernel.GUIDED_WINDOW and kernel.supports(image, out_dtype)


def _kernel_arguments(noise_sigma: torch.Tensor, amount: float) -> dict:
    """The filter's constants for :func:`.kernel.guided_filter_cpu` (the same values as the torch path's)."""
    return dict(
        noise_variance=_filtered_noise_variance(noise_sigma.detach().cpu()).numpy(),
        regulariser_scale=_regulariser_scale(amount).numpy(),
        regulariser_floor=_REGULARISER_FLOOR,
        window=_WINDOW,
        to_ycc=_RGB_TO_YCC.numpy(),
        to_rgb=torch.linalg.inv(_RGB_TO_YCC).numpy(),
    )


def _filtered_noise_variance(noise_sigma: torch.Tensor) -> torch.Tensor:
    """The input noise variance the filter is sized for, per image: the estimate capped at ``_MAX_FILTERED_SIGMA``."""
    return noise_sigma.float().clamp(max=_MAX_FILTERED_SIGMA).square()


def _regulariser_scale(amount: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """Multiples of the amplified noise variance for luma, Cb and Cr at ``amount``: ``[3]``."""
    multiples = torch.tensor([_LUMA_NOISE_MULTIPLE, _CHROMA_NOISE_MULTIPLE, _CHROMA_NOISE_MULTIPLE], device=device)
    return (amount * multiples).square()


def _contiguous(image: torch.Tensor) -> torch.Tensor:
    return image.contiguous(memory_format=_layout(image))


def _new_like(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(image, dtype=dtype, memory_format=_layout(image))


def _guided_filter_torch(image, gain_lowres, noise_sigma, amount, out_dtype) -> torch.Tensor:
    """:func:`gain_guided_denoise` with torch ops (any device and dtype): the compiled pass's reference.

    One image at a time, intermediates released as soon as they are used: the filter needs about a dozen float
    planes of the image's size at once (a batch of 4K frames at once took 1.5 GB per frame)."""
    if image.shape[0] > 1:
        return torch.cat([_guided_filter_torch(image[i : i + 1], gain_lowres[i : i + 1], noise_sigma[i : i + 1],
                                               amount, out_dtype) for i in range(image.shape[0])])
    ycc = torch.einsum("dc,bchw->bdhw", _RGB_TO_YCC.to(image.device), _to_unit_dtype(image, torch.float32))
    luma = ycc[:, :1]
    # All window means in two calls: (Y, Cb, Cr, Y*Y, Y*Cb, Y*Cr), then the coefficients (slopes, offsets).
    box = functools.partial(_box_mean, size=_WINDOW)
    statistics = torch.cat([ycc, luma * ycc], dim=1)
    luma = luma.clone()
    del ycc
    means = box(statistics)
    del statistics
    mean_luma, mean_target, covariance = means[:, :1], means[:, :3], means[:, 3:]
    covariance.addcmul_(mean_luma, mean_target, value=-1.0)  # from the correlations; channel 0: the luma variance
    # Noise the curve added: the input's variance times (slope^2 - 1). Where the curve does not amplify (slope <= 1:
    # bright regions, strength 0) nothing is filtered.
    gain = F.interpolate(gain_lowres.float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
    noise_variance = gain.square_().sub_(1.0).clamp_(min=0.0).mul_(
        _filtered_noise_variance(noise_sigma).view(-1, 1, 1, 1))
    regulariser = noise_variance * _regulariser_scale(amount, image.device).view(1, 3, 1, 1) + _REGULARISER_FLOOR
    del gain, noise_variance
    slopes = covariance.div_(regulariser.add_(covariance[:, :1]))
    del regulariser
    coefficients = torch.cat([slopes, torch.addcmul(mean_target, slopes, mean_luma, value=-1.0)], dim=1)
    del means, mean_luma, mean_target, covariance, slopes
    coefficients = box(coefficients)
    filtered = torch.addcmul(coefficients[:, 3:], coefficients[:, :3], luma)
    del coefficients
    result = torch.einsum("cd,bdhw->bchw", torch.linalg.inv(_RGB_TO_YCC).to(image.device), filtered)
    return _to_unit_dtype(result.clamp_(0.0, 1.0), out_dtype)


@contextlib.contextmanager
def single_torch_thread(enabled: bool):
    """torch at one thread for the block (when ``enabled``). The filter's low-resolution ops (gain, noise
    estimate, the exposure fit) are a few ms each: OpenMP gains little on them and its barriers stall for whole
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
