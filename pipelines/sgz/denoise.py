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

import functools

import torch
import torch.nn.functional as F

# Regulariser multiples of the amplified noise (in standard deviations) for luma and chroma at amount 1, and the
# windows (pixels of the subsampled grid). Chosen on ../shared/data/unpaired looks and checked on LOL eval15
# (benchmarks/bench_sgz_v2.py).
_LUMA_NOISE_MULTIPLE = 2.0
_CHROMA_NOISE_MULTIPLE = 4.0
_LUMA_WINDOW = 5
_CHROMA_WINDOW = 5
# Rows of Rec.601 luma and the chroma differences (Kornia's YCbCr without the 0.5 offset), and their inverse.
_RGB_TO_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
# Added to every regulariser (about a quarter of an 8-bit level, squared): where the curve adds no noise the filter
# stays near the identity, and flat patches (variance ~ float rounding) cannot make the slope blow up.
_REGULARISER_FLOOR = 1e-6
# The noise floor of 8-bit input (quantisation, 1/sqrt(12) of a level): very dark JPEGs estimate as noiseless.
_MIN_SIGMA = 0.3 / 255.0
# The noise estimate averages the smallest 80 % of the Laplacian responses; for Gaussian noise of standard deviation
# s that mean is s * sqrt(2 / pi) * (1 - exp(-q^2 / 2)) / 0.8 with q = 1.2816, the half-normal's 80 % quantile.
_NOISE_QUANTILE = 0.8
_TRUNCATED_HALF_NORMAL_MEAN = (2.0 / 3.141592653589793) ** 0.5 * (1.0 - 2.718281828459045 ** (-1.2816 ** 2 / 2)) / 0.8
# Strips of 3 rows the noise estimate reads (spread over the frame): its cost does not grow with the frame.
_NOISE_STRIPS = 48


def curve_gain(image_lowres: torch.Tensor, factor: torch.Tensor, recurrences: int) -> torch.Tensor:
    """Slope of the SGZ curve at each low-resolution pixel, averaged over the channels: ``[B, 1, h, w]``.

    Each step ``x <- x + f (x^2 - x)`` has slope ``1 + f (2x - 1)``; the curve's slope is their product along the
    path of ``x``. ``image_lowres`` and ``factor``: ``[B, 3, h, w]`` (the image resampled to the factor's grid).
    """
    x = image_lowres.float()
    gain = torch.ones_like(x)
    for _ in range(recurrences):
        gain = gain * (1.0 + factor * (2.0 * x - 1.0))
        x = x + factor * (x * x - x)
    return gain.mean(dim=1, keepdim=True).clamp_(min=0.0)


