"""In-memory conversions between user image containers and ``[B, 3, H, W]`` tensors (shared by SGZ and SCUF).

Accepted inputs (see :func:`to_tensor_batch`):

* ``PIL.Image.Image`` or a list/tuple of them (same size): RGB, gray (``L``, 16-bit ``I;16``/``I``), RGBA/LA/P with
  transparency (alpha kept aside and re-attached), CMYK and other modes (converted to RGB);
* ``numpy`` arrays ``HxW`` (gray), ``HxWx3``, ``HxWx4`` (alpha kept aside), ``NxHxWx3`` or ``NxHxWx4``, of dtype
  uint8 (0..255), uint16 (0..65535) or float (0..1);
* ``torch`` float tensors ``[B, 3, H, W]`` (or ``[3, H, W]``) in 0..1.

``restore_fn`` turns an output tensor back into the input's kind: same container, dtype, layout, gray stays gray
(luma), alpha re-attached.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

# ITU-R BT.601 luma, what PIL's convert("L") uses: gray inputs come back gray.
_LUMA = (0.299, 0.587, 0.114)


def _check_finite(array_or_tensor, what: str) -> None:
    finite = (
        bool(torch.isfinite(array_or_tensor).all())
        if isinstance(array_or_tensor, torch.Tensor)
        else bool(np.isfinite(array_or_tensor).all())
    )
    if not finite:
        raise ValueError(f"{what} contains NaN or inf values; expected finite values in 0..1")


def _pil_to_array(image) -> Tuple[np.ndarray, Optional[np.ndarray], bool]:
    """PIL image -> (HxWx3 array of uint8/uint16/float32, alpha HxW or None, was_gray)."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(image)
        gray = np.clip(gray, 0, 65535).astype(np.uint16) if gray.dtype != np.uint16 else gray
        return np.repeat(gray[..., None], 3, axis=2), None, True
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(gray[..., None], 3, axis=2), None, True
    if mode in ("1", "L"):
        gray = np.asarray(image.convert("L"))
        return np.repeat(gray[..., None], 3, axis=2), None, True
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), mode in ("LA", "La")
    if mode != "RGB":
        image = image.convert("RGB")  # CMYK, YCbCr, HSV, P without transparency, ...
    return np.asarray(image), None, False


def _array_scale(dtype: np.dtype, what: str) -> float:
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"{what}: unsupported dtype {dtype}; expected uint8, uint16 or float in 0..1")


