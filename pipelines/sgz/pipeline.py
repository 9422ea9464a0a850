"""SGZPipeline: zero-shot low-light enhancement of images, batches and video frames with the SGZ model.

Plain torch + numpy + PIL (no diffusers import). Example::

    from comfyui_lowlight.pipelines import SGZPipeline

    pipe = SGZPipeline.from_pretrained()                       # shipped weights
    pipe = SGZPipeline.from_pretrained("path/Epoch99.pth")     # official checkpoint or our safetensors
    out = pipe(image)                                          # same kind as the input
    out, factor = pipe(image, strength=1.3, return_factor=True)

    state = pipe.new_video_state()                             # video, chunk by chunk
    for chunk in chunks:
        frames = pipe(chunk, temporal_smoothing=0.8, video_state=state)
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..media.image_convert import check_unit_range, to_tensor_batch
from .denoise import curve_gain, enhance_denoised, estimate_noise_sigma, single_torch_thread
from .exposure import fit_exposure, highlight_shoulder
from . import kernel
from .kernel import run_chunks
from .options import (
    AUTO_EXPOSURE,
    DENOISE,
    DOWNSCALE,
    RECURRENCES,
    STRENGTH,
    TEMPORAL_SMOOTHING,
    check_sgz_options,
)
from .model import (
    SHIPPED_WEIGHTS,
    EnhancementFactorEstimator,
    apply_recurrence_reference,
    downsample_bilinear,
    enhance,
    estimate_factor_lowres,
    load_sgz_weights,
    lowres_size,
    save_sgz_weights,
    shipped_or_given,
    upsample_factor,
)


@dataclass
class SGZVideoState:
    """Temporal-smoothing memory carried across ``pipe(...)`` calls of one video.

    ``factor``: the last smoothed low-resolution factor ``[3, h, w]`` (float32), or None before the first frame.
    ``input_level``: running average of the log mean brightness of the input, for scene cuts.
    ``output_level``: running average of the log mean brightness of the output, the level the stabiliser holds.
    It restarts by itself when the low-resolution size changes (another frame size or downscale) and at scene cuts.
    """

    factor: Optional[torch.Tensor] = None
    input_level: Optional[float] = None
    output_level: Optional[float] = None

    def reset(self) -> None:
        self.factor = None
        self.input_level = None
        self.output_level = None


class SGZPipeline:
    """Enhance low-light images with an :class:`EnhancementFactorEstimator` and the recurrent curve.

    Args:
        model: the EFE (its device and dtype are where and how the factor network runs; the full-resolution
            recurrence always computes in float32 and returns the input's dtype).
    """

    def __init__(self, model: EnhancementFactorEstimator):
        self.model = model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: Optional[Union[str, os.PathLike]] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "SGZPipeline":
        """Load weights: ``None`` = the shipped ``lora_weights/sgz_lowlight.safetensors``; a file (official ``.pth``
        or our ``.safetensors``); a folder containing ``sgz_lowlight.safetensors``; or the name of a shipped file
        (``"sgz_lowlight_v1.safetensors"``, the first weights, trained for plain SGZ), found from any directory.

        Raises ``FileNotFoundError`` naming the path, ``ValueError`` naming the file and expected keys/shapes.
        """
        if path is None:
            if not SHIPPED_WEIGHTS.is_file():
                raise FileNotFoundError(
                    f"shipped SGZ weights not found at {SHIPPED_WEIGHTS}; pass a checkpoint path, e.g. the "
                    "official Epoch99.pth"
                )
            path = SHIPPED_WEIGHTS
        path = shipped_or_given(path)
        if path.is_dir():
            path = path / SHIPPED_WEIGHTS.name
        return cls(load_sgz_weights(path)).to(device, dtype)

    def save_pretrained(self, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> Path:
        """Write the weights as safetensors (atomic). ``path``: a file, or a folder (gets ``sgz_lowlight.safetensors``)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / SHIPPED_WEIGHTS.name
        return save_sgz_weights(self.model, path, metadata)

    def to(self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None):
        """Move the factor network (in place) and return ``self``. ``dtype``: float32, bfloat16 or float16."""
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"dtype: expected a floating dtype such as torch.float32, got {dtype}")
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def new_video_state() -> SGZVideoState:
        """A fresh state for ``video_state=``: smoothing then continues across calls (chunks of one video)."""
        return SGZVideoState()

    # ------------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def __call__(
        self,
        images: Any,
        downscale: int = DOWNSCALE.default,
        recurrences: int = RECURRENCES.default,
        strength: float = STRENGTH.default,
        temporal_smoothing: float = TEMPORAL_SMOOTHING.default,
        return_factor: bool = False,
        video_state: Optional[SGZVideoState] = None,
        denoise: float = DENOISE.default,
        auto_exposure: float = AUTO_EXPOSURE.default,
    ):
        """Enhance ``images``.

        SGZ v2 (the defaults) adds to the paper's model and curve an automatic exposure and highlight shoulder on
        the low-resolution factor (:mod:`.exposure`) and a noise filter driven by the curve's local gain
        (:mod:`.denoise`); ``denoise=0, auto_exposure=0`` (:data:`.options.PLAIN_SGZ`) is plain SGZ, as before.

        Args:
            images: PIL image or list of them, numpy uint8/uint16/float ``HxW[x3|x4]`` or ``NxHxWx3``, or a torch
                float tensor ``[B, 3, H, W]`` in 0..1 (see :mod:`..media.image_convert`). A list of PIL images of
                different sizes is processed image by image.
            downscale: integer 1..64; the factor network runs at ``round(H/s) x round(W/s)``; 12 as in the paper,
                1 = full size.
            recurrences: number of curve applications, 0..16 (8 in the paper); more = brighter.
            strength: exposure control, 0..4, multiplies the factor ``x_r`` (clamped to -1..1 so the curve stays
                monotone in 0..1): 0 = identity, 1 = the model, > 1 brighter, < 1 gentler.
            temporal_smoothing: 0..0.99: video deflicker over the batch taken as consecutive frames; 0 = off.
                The low-resolution factor is averaged (``s_t = a * s_{t-1} + (1 - a) * x_r``) and each frame's
                factor is then scaled (within bounds) so that its output's mean brightness follows the same
                running average of the output brightness; scene cuts restart both (see :func:`_deflicker`).
            return_factor: also return the applied factor at full resolution, of the same kind as the output
                (mapped to 0..1 as ``(x_r + 1) / 2`` for PIL/numpy; raw -1..1 for torch).
            video_state: from :meth:`new_video_state`, carries smoothing across calls.
            denoise: 0..4, strength of the gain-driven noise filter after the curve; 0 = off.
            auto_exposure: 0..1, how much of the automatic exposure fit (and highlight shoulder) is applied before
                ``strength``; 0 = off (the model's own factor).
        Returns:
            The enhanced images, same kind/size/dtype as the input; or ``(images, factor)``.
        Raises:
            ValueError naming the parameter and its range (:mod:`.options`) when an option is out of range, and
            ``images: ...`` when float images hold NaN/inf or values outside 0..1 (as :class:`SCUFPipeline`).
        """
        check_sgz_options(
            downscale=downscale,
            recurrences=recurrences,
            strength=strength,
            temporal_smoothing=temporal_smoothing,
            denoise=denoise,
            auto_exposure=auto_exposure,
        )
        if isinstance(images, (list, tuple)) and len({getattr(im, "size", None) for im in images}) > 1:
            state = video_state if video_state is not None else self.new_video_state()
            results = [
                self(im, downscale, recurrences, strength, temporal_smoothing, return_factor, state, denoise,
                     auto_exposure)
                for im in images
            ]
            if return_factor:
                return [r[0] for r in results], [r[1] for r in results]
            return results

        # Float values (finite, 0..1) are checked inside the full-resolution pass, not in a pass of their own.
        batch, restore = to_tensor_batch(images, keep_uint8=True, check_values=False)
        batch = batch.to(self.device)
        filtered = denoise > 0.0 and recurrences > 0
        noise_sigma = None
        with _serial_if_small(batch, downscale) as frame_threads:
            # small: the image on the factor's grid, the factor network's input, used by v2's steps too. The noise
            # estimate needs only the input: it runs beside the factor network when threads share the work.
            factor, small, noise_sigma = _estimate_factors(
                self.model, batch, downscale, frame_threads, auto_exposure > 0.0 or denoise > 0.0, filtered)
            factor = factor.float()
            if auto_exposure > 0.0:
                # Fitted for the model's own curve length: recurrences, like strength, stays the user's override.
                factor, _ = fit_exposure(small, factor, RECURRENCES.default, auto_exposure)
                factor = highlight_shoulder(small, factor, auto_exposure)
            if temporal_smoothing == 0.0:
                if strength != 1.0:
                    factor = factor.mul_(strength).clamp_(-1.0, 1.0)
            else:
                factor = _deflicker(batch, factor, strength, recurrences, temporal_smoothing, video_state)
        out_dtype = torch.uint8 if batch.dtype == torch.uint8 else None
        if filtered:
            # Low-resolution torch ops at one thread (see single_torch_thread): even the check below (~40K values
            # at 1080p) is above torch's parallel grain and took ~24 ms at 2 threads on a loaded machine.
            with single_torch_thread(batch.device.type == "cpu"):
                # Per image: an image whose factor is zero (nothing to lift, e.g. a bright one) is left as it is,
                # whatever else is in its batch (the filter is near, not exactly, the identity at gain 1).
                lifted = factor.flatten(1).abs().amax(dim=1) > 0
                if bool(lifted.any()):
                    gain = curve_gain(small, factor, recurrences)
                    if noise_sigma is None:
                        noise_sigma = estimate_noise_sigma(batch)
        if filtered and bool(lifted.all()):
            # Curve and filter in one go (on the CPU no enhanced float frame is stored; quantising the curve's
            # output to uint8 before filtering would move the result by more than a level: the filter's slopes
            # amplify the rounding).
            output = enhance_denoised(batch, factor, recurrences, gain, noise_sigma, denoise, what="images")
        elif filtered and bool(lifted.any()):
            # A mixed batch (rare): each image as it would go on its own.
            output = torch.cat([
                enhance_denoised(batch[i:i + 1], factor[i:i + 1], recurrences, gain[i:i + 1],
                                 noise_sigma[i:i + 1], denoise, what="images")
                if lifted[i] else
                enhance(batch[i:i + 1], factor[i:i + 1], recurrences, out_dtype=out_dtype, what="images")
                for i in range(batch.shape[0])])
        else:
            output = enhance(batch, factor, recurrences, out_dtype=out_dtype, what="images")
        output = restore(output)
        if not return_factor:
            return output
        full = upsample_factor(factor, batch.shape[-2:])
        if batch.dtype == torch.uint8 or not isinstance(images, torch.Tensor):
            return output, restore((full + 1.0) * 0.5, plain=True)
        return output, restore(full, plain=True)


