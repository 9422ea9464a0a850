"""SGZ v2 exposure: fit the curve's strength to the whole photo, and keep bright regions out of clipping.

The factor network sees a neighbourhood of a few low-resolution pixels; it cannot tell a moderately dark photo
from a very dark one, so both are lifted by about the same curve (moderately dark ones come out milky). Both
corrections here work on the low-resolution factor, before the full-resolution pass, so they cost next to
nothing and the video path (temporal smoothing) sees them as part of the factor:

* :func:`fit_exposure` scales each image's factor (the same scaling as the user's ``strength``, so the curve
  stays monotone and inside 0..1) so that the output's *log-average luma* (the photographic "key", which large
  light sources do not dominate the way they dominate the plain mean) reaches a target that rises gently with the
  input's own key: very dark photos are lifted to about middle grey, mid-dark ones only a little;
* :func:`highlight_shoulder` fades the factor out where the input is already bright, so lamps, lit water and
  skies are not pushed into clipping.

No ground truth is involved: the target is a fixed function of the input's statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Output key (geometric mean of luma, 0..1) aimed at: _TARGET_KEY + _TARGET_SLOPE * input key. 0.40 is about the
# sRGB value of an 18 % grey card (the exposure meters' mid tone); the slope keeps brighter inputs brighter.
_TARGET_KEY = 0.40
_TARGET_SLOPE = 0.25
# The fitted scaling of the factor stays within these bounds (the model's own curve is 1).
_SCALE_BOUNDS = (0.25, 4.0)
# Candidate scalings, log-spaced over the bounds; the output key is interpolated between them.
_CANDIDATES = 9
_KEY_EPSILON = 1.0 / 255.0
# The shoulder: the factor is faded out between these brightnesses (the brightest channel of the input, dilated
# by one low-resolution pixel so that the edge of a bright region is protected as well as its inside).
_SHOULDER_START = 0.55
_SHOULDER_END = 0.95
_LUMA = (0.299, 0.587, 0.114)


def _key(image: torch.Tensor) -> torch.Tensor:
    """Log of the geometric mean of luma over each image: ``[..., 3, N]`` -> ``[...]``."""
    luma = sum(weight * image[..., channel, :] for channel, weight in enumerate(_LUMA))
    return luma.add(_KEY_EPSILON).log_().mean(dim=-1)


def exposure_scale(image_lowres: torch.Tensor, factor: torch.Tensor, recurrences: int) -> torch.Tensor:
    """Per image, the scaling of ``factor`` whose curve output reaches the target key: ``[B]`` float32.

    ``image_lowres``: the input resampled to the factor's grid, ``[B, 3, h, w]`` 0..1; ``factor``: ``[B, 3, h, w]``
    in -1..1. Where the output key does not rise with the scaling (a darkening or zero factor) the scale is 1.
    """
    batch = image_lowres.shape[0]
    x = image_lowres.float().flatten(2)  # [B, 3, N]
    target = _TARGET_KEY + _TARGET_SLOPE * _key(x).exp()  # [B]
    target = target.clamp_(max=1.0 - 1e-3).log_()
    low, high = (math.log(bound) for bound in _SCALE_BOUNDS)
    log_scales = torch.linspace(low, high, _CANDIDATES, device=factor.device)
    keys = _candidate_keys(x, factor.float().flatten(2), log_scales.exp(), recurrences)  # [B, K]
    result = torch.ones(batch, device=factor.device)
    for i in range(batch):
        values = keys[i]
        # Rising with the scaling (flat once the factor saturates at -1); otherwise the fit does not apply.
        if not (bool((values[1:] >= values[:-1] - 1e-6).all()) and bool(values[-1] > values[0])):
            continue
        result[i] = _interpolate(float(target[i]), values.tolist(), log_scales.tolist())
    return result


def _candidate_keys(x: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor, recurrences: int) -> torch.Tensor:
    """The output key for each scaling of the factor: ``x``, ``factor`` ``[B, 3, N]`` float32, ``scales [K]`` ->
    ``[B, K]``. On the CPU one compiled loop (:func:`.kernel.curve_keys_cpu`, ~5x faster at 1080p); these torch
    ops elsewhere and without numba (its reference)."""
    from . import kernel

    if x.device.type == "cpu" and factor.device.type == "cpu" and kernel.available():
        return kernel.curve_keys_cpu(x, factor, scales, recurrences, _LUMA, _KEY_EPSILON)
    from .model import apply_recurrence_reference

    scaled = (factor.unsqueeze(1) * scales.view(1, -1, 1, 1)).clamp_(-1.0, 1.0)
    return _key(apply_recurrence_reference(x.unsqueeze(1), scaled, recurrences))


def _interpolate(target: float, values: list, log_scales: list) -> float:
    """exp of the log-scale where the non-decreasing piecewise-linear ``values`` first reach ``target`` (clamped
    to the ends)."""
    if target <= values[0]:
        return math.exp(log_scales[0])
    for i in range(1, len(values)):
        if target <= values[i] and values[i] > values[i - 1]:
            weight = (target - values[i - 1]) / (values[i] - values[i - 1])
            return math.exp(log_scales[i - 1] + weight * (log_scales[i] - log_scales[i - 1]))
    return math.exp(log_scales[-1])


def fit_exposure(image_lowres: torch.Tensor, factor: torch.Tensor, recurrences: int, amount: float = 1.0):
    """``factor`` scaled per image by :func:`exposure_scale` raised to ``amount`` (0 = unchanged, 1 = fitted),
    clamped to -1..1. Returns ``(factor, scale [B])``."""
    if amount <= 0.0 or recurrences == 0:
        return factor, torch.ones(factor.shape[0], device=factor.device)
    scale = exposure_scale(image_lowres, factor, recurrences).pow_(amount)
    return (factor.float() * scale.view(-1, 1, 1, 1)).clamp_(-1.0, 1.0), scale


def highlight_shoulder(image_lowres: torch.Tensor, factor: torch.Tensor, amount: float = 1.0) -> torch.Tensor:
    """Fade a brightening ``factor`` out where the input is bright (smoothstep between ``_SHOULDER_START`` and
    ``_SHOULDER_END`` of the brightest channel, dilated by one pixel). ``amount`` 0..1 scales the fade.
    Darkening (positive) factor values are left alone."""
    if amount <= 0.0:
        return factor
    brightest = image_lowres.float().amax(dim=1, keepdim=True)
    brightest = F.max_pool2d(brightest, kernel_size=3, stride=1, padding=1)
    t = ((brightest - _SHOULDER_START) / (_SHOULDER_END - _SHOULDER_START)).clamp_(0.0, 1.0)
    fade = 1.0 - amount * t * t * (3.0 - 2.0 * t)
    return torch.where(factor < 0, factor * fade, factor)