def _quantize(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """``[N, H, W, C]`` tensor (float 0..1 or already uint8) -> numpy array of ``dtype``."""
    if tensor.dtype == torch.uint8 and dtype == np.uint8:
        return tensor.cpu().numpy()
    tensor = _unit_float(tensor).float()
    if np.issubdtype(dtype, np.floating):
        return tensor.cpu().numpy().astype(dtype, copy=False)
    scale = _array_scale(dtype, "output")
    return (tensor.clamp(0.0, 1.0) * scale).round_().cpu().numpy().astype(dtype)


def _to_gray(hwc: np.ndarray) -> np.ndarray:
    """``[..., 3]`` -> ``[...]`` luma in the same dtype."""
    luma = hwc[..., 0] * _LUMA[0] + hwc[..., 1] * _LUMA[1] + hwc[..., 2] * _LUMA[2]
    if np.issubdtype(hwc.dtype, np.integer):
        return np.clip(np.round(luma), 0, np.iinfo(hwc.dtype).max).astype(hwc.dtype)
    return luma.astype(hwc.dtype)


def _unit_float(tensor: torch.Tensor) -> torch.Tensor:
    """Bring a uint8 tensor to float 0..1; floats pass unchanged."""
    return tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor


def to_tensor_batch(images: Any, keep_uint8: bool = False) -> Tuple[torch.Tensor, Callable[..., Any]]:
    """Convert user images to one ``[B, 3, H, W]`` tensor and return a function that converts back.

    Args:
        images: see the module docstring. All images of a list must have the same size.
        keep_uint8: return 8-bit inputs as a uint8 tensor (0..255, a channels-last view of the input, no copy),
            so a fused kernel can convert on the fly. Otherwise always float 0..1.
    Returns:
        ``(tensor, restore_fn)``: tensor ``[B, 3, H, W]`` float32 0..1 (torch inputs keep their float dtype and
        device; with ``keep_uint8`` maybe uint8 0..255); ``restore_fn(output, plain=False)`` takes a tensor of the
        same shape (float 0..1 or uint8 0..255) and returns the input's kind. ``plain=True`` skips the gray
        reduction and alpha (for factor maps).
    Raises:
        ValueError / TypeError naming what was expected (wrong shape, dtype, NaN/inf, mixed sizes).
    """
    if isinstance(images, torch.Tensor):
        return _from_torch(images)
    if isinstance(images, np.ndarray):
        return _from_numpy(images, keep_uint8)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        return _from_pil([images], single=True, keep_uint8=keep_uint8)
    if isinstance(images, (list, tuple)) and images and Image is not None and all(
        isinstance(im, Image.Image) for im in images
    ):
        return _from_pil(list(images), single=False, keep_uint8=keep_uint8)
    raise TypeError(
        "images: expected a PIL.Image, a list of PIL images, a numpy array (HxW, HxWx3, HxWx4, NxHxWx3) or a "
        f"torch tensor [B, 3, H, W]; got {type(images).__name__}"
    )


def _from_torch(tensor: torch.Tensor):
    squeeze = tensor.ndim == 3
    batch = tensor.unsqueeze(0) if squeeze else tensor
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images: expected a torch tensor [B, 3, H, W] (or [3, H, W]), got {tuple(tensor.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"images: expected a float tensor in 0..1, got dtype {batch.dtype}")
    if min(batch.shape) == 0:
        raise ValueError(f"images: empty tensor {tuple(tensor.shape)}")
    _check_finite(batch, "images tensor")
    device, dtype = batch.device, batch.dtype

    def restore(output: torch.Tensor, plain: bool = False) -> torch.Tensor:
        output = _unit_float(output).to(device=device, dtype=dtype)
        return output[0] if squeeze else output

    return batch, restore


def _from_numpy(array: np.ndarray, keep_uint8: bool):
    shape = array.shape
    gray = array.ndim == 2
    single = array.ndim in (2, 3)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (3, 4) or min(array.shape) == 0:
        raise ValueError(f"images: expected a numpy array HxW, HxWx3, HxWx4 or NxHxWx3/4, got shape {shape}")
    scale = _array_scale(array.dtype, "images array")
    dtype = array.dtype
    alpha = array[..., 3].copy() if array.shape[-1] == 4 else None
    rgb = np.ascontiguousarray(array[..., :3])
    if scale == 1.0:
        _check_finite(rgb, "images array")
    return _finish(rgb, alpha, gray, dtype, keep_uint8, lambda nhwc: nhwc[0] if single else nhwc)


def _from_pil(images: list, single: bool, keep_uint8: bool):
    from PIL import Image

    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images: all PIL images of a batch must have the same size, got sizes {sorted(sizes)}")
    converted = [_pil_to_array(im) for im in images]
    dtypes = {a.dtype for a, _, _ in converted}
    if len(dtypes) > 1:  # mixed 8/16-bit: go through float
        converted = [(a.astype(np.float32) / _array_scale(a.dtype, "image"), al, g) for a, al, g in converted]
    rgb = np.stack([a for a, _, _ in converted])
    alphas = [al for _, al, _ in converted]
    grays = [g for _, _, g in converted]
    dtype = rgb.dtype
    if np.issubdtype(dtype, np.floating):
        _check_finite(rgb, "images")

    def to_pil(nhwc: np.ndarray, plain: bool):
        result = []
        for i, hwc in enumerate(nhwc):
            is_gray = grays[i] and not plain
            if hwc.dtype != np.uint8:  # PIL has no 16-bit RGB: 16-bit gray stays 16-bit, colour goes to 8 bits
                if is_gray and hwc.dtype == np.uint16:
                    result.append(Image.fromarray(_to_gray(hwc).astype(np.int32)).convert("I;16"))
                    continue
                if is_gray and hwc.dtype == np.float32:  # mode F stays F
                    result.append(Image.fromarray(_to_gray(hwc), mode="F"))
                    continue
                unit = hwc.astype(np.float32) / _array_scale(hwc.dtype, "image")
                hwc = np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
            if is_gray and (plain or alphas[i] is None):
                result.append(Image.fromarray(_to_gray(hwc), mode="L"))
            elif alphas[i] is not None and not plain:
                alpha = alphas[i]
                if alpha.dtype != np.uint8:
                    alpha = np.round(alpha.astype(np.float32) / _array_scale(alpha.dtype, "alpha") * 255).astype(
                        np.uint8
                    )
                if is_gray:
                    result.append(Image.fromarray(np.dstack([_to_gray(hwc), alpha]), mode="LA"))
                else:
                    result.append(Image.fromarray(np.dstack([hwc, alpha]), mode="RGBA"))
            else:
                result.append(Image.fromarray(np.ascontiguousarray(hwc), mode="RGB"))
        return result[0] if single else result

    return _finish(rgb, None, False, dtype, keep_uint8, None, pil=to_pil)


def _finish(rgb, alpha, gray, dtype, keep_uint8, unbatch, pil=None):
    """Shared tail: NHWC array -> channels-last ``[B, 3, H, W]`` tensor, plus the matching restore function."""
    with warnings.catch_warnings():
        # PIL arrays are read-only; the view is only ever read (outputs are new tensors).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2)  # channels-last view, no copy
    if not (keep_uint8 and dtype == np.uint8):
        scale = _array_scale(dtype, "images")
        tensor = tensor.float()
        if scale != 1.0:
            tensor.mul_(1.0 / scale)

    def restore(output: torch.Tensor, plain: bool = False):
        nhwc = _quantize(output.detach().permute(0, 2, 3, 1), dtype)
        if pil is not None:
            return pil(nhwc, plain)
        if not plain:
            if gray:
                nhwc = _to_gray(nhwc)
            elif alpha is not None:
                nhwc = np.concatenate([nhwc, alpha[..., None]], axis=-1)
        return unbatch(nhwc)

    return tensor, restore