# Below this many low-resolution pixels per frame the factor network (and the deflicker) runs with one torch thread:
# its ops are too small to gain from OpenMP, and OpenMP barriers stall for whole scheduler slices when other
# processes load the CPU (a batch of 8 video frames at 2 threads: 3x slower than 1 thread, measured under load).
# The caller's threads then share the work instead (frames of a batch, or bands of rows of one frame: see
# _estimate_factors), handed out one piece at a time by kernel.run_chunks.
_SERIAL_EFE_PIXELS = 256 * 256
# Bands of rows per thread for one frame's factor network. Each band recomputes the network's receptive radius
# (7 low-resolution rows) on both sides, so more bands cost more work: 1920x1080 (90 low-resolution rows) in 2
# bands does 16 % more, in 4 bands 47 % more. One band per thread was the fastest at 2 threads, both on its own and
# with a core-burning neighbour (1080p, 2 threads / 1 thread: 0.76 vs 0.94 with 2 bands per thread).
_EFE_BANDS_PER_THREAD = 1
# A band has at least this many receptive radii of rows (28 at the shipped network: frames from about 640x480 at
# downscale 12 stay whole). A smaller network call gains less from a second thread than the caller loses when it
# has to wait for a helper the scheduler has stopped (a scheduler slice, several ms, when other processes load
# the cores).
_EFE_MIN_BAND_RADII = 4