def estimate_noise_sigma(image: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the noise of the input's luma in 0..1 units, per image: ``[B]`` float32 (for noise
    independent in R, G and B that is 0.67 x the per-channel one).

    Laplacian estimate (Immerkaer's 3x3 mask, whose response to white noise has 6 sigma standard deviation) on the
    luma of ``_NOISE_STRIPS`` strips of 3 rows spread over the frame. Edges and texture give the largest
    responses, so only the smallest ``_NOISE_QUANTILE`` of them are averaged (with the matching factor of a
    truncated half-normal); a mean rather than a median, because 8-bit input makes the responses discrete.
    ``image``: ``[B, 3, H, W]`` float 0..1 or uint8.
    """
    height = image.shape[2]
    if height < 3 or image.shape[3] < 3:
        return torch.full((image.shape[0],), _MIN_SIGMA, device=image.device)
    starts = torch.linspace(0, height - 3, min(_NOISE_STRIPS, height // 3), device=image.device).long()
    rows = (starts[:, None] + torch.arange(3, device=image.device)).flatten()
    strips = image.index_select(2, rows).float()
    if image.dtype == torch.uint8:
        strips = strips / 255.0
    luma = torch.einsum("c,bchw->bhw", _RGB_TO_YCC[0].to(strips.device), strips)
    luma = luma.reshape(image.shape[0] * len(starts), 1, 3, -1)
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=image.device)
    response = F.conv2d(luma, mask.view(1, 1, 3, 3)).abs().reshape(image.shape[0], -1)
    kept = max(1, int(response.shape[1] * _NOISE_QUANTILE))
    smallest = response.sort(dim=1).values[:, :kept]
    sigma = smallest.mean(dim=1) / (_TRUNCATED_HALF_NORMAL_MEAN * 6.0)
    return sigma.clamp_(min=_MIN_SIGMA)


def _box_mean(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a ``size`` x ``size`` window, borders replicated (works down to 1x1 images)."""
    half = size // 2
    return F.avg_pool2d(F.pad(tensor, (half, half, half, half), mode="replicate"), size, stride=1)


def _subsample_grid(size: int, step: int, device: torch.device) -> torch.Tensor:
    count = max(1, size // step)
    return ((torch.arange(count, device=device) + 0.5) * (size / count)).long().clamp_(max=size - 1)


def gain_guided_denoise(
    image: torch.Tensor,
    gain_lowres: torch.Tensor,
    noise_sigma: torch.Tensor,
    amount: float = 1.0,
    subsample: int = 2,
) -> torch.Tensor:
    """Filter the enhanced ``image`` where the curve amplified noise; returns a new float32 ``[B, 3, H, W]``.

    Args:
        image: the curve's output, ``[B, 3, H, W]`` float 0..1.
        gain_lowres: :func:`curve_gain` ``[B, 1, h, w]`` on the factor's grid.
        noise_sigma: ``[B]`` noise of the input (:func:`estimate_noise_sigma`).
        amount: scales the regulariser's noise multiples; 0 returns the image unchanged (as float32).
        subsample: the guided filter's coefficients are computed on every ``subsample``-th pixel (fast guided
            filter) and interpolated back; 1 = exact.
    """
    image = image.float()
    if amount <= 0.0:
        return image
    batch, _, height, width = image.shape
    rows = _subsample_grid(height, subsample, image.device)
    cols = _subsample_grid(width, subsample, image.device)
    small = image.index_select(2, rows).index_select(3, cols)
    ycc = torch.einsum("dc,bchw->bdhw", _RGB_TO_YCC.to(image.device), small)
    luma = ycc[:, :1]
    # Noise the curve added on the subsampled grid: the input's variance times (slope^2 - 1). Where the curve does
    # not amplify (slope <= 1: bright regions, strength 0) nothing is filtered.
    gain = F.interpolate(gain_lowres.float(), size=luma.shape[-2:], mode="bilinear", align_corners=False)
    noise_variance = gain.square_().sub_(1.0).clamp_(min=0.0).mul_(noise_sigma.view(-1, 1, 1, 1).float().square())

    coefficients = []
    for channel, (window, multiple) in enumerate(
        ((_LUMA_WINDOW, _LUMA_NOISE_MULTIPLE), (_CHROMA_WINDOW, _CHROMA_NOISE_MULTIPLE), (_CHROMA_WINDOW, _CHROMA_NOISE_MULTIPLE))
    ):
        size = max(3, (window - 1) // subsample + 1) | 1
        box = functools.partial(_box_mean, size=size)
        target = ycc[:, channel : channel + 1]
        mean_luma = box(luma)
        mean_target = box(target)
        variance = box(luma * luma) - mean_luma * mean_luma
        covariance = box(luma * target) - mean_luma * mean_target
        slope = covariance / (variance + noise_variance * (amount * multiple) ** 2 + _REGULARISER_FLOOR)
        offset = mean_target - slope * mean_luma
        coefficients += [box(slope), box(offset)]
    # Back to RGB on the small grid (linear), then one multiply-add per pixel at full size.
    slopes = torch.cat(coefficients[0::2], dim=1)
    offsets = torch.cat(coefficients[1::2], dim=1)
    to_rgb = torch.linalg.inv(_RGB_TO_YCC).to(image.device)
    rgb_coefficients = torch.cat(
        [torch.einsum("cd,bdhw->bchw", to_rgb, slopes), torch.einsum("cd,bdhw->bchw", to_rgb, offsets)], dim=1
    )
    if rgb_coefficients.shape[-2:] != (height, width):
        rgb_coefficients = F.interpolate(rgb_coefficients, size=(height, width), mode="bilinear", align_corners=False)
    full_luma = torch.einsum("c,bchw->bhw", _RGB_TO_YCC[0].to(image.device), image).unsqueeze(1)
    return torch.addcmul(rgb_coefficients[:, 3:], rgb_coefficients[:, :3], full_luma)
