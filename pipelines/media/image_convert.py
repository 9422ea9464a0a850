"""In-memory conversions between user image containers and ``[B, 3, H, W]`` tensors: the one image processor of
both methods (diffusers' ``VaeImageProcessor`` in spirit: preprocess, run, postprocess).

One core decodes every container (:func:`_pil_to_array` for PIL modes, :func:`_array_scale` for dtypes,
:func:`_check_finite`); two front ends sit on it:

* :func:`to_tensor_batch` (SGZ): one ``[B, 3, H, W]`` tensor plus ``restore_fn``, which returns the caller's kind;
* :func:`split_images` + :func:`prepare_image` / :func:`postprocess_image` (SCUF): image by image (sizes may
  differ), optionally resized to a multiple of ``multiple`` and back, returned as ``output_type``;
  :func:`prepare_illumination` brings a user illumination map to the same grid.

Accepted inputs of :func:`to_tensor_batch`:

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
        raise ValueError(f"{what}: contains NaN or inf values; expected finite values in 0..1")


#: Float inputs may overshoot 0..1 by resampling noise; anything beyond this is a scaling mistake.
RANGE_SLACK = 1e-3


def check_unit_range(values, what: str) -> None:
    """Raise the clear error for float image values (array or tensor) that are NaN/inf or outside 0..1 (beyond
    :data:`RANGE_SLACK`), naming ``what`` and the range found."""
    _check_finite(values, what)
    low, high = float(values.min()), float(values.max())
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise ValueError(
            f"{what}: float images must be in 0..1, got {low:.4g}..{high:.4g} (pass uint8 for 0..255 data)"
        )


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


def to_tensor_batch(
    images: Any, keep_uint8: bool = False, check_values: bool = True
) -> Tuple[torch.Tensor, Callable[..., Any]]:
    """Convert user images to one ``[B, 3, H, W]`` tensor and return a function that converts back.

    Args:
        images: see the module docstring. All images of a list must have the same size.
        keep_uint8: return 8-bit inputs as a uint8 tensor (0..255, a channels-last view of the input, no copy),
            so a fused kernel can convert on the fly. Otherwise always float 0..1.
        check_values: reject float values that are NaN/inf (a full pass over the frame). ``False`` when the
            caller checks them itself where it costs nothing (SGZ's fused pass checks finite and range).
    Returns:
        ``(tensor, restore_fn)``: tensor ``[B, 3, H, W]`` float32 0..1 (torch inputs keep their float dtype and
        device; with ``keep_uint8`` maybe uint8 0..255); ``restore_fn(output, plain=False)`` takes a tensor of the
        same shape (float 0..1 or uint8 0..255) and returns the input's kind. ``plain=True`` skips the gray
        reduction and alpha (for factor maps).
    Raises:
        ValueError / TypeError naming what was expected (wrong shape, dtype, NaN/inf, mixed sizes).
    """
    if isinstance(images, torch.Tensor):
        return _from_torch(images, check_values)
    if isinstance(images, np.ndarray):
        return _from_numpy(images, keep_uint8, check_values)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(images, Image.Image):
        return _from_pil([images], single=True, keep_uint8=keep_uint8, check_values=check_values)
    if isinstance(images, (list, tuple)) and images and Image is not None and all(
        isinstance(im, Image.Image) for im in images
    ):
        return _from_pil(list(images), single=False, keep_uint8=keep_uint8, check_values=check_values)
    raise TypeError(
        "images: expected a PIL.Image, a list of PIL images, a numpy array (HxW, HxWx3, HxWx4, NxHxWx3) or a "
        f"torch tensor [B, 3, H, W]; got {type(images).__name__}"
    )


def _from_torch(tensor: torch.Tensor, check_values: bool):
    squeeze = tensor.ndim == 3
    batch = tensor.unsqueeze(0) if squeeze else tensor
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images: expected a torch tensor [B, 3, H, W] (or [3, H, W]), got {tuple(tensor.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"images: expected a float tensor in 0..1, got dtype {batch.dtype}")
    if min(batch.shape) == 0:
        raise ValueError(f"images: empty tensor {tuple(tensor.shape)}")
    if check_values:
        _check_finite(batch, "images")
    device, dtype = batch.device, batch.dtype

    def restore(output: torch.Tensor, plain: bool = False) -> torch.Tensor:
        output = _unit_float(output).to(device=device, dtype=dtype)
        return output[0] if squeeze else output

    return batch, restore


def _from_numpy(array: np.ndarray, keep_uint8: bool, check_values: bool):
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
    if scale == 1.0 and check_values:
        _check_finite(rgb, "images")
    return _finish(rgb, alpha, gray, dtype, keep_uint8, lambda nhwc: nhwc[0] if single else nhwc)


def _from_pil(images: list, single: bool, keep_uint8: bool, check_values: bool):
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
    if np.issubdtype(dtype, np.floating) and check_values:
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


# ------------------------------------------------------------------------- image by image (SCUF's front end)


def split_images(images) -> list:
    """A batch argument -> list of single images (PIL, ``HxW[xC]`` array, or ``[C, H, W]`` tensor); lists nest."""
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(split_images(item))
        return out
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        return list(images)
    return [images]


def to_unit_hwc(image, what: str) -> np.ndarray:
    """One image -> ``HxWx3`` array: uint8 as given (8-bit PIL/arrays/tensors), else float32 clipped to 0..1.

    Gray is repeated to RGB, alpha is dropped; uint16 (arrays, 16-bit PIL) is scaled to 0..1. Float values outside
    0..1 (beyond resampling noise) and NaN/inf are rejected, naming ``what``.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        array = _pil_to_array(image)[0]
    elif isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"{what}: expected a [C, H, W] or [B, C, H, W] tensor with C in 1/3/4, got "
                             f"{tuple(image.shape)}")
        image = image.detach().to("cpu")
        array = (image if image.dtype == torch.uint8 else image.float()).permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image[:, :, None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"{what}: expected an HxW or HxWxC array with C in 1/3/4, got {image.shape}")
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    array = array[:, :, :3]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    scale = _array_scale(array.dtype, what)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    array = array.astype(np.float32) / np.float32(scale) if scale != 1.0 else array.astype(np.float32)
    check_unit_range(array, what)
    return np.clip(array, 0.0, 1.0)