@contextlib.contextmanager
def _serial_if_small(batch: torch.Tensor, downscale: int):
    """Set torch to one thread for the block when the frames are small at low resolution; yields the number of
    threads to share the work among (the caller's torch setting then, 1 otherwise)."""
    height, width = lowres_size(*batch.shape[-2:], downscale)
    threads = torch.get_num_threads()
    serial = batch.device.type == "cpu" and threads > 1 and height * width <= _SERIAL_EFE_PIXELS
    if serial:
        torch.set_num_threads(1)
    try:
        yield threads if serial else 1
    finally:
        if serial:
            torch.set_num_threads(threads)


def _one_torch_thread() -> None:
    """Keep torch at one thread on a pool thread: torch latches its thread count per thread when a thread first
    uses it, so a pool thread that started while the host ran at N threads would open OpenMP teams of its own.
    Called only inside a piece of :func:`.kernel.run_chunks`, so it happens before the caller restores its setting
    (torch's default for threads created later is then the caller's again)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _estimate_factors(model, batch: torch.Tensor, downscale: int, threads: int, want_lowres: bool = False,
                      want_noise: bool = False):
    """:func:`estimate_factor_lowres` of the batch, shared among up to ``threads`` threads: a batch frame by frame,
    one frame in bands of rows (each with the network's receptive radius of context on both sides, so the result
    is the whole frame's, within float rounding: oneDNN may sum in another order for another shape). torch ops
    release the GIL; pieces are handed out one at a time (:func:`.kernel.run_chunks`), so a thread the CPU does not
    run leaves its pieces to the others.

    Returns ``(factor, lowres, noise_sigma)``: ``lowres``, the batch resized for the network, when
    ``want_lowres`` (else None); ``noise_sigma`` (:func:`.denoise.estimate_noise_sigma`) computed as one more
    piece beside the network when ``want_noise`` and threads share the work, else None (the caller computes it
    when needed).
    """
    size = lowres_size(*batch.shape[-2:], downscale)
    radius = getattr(model, "receptive_radius", None)
    if threads <= 1:
        pieces = []
    elif batch.shape[0] > 1 or radius is None:
        pieces = [(i, 0, size[0]) for i in range(batch.shape[0])]
    elif not kernel.sharing_pays():
        # Recent shared calls got one core's worth of CPU (a busy neighbour): bands would only add their overlap.
        pieces = []
    else:
        bands = max(1, min(_EFE_BANDS_PER_THREAD * threads, size[0] // max(1, _EFE_MIN_BAND_RADII * radius)))
        edges = [round(i * size[0] / bands) for i in range(bands + 1)]
        pieces = [(0, first, stop) for first, stop in zip(edges, edges[1:])]
    if len(pieces) <= 1:  # one thread, or one frame too small to cut: nothing to share
        lowres = downsample_bilinear(batch, size) if want_lowres else None
        return estimate_factor_lowres(model, batch, downscale, lowres=lowres), lowres, None
    factors, lowres, noise = [None] * len(pieces), [None] * len(pieces), []

    def estimate(i: int) -> None:
        _one_torch_thread()
        if i == len(pieces):
            noise.append(estimate_noise_sigma(batch))
            return
        frame, first, stop = pieces[i]
        context = radius or 0
        top, bottom = max(0, first - context), min(size[0], stop + context)
        with torch.no_grad():  # grad mode is per thread
            small = downsample_bilinear(batch[frame : frame + 1], size, rows=(top, bottom))
            factors[i] = estimate_factor_lowres(model, batch[frame : frame + 1], downscale, lowres=small)[
                :, :, first - top : stop - top]
        if want_lowres:
            lowres[i] = small[:, :, first - top : stop - top]

    # The caller's thread takes pieces too, and it may be in inference mode: the results are joined here, on it.
    run_chunks(len(pieces) + want_noise, estimate, threads)
    join = 0 if batch.shape[0] > 1 else 2
    factor = torch.cat(factors, dim=join)
    return factor, torch.cat(lowres, dim=join) if want_lowres else None, noise[0] if noise else None


# Deflicker bounds. A frame whose input brightness differs from its running level by more than this factor (either
# way) is a scene cut: smoothing restarts there instead of fading over from the previous shot.
_SCENE_CUT_RATIO = 2.0
# The stabiliser moves a frame's output brightness at most this factor away from what the smoothed factor gives, so a
# real brightness change that is no cut (a light switched on, a pan into a brighter street) is followed within a
# few frames instead of being held back.
_MAX_CORRECTION = 1.25
# It moves the brightness by scaling the frame's factor by a gain k (the same scaling as ``strength``, so the curve
# stays inside 0..1 and nothing clips). log brightness is smooth and nearly linear in log k over the small range
# needed, so it is evaluated at a few log-spaced gains and interpolated (extrapolated linearly up to the bounds).
_GAINS = (2.0 ** -0.5, 2.0 ** -0.25, 1.0, 2.0 ** 0.25, 2.0 ** 0.5)
_GAIN_BOUNDS = (0.5, 2.0)
# Brightness is measured on a point sample of the frame, every n-th pixel of every n-th row with n chosen for about
# this many pixels: it costs the same whatever the frame size, and its own frame-to-frame noise stays small. On
# night_street.mp4 the EFE's input (1/144 of the pixels) tracks the output's brightness changes too coarsely (its
# error is 40% of the unsmoothed flicker); this sample's error is under 10%. Fresh per-pixel sensor noise still
# moves its mean a little more than the whole frame's (see the README, "Temporal smoothing, measured").
_SAMPLE_PIXELS = 1 << 15
_EPSILON = 1.0 / 255.0  # keeps logs of black frames finite


def _deflicker(
    batch: torch.Tensor,
    factor: torch.Tensor,
    strength: float,
    recurrences: int,
    amount: float,
    state: Optional[SGZVideoState],
) -> torch.Tensor:
    """Temporal smoothing of a batch of consecutive frames, continuing ``state``; returns the factor to apply.

    Smoothing the factor alone does not stop flicker: changes of the footage's own brightness (auto exposure,
    flickering lights, camera motion) go through the curve amplified. So, per frame ``t``:

    1. scene cut if the input's mean brightness (on a point sample of ~32K pixels) leaves ``[1/2, 2]`` x its
       running level;
    2. factor EMA ``s_t = a * s_{t-1} + (1 - a) * x_r(t)`` (restarted at cuts), then ``strength``;
    3. the output's mean brightness ``m_t(k)`` is predicted by running the curve on that sample, for the factor
       scaled by candidate gains ``k``; the target is the running level ``L_t = a * L_{t-1} + (1 - a) *
       log m_t(1)`` (restarted at cuts), clamped to ``m_t(1) x [1/1.25, 1.25]``; ``k`` is interpolated so that
       ``log m_t(k)`` hits it (all in log brightness, so the correction is relative).

    ``batch``: ``[B, 3, H, W]`` float 0..1 or uint8; ``factor``: ``[B, 3, h, w]`` float32 raw EFE output.
    Returns ``[B, 3, h, w]`` in -1..1. On a steady shot ``k`` stays 1 and the output is the factor-smoothed one.
    """
    count = factor.shape[0]
    state = state if state is not None else SGZVideoState()
    if state.factor is not None and (state.factor.shape != factor.shape[1:] or state.factor.device != factor.device):
        state.reset()  # another size (or device): a new shot, start over
    sample = _brightness_sample(batch)
    if batch.is_floating_point():  # bad values must not reach the state; enhance() checks every pixel later
        check_unit_range(sample, "images")
    input_logs = sample.mean(dim=(1, 2, 3)).add_(_EPSILON).log_().tolist()
    cuts = []
    for value in input_logs:
        cut = state.input_level is None or abs(value - state.input_level) > math.log(_SCENE_CUT_RATIO)
        state.input_level = value if cut else amount * state.input_level + (1.0 - amount) * value
        cuts.append(cut)

    smoothed = torch.empty_like(factor)
    previous = state.factor
    for i in range(count):
        previous = factor[i] if cuts[i] or previous is None else torch.lerp(factor[i], previous, amount)
        smoothed[i] = previous
    state.factor = previous.clone()
    if strength != 1.0:
        smoothed.mul_(strength).clamp_(-1.0, 1.0)

    # Level at gain 1 on the whole sample; its response to the gain (smooth) on a sixteenth of it.
    sample_factor = upsample_factor(smoothed, sample.shape[-2:])
    level = _predicted_log_brightness(sample, sample_factor, recurrences)  # [B, 1]
    predicted = _predicted_log_brightness(sample[..., ::4, ::4], sample_factor[..., ::4, ::4], recurrences, _GAINS)
    predicted = predicted - predicted[:, _GAINS.index(1.0), None] + level  # [B, len(_GAINS)]
    log_gains = [math.log(gain) for gain in _GAINS]
    low, high = (math.log(bound) for bound in _GAIN_BOUNDS)
    limit = math.log(_MAX_CORRECTION)
    scale = []
    for i, logs in enumerate(predicted.tolist()):
        current = logs[_GAINS.index(1.0)]
        if cuts[i] or state.output_level is None:
            state.output_level = current
        else:
            state.output_level = amount * state.output_level + (1.0 - amount) * current
        target = min(max(state.output_level, current - limit), current + limit)
        if target == current:
            scale.append(1.0)
        else:
            scale.append(math.exp(min(max(_interpolate(target, logs, log_gains), low), high)))
    return smoothed.mul_(torch.tensor(scale, device=factor.device).view(-1, 1, 1, 1)).clamp_(-1.0, 1.0)


def _brightness_sample(batch: torch.Tensor) -> torch.Tensor:
    """Every n-th pixel of every n-th row of ``batch`` ``[B, 3, H, W]`` (about ``_SAMPLE_PIXELS`` of them), as
    float32 0..1 ``[B, 3, H / n, W / n]``; reads only the sampled rows."""
    step = max(1, math.ceil(math.sqrt(batch.shape[2] * batch.shape[3] / _SAMPLE_PIXELS)))
    first = step // 2
    if batch.stride(1) == 1:  # channels-last (e.g. numpy frames): gathering whole pixels is about 2x faster
        sample = batch.permute(0, 2, 3, 1)[:, first::step, first::step].float().permute(0, 3, 1, 2)
    else:
        sample = batch[:, :, first::step, first::step].float()
    return sample.div_(255.0) if batch.dtype == torch.uint8 else sample


def _predicted_log_brightness(
    image: torch.Tensor, factor: torch.Tensor, recurrences: int, gains: tuple = (1.0,)
) -> torch.Tensor:
    """``log(mean(curve(image, clamp(k * factor))) + eps)`` for each frame and each gain ``k``.

    ``image``, ``factor``: ``[B, 3, h, w]``, a low-resolution sample of the frame and the factor on the same grid.
    Returns ``[B, len(gains)]``. Runs at low resolution: it costs a few small passes, not a full-resolution one.
    """
    f = (factor.flatten(1).unsqueeze(1) * torch.tensor(gains, device=factor.device).view(1, -1, 1)).clamp_(-1.0, 1.0)
    x = apply_recurrence_reference(image.flatten(1).unsqueeze(1), f, recurrences)  # [B, K, N]
    return x.mean(dim=2).add_(_EPSILON).log_()


def _interpolate(target: float, values: list, positions: list) -> float:
    """Position where the piecewise-linear curve through ``(positions, values)`` reaches ``target``, extended
    linearly beyond both ends.

    ``values`` rise with ``positions`` for a brightening factor. Where they do not (a darkening or zero factor, on
    which the gain has no or the opposite effect) the position of the middle sample (gain 1) is returned.
    """
    if not all(b > a for a, b in zip(values, values[1:])):
        return positions[len(positions) // 2]
    i = 1
    while i < len(values) - 1 and target > values[i]:
        i += 1
    weight = (target - values[i - 1]) / (values[i] - values[i - 1])
    return positions[i - 1] + weight * (positions[i] - positions[i - 1])
