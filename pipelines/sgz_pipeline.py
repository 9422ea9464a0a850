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

from .image_convert import to_tensor_batch
from .sgz_model import (
    SHIPPED_WEIGHTS,
    EnhancementFactorEstimator,
    enhance,
    estimate_factor_lowres,
    load_sgz_weights,
    lowres_size,
    save_sgz_weights,
    upsample_factor,
)


@dataclass
class SGZVideoState:
    """Temporal-smoothing memory carried across ``pipe(...)`` calls of one video.

    ``factor``: the last smoothed low-resolution factor ``[3, h, w]`` (float32), or None before the first frame.
    It restarts by itself when the low-resolution size changes (another frame size or downscale).
    """

    factor: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.factor = None


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
        or our ``.safetensors``); or a folder containing ``sgz_lowlight.safetensors``.

        Raises ``FileNotFoundError`` naming the path, ``ValueError`` naming the file and expected keys/shapes.
        """
        if path is None:
            if not SHIPPED_WEIGHTS.is_file():
                raise FileNotFoundError(
                    f"shipped SGZ weights not found at {SHIPPED_WEIGHTS}; pass a checkpoint path, e.g. the "
                    "official Epoch99.pth"
                )
            path = SHIPPED_WEIGHTS
        path = Path(path)
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
        downscale: float = 12,
        recurrences: int = 8,
        strength: float = 1.0,
        temporal_smoothing: float = 0.0,
        return_factor: bool = False,
        video_state: Optional[SGZVideoState] = None,
    ):
        """Enhance ``images``.

        Args:
            images: PIL image or list of them, numpy uint8/uint16/float ``HxW[x3|x4]`` or ``NxHxWx3``, or a torch
                float tensor ``[B, 3, H, W]`` in 0..1 (see :mod:`.image_convert`). A list of PIL images of
                different sizes is processed image by image.
            downscale: the factor network runs at ``round(H/s) x round(W/s)``; 12 as in the paper, 1 = full size.
            recurrences: number of curve applications (8 in the paper); more = brighter.
            strength: exposure control, multiplies the factor ``x_r`` (clamped to -1..1 so the curve stays
                monotone in 0..1): 0 = identity, 1 = the model, > 1 brighter, < 1 gentler.
            temporal_smoothing: in [0, 1): exponential moving average of the low-resolution factor over the
                batch taken as consecutive frames (``s_t = a * s_{t-1} + (1 - a) * x_r``); 0 = off.
            return_factor: also return the applied factor at full resolution, of the same kind as the output
                (mapped to 0..1 as ``(x_r + 1) / 2`` for PIL/numpy; raw -1..1 for torch).
            video_state: from :meth:`new_video_state`, carries smoothing across calls.
        Returns:
            The enhanced images, same kind/size/dtype as the input; or ``(images, factor)``.
        """
        _check_options(downscale, recurrences, strength, temporal_smoothing)
        if isinstance(images, (list, tuple)) and len({getattr(im, "size", None) for im in images}) > 1:
            state = video_state if video_state is not None else self.new_video_state()
            results = [
                self(im, downscale, recurrences, strength, temporal_smoothing, return_factor, state) for im in images
            ]
            if return_factor:
                return [r[0] for r in results], [r[1] for r in results]
            return results

        batch, restore = to_tensor_batch(images, keep_uint8=True)
        batch = batch.to(self.device)
        with _serial_if_small(batch, downscale):
            factor = estimate_factor_lowres(self.model, batch, downscale).float()
        factor = _smooth(factor, temporal_smoothing, video_state)
        if strength != 1.0:
            factor = factor.mul_(strength).clamp_(-1.0, 1.0)
        out_dtype = torch.uint8 if batch.dtype == torch.uint8 else None
        output = restore(enhance(batch, factor, recurrences, out_dtype=out_dtype))
        if not return_factor:
            return output
        full = upsample_factor(factor, batch.shape[-2:])
        if batch.dtype == torch.uint8 or not isinstance(images, torch.Tensor):
            return output, restore((full + 1.0) * 0.5, plain=True)
        return output, restore(full, plain=True)


# Below this many low-resolution pixels per batch the factor network runs on one CPU thread: its ops are too small
# to gain from OpenMP, and OpenMP barriers stall for whole scheduler slices when other processes load the CPU.
_SERIAL_EFE_PIXELS = 256 * 256


@contextlib.contextmanager
def _serial_if_small(batch: torch.Tensor, downscale: float):
    height, width = lowres_size(*batch.shape[-2:], downscale)
    threads = torch.get_num_threads()
    serial = batch.device.type == "cpu" and threads > 1 and batch.shape[0] * height * width <= _SERIAL_EFE_PIXELS
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(threads)


def _check_options(downscale, recurrences, strength, temporal_smoothing) -> None:
    lowres_size(1, 1, downscale)  # validates downscale
    if not isinstance(recurrences, int) or isinstance(recurrences, bool) or recurrences < 0:
        raise ValueError(f"recurrences: expected an integer >= 0, got {recurrences!r}")
    if not (isinstance(strength, (int, float)) and math.isfinite(strength)):
        raise ValueError(f"strength: expected a finite number (0 = identity, 1 = model), got {strength!r}")
    if not (isinstance(temporal_smoothing, (int, float)) and 0.0 <= temporal_smoothing < 1.0):
        raise ValueError(f"temporal_smoothing: expected a number in [0, 1), got {temporal_smoothing!r}")


def _smooth(factor: torch.Tensor, amount: float, state: Optional[SGZVideoState]) -> torch.Tensor:
    """EMA of the low-resolution factor ``[B, 3, h, w]`` over the batch (consecutive frames), continuing ``state``."""
    if amount == 0.0 and state is None:
        return factor
    previous = state.factor if state is not None else None
    if previous is not None and (previous.shape != factor.shape[1:] or previous.device != factor.device):
        previous = None  # another size (or device): a new shot, start over
    smoothed = torch.empty_like(factor)
    for i in range(factor.shape[0]):
        previous = factor[i] if previous is None else torch.lerp(factor[i], previous, amount)
        smoothed[i] = previous
    if state is not None:
        state.factor = previous.clone()
    return smoothed