def resize_float(array: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """``HxWxC`` float32 -> ``size`` = (W, H) with PIL LANCZOS per channel (the filter of 8-bit images, in float)."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(array[:, :, c], mode="F").resize(size, Image.Resampling.LANCZOS))
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=2)


def prepare_image(image, what: str = "image", multiple: int = 1) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """One image -> (``[3, H', W']`` float32 in 0..1, original ``(H, W)``), ``H'``/``W'`` rounded up to ``multiple``.

    uint8 images are resized with PIL LANCZOS on uint8 (SCUF's official path), then ``/ 255``; float images with
    the same filter per channel in float. ``multiple=1`` never resizes.
    """
    from PIL import Image

    array = to_unit_hwc(image, what)
    h, w = array.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"{what}: empty image {array.shape}")
    size = (-(-w // multiple) * multiple, -(-h // multiple) * multiple)
    if size != (w, h):
        if array.dtype == np.uint8:
            array = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))
        else:
            array = np.clip(resize_float(array, size), 0.0, 1.0)
    tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)
    tensor = tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()
    return tensor, (h, w)


def prepare_illumination(
    illumination, size: Tuple[int, int], original_size: Tuple[int, int], what: str
) -> torch.Tensor:
    """A one-channel map (0..1; PIL, array, tensor) at the image's ``original_size`` or its prepared ``size``
    (both ``(H, W)``) -> ``[1, H, W]`` float32 at ``size``, resized like a float image."""
    from PIL import Image

    if isinstance(illumination, Image.Image):
        array = np.asarray(illumination.convert("L"), dtype=np.float32) / 255.0
    elif isinstance(illumination, torch.Tensor):
        array = illumination.detach().to("cpu").float().numpy()
    elif isinstance(illumination, np.ndarray):
        array = illumination.astype(np.float32) / (255.0 if illumination.dtype == np.uint8 else 1.0)
    else:
        raise TypeError(f"{what}: expected a PIL image, numpy array or tensor, got {type(illumination).__name__}")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a single-channel HxW map, got shape {array.shape}")
    _check_finite(array, what)
    if array.shape == tuple(original_size) and tuple(original_size) != tuple(size):
        array = resize_float(array[:, :, None], (size[1], size[0]))[:, :, 0]
    elif array.shape != tuple(size):
        raise ValueError(f"{what}: size {array.shape} matches neither the image {original_size} nor {size}")
    return torch.from_numpy(np.clip(array, 0.0, 1.0)).float()[None]


OUTPUT_TYPES = ("pil", "np", "pt")


def postprocess_image(output: torch.Tensor, size: Tuple[int, int], output_type: str):
    """``[3, H', W']`` float 0..1 on the CPU -> ``output_type`` at ``size`` = (H, W), resized back if needed.

    ``"pil"``: RGB, uint8 = floor(255 x) (torchvision's ToPILImage, SCUF's official output), resized on uint8;
    ``"np"``: float32 ``HxWx3``; ``"pt"``: float32 ``[3, H, W]``.
    """
    from PIL import Image

    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected 'pil', 'np' or 'pt', got {output_type!r}")
    h, w = size
    if output_type == "pil":
        u8 = output.mul(255).byte().permute(1, 2, 0).numpy()
        pil = Image.fromarray(u8)
        return pil if pil.size == (w, h) else pil.resize((w, h), Image.Resampling.LANCZOS)
    array = output.permute(1, 2, 0).numpy().astype(np.float32)
    if array.shape[:2] != (h, w):
        array = np.clip(resize_float(array, (w, h)), 0.0, 1.0)
    return array if output_type == "np" else torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
