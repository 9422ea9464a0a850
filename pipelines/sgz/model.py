"""SGZ (Semantic-Guided Zero-shot) low-light enhancement: the network and its full-resolution math.

Two parts, as in the paper (sections 3.1 and 3.2):

* the Enhancement Factor Estimator (EFE), a tiny depthwise-separable CNN that runs on the image downscaled by
  ``downscale`` (12 by default) and predicts a per-pixel, per-channel factor ``x_r`` in -1..1;
* the Recurrent Image Enhancement (RIE) ``x_t = x_{t-1} + x_r * (x_{t-1}^2 - x_{t-1})`` applied ``recurrences``
  times at full resolution, with ``x_r`` upsampled bilinearly (align_corners=True) to the image size.

The full-resolution part is memory-bound, so :func:`enhance` does the upsampling, all recurrences and the dtype
conversion in one pass: on the CPU one compiled kernel (:mod:`.kernel`, numba) per pixel value; elsewhere (CUDA,
MPS, half precision, or without numba) torch ops tile by tile (a few rows at a time, in cache), which is also the
reference the kernel is tested against. Both check float inputs (finite, 0..1) inside that pass.
:func:`apply_recurrence_reference` is the straightforward loop, kept for tests, benchmarks and autograd.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..media.atomic_files import atomic_output
from ..media.image_convert import RANGE_SLACK, check_unit_range
from ..weights_files import WeightsFileError, check_weight_tensors, open_safetensors, torch_load_weights
from . import kernel

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "lora_weights"
# The default: trained for the v2 pipeline (a fine-tune of V1_WEIGHTS; lora_weights/README.md has the recipe).
SHIPPED_WEIGHTS = SHIPPED_DIR / "sgz_lowlight.safetensors"
# The first shipped weights (trained for plain SGZ), kept so that plain SGZ can be reproduced as it was.
V1_WEIGHTS = SHIPPED_DIR / "sgz_lowlight_v1.safetensors"

# Values per tile of the fused pass (see _tile_rows).
_CPU_TILE_ELEMENTS = 1 << 17
_DEVICE_TILE_ELEMENTS = 1 << 22

PathLike = Union[str, os.PathLike]

PADDING_MODES = ("zeros", "replicate")


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv (with bias) followed by a 1x1 pointwise conv (with bias); the official ``CSDN_Tem``."""

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.depth_conv = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels, padding_mode=padding_mode
        )
        self.point_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class EnhancementFactorEstimator(nn.Module):
    """The EFE: 7 depthwise-separable blocks with U-Net-like concatenation skips and a tanh head.

    State-dict keys match the official checkpoint (``e_conv{1..7}.{depth,point}_conv.{weight,bias}``);
    with ``channels=32`` it has 10,561 parameters.

    ``padding_mode`` of the 3x3 convs: ``"zeros"`` as the official network and the shipped weights, or
    ``"replicate"`` (``lowlight train sgz --padding-mode replicate``). At 1/12 resolution the 7 stacked convs see the zero
    border up to ~80 full-resolution pixels into the image, and zero-padded weights brighten (and tint) a band
    along every edge.

    ``forward(x)``: ``[B, 3, h, w]`` image in 0..1 -> ``[B, 3, h, w]`` factor ``x_r`` in -1..1, at whatever
    resolution it is given (callers downscale first, see :func:`estimate_factor_lowres`).
    """

    def __init__(self, channels: int = 32, padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
        self.channels = channels
        self.padding_mode = padding_mode
        self.e_conv1 = DepthwiseSeparableConv(3, channels, padding_mode)
        self.e_conv2 = DepthwiseSeparableConv(channels, channels, padding_mode)
        self.e_conv3 = DepthwiseSeparableConv(channels, channels, padding_mode)
        self.e_conv4 = DepthwiseSeparableConv(channels, channels, padding_mode)
        self.e_conv5 = DepthwiseSeparableConv(channels * 2, channels, padding_mode)
        self.e_conv6 = DepthwiseSeparableConv(channels * 2, channels, padding_mode)
        self.e_conv7 = DepthwiseSeparableConv(channels * 2, 3, padding_mode)

    @property
    def receptive_radius(self) -> int:
        """Rows (and columns) of context each output pixel sees on either side: one per 3x3 conv on the longest
        path. An output row further than this from a band's cut edge is exactly what the whole image gives, so
        the network can run in overlapping bands of rows (see ``pipeline._estimate_factors``)."""
        return sum(conv.dilation[0] * (conv.kernel_size[0] - 1) // 2 for conv in self.modules()
                   if isinstance(conv, nn.Conv2d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.e_conv1(x))
        x2 = F.relu(self.e_conv2(x1))
        x3 = F.relu(self.e_conv3(x2))
        x4 = F.relu(self.e_conv4(x3))
        x5 = F.relu(self.e_conv5(torch.cat([x3, x4], dim=1)))
        x6 = F.relu(self.e_conv6(torch.cat([x2, x5], dim=1)))
        return torch.tanh(self.e_conv7(torch.cat([x1, x6], dim=1)))


def init_weights_for_training(model: EnhancementFactorEstimator, generator: Optional[torch.Generator] = None) -> None:
    """Initialise every conv weight from N(0, 0.02) as the official training code does (biases keep the default)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# Weights IO


def _expected_shapes(channels: int = 32) -> Dict[str, torch.Size]:
    return {k: v.shape for k, v in EnhancementFactorEstimator(channels).state_dict().items()}


def _describe_expected(expected: Dict[str, torch.Size]) -> str:
    return ", ".join(f"{k} {tuple(s)}" for k, s in expected.items())


def _infer_channels(state_dict: Dict[str, torch.Tensor]) -> int:
    weight = state_dict.get("e_conv1.point_conv.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim == 4 else 32


def shipped_or_given(path: PathLike) -> Path:
    """``path``, or the shipped file it names: a bare file name (``sgz_lowlight_v1.safetensors``) or
    ``lora_weights/NAME`` that does not exist where the caller runs resolves to ``lora_weights/NAME`` of the pack,
    so the shipped weights can be picked by name from any working directory. Anything else is returned unchanged
    (a missing file is then reported by the loader, under the name the caller gave)."""
    given = Path(path)
    if given.exists():
        return given
    parts = given.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == SHIPPED_DIR.name):
        shipped = SHIPPED_DIR / parts[-1]
        if shipped.is_file():
            return shipped
    return given


def load_sgz_weights(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> EnhancementFactorEstimator:
    """Load an EFE from the official ``.pth`` state dict or from our ``.safetensors``.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (never executing pickles); a ``module.`` prefix
    (DataParallel) is accepted. The conv padding mode comes from the safetensors metadata ``padding_mode``
    (``"zeros"`` when absent, and always for ``.pth``: the official network). Raises ``FileNotFoundError`` naming
    the path, or ``ValueError`` naming the file and the expected keys/shapes when the content does not match
    (``weights_files.WeightsFileError`` when the file is not valid, holds code, or has non-float/NaN/inf tensors).
    Returns a float32 model in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SGZ weights not found: {path}")
    padding_mode = "zeros"
    try:
        if path.suffix == ".safetensors":
            with open_safetensors(path, map_location) as f:
                state_dict = {key: f.get_tensor(key) for key in f.keys()}
                padding_mode = (f.metadata() or {}).get("padding_mode", "zeros")
        else:
            state_dict = torch_load_weights(path, map_location)
    except WeightsFileError as exc:  # the helpers' messages name the file; say what it was meant to be
        raise WeightsFileError(f"could not read SGZ weights: {exc}") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a state dict of tensors for the SGZ EFE")
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}

    channels = _infer_channels(state_dict)
    expected = _expected_shapes(channels)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(s)})"
        for k, s in expected.items()
        if k in state_dict and state_dict[k].shape != s
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if wrong:
            problems.append(f"wrong shapes {wrong}")
        raise ValueError(
            f"{path} is not an SGZ EFE checkpoint: {'; '.join(problems)}. "
            f"Expected exactly: {_describe_expected(expected)}"
        )
    check_weight_tensors(path, state_dict)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{path}: metadata padding_mode={padding_mode!r}, expected one of {PADDING_MODES}")
    model = EnhancementFactorEstimator(channels, padding_mode)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def save_sgz_weights(
    model: EnhancementFactorEstimator, path: PathLike, metadata: Optional[Dict[str, str]] = None
) -> Path:
    """Write the EFE weights as float32 safetensors, atomically (``atomic_files.atomic_output``).

    ``metadata``: optional ``dict[str, str]`` stored in the safetensors header (e.g. training data and steps);
    the model's ``padding_mode`` is always recorded there.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata: expected dict[str, str]")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={**(metadata or {}), "padding_mode": model.padding_mode})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Factor estimation (low resolution)


def _check_image(image: torch.Tensor, name: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected a tensor [B, 3, H, W], got {shape}")
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{name}: empty tensor {tuple(image.shape)}")


def lowres_size(height: int, width: int, downscale: float) -> tuple:
    """Size the EFE runs at: ``round(H / s) x round(W / s)``, at least 1x1 (exactly ``H/s x W/s`` when divisible)."""
    if not (isinstance(downscale, (int, float)) and math.isfinite(downscale) and downscale >= 1):
        raise ValueError(f"downscale: expected a number >= 1, got {downscale!r}")
    return max(1, int(round(height / downscale))), max(1, int(round(width / downscale)))


def estimate_factor_lowres(
    model: nn.Module, image: torch.Tensor, downscale: float = 12, *, lowres: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Run the EFE on the downscaled image.

    Args:
        model: the EFE (its parameters' dtype/device decide where and in which precision it runs).
        image: ``[B, 3, H, W]`` in 0..1, any float dtype (uint8 0..255 also accepted).
        downscale: the image is resized (bilinear, align_corners=False, like the official code) to
            :func:`lowres_size`; 1 means full resolution.
        lowres: that resized image if the caller has it already (:func:`downsample_bilinear` to
            :func:`lowres_size`, as SGZ v2's exposure and noise steps use it too): not computed again.
    Returns:
        ``[B, 3, h, w]`` factor ``x_r`` in -1..1, in the model's dtype.
    """
    _check_image(image)
    param = next(model.parameters())
    if lowres is None:
        x = downsample_bilinear(image.to(device=param.device), lowres_size(*image.shape[-2:], downscale))
    else:
        x = lowres.to(device=param.device)
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's CPU depthwise conv is ~2x faster in NHWC
    return model(x.to(param.dtype))


def _source_index(out_size: int, in_size: int, device: torch.device):
    """Neighbour indices and weight of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis."""
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5)
    src = src.clamp_(min=0)
    lower = src.floor().long().clamp_(max=in_size - 1)
    upper = (lower + 1).clamp_(max=in_size - 1)
    return lower, upper, (src - lower).float()


def downsample_bilinear(image: torch.Tensor, size: tuple, rows: Optional[tuple] = None) -> torch.Tensor:
    """``F.interpolate(image, size, mode="bilinear", align_corners=False)`` in float32, reading only the pixels used.

    Without antialiasing each output pixel reads 2x2 input pixels, so gathering those rows and columns first
    avoids converting the whole (possibly uint8, possibly huge) frame. ``image``: ``[B, 3, H, W]`` float 0..1 or
    uint8 0..255. ``rows``: ``(first, stop)`` to compute only those output rows (a band of the result, equal to
    the same rows of the whole). Returns ``[B, 3, *size]`` float32 0..1 (``stop - first`` rows with ``rows``).
    """
    first, stop = (0, size[0]) if rows is None else rows
    x = image
    for dim, out_size in ((2, size[0]), (3, size[1])):
        if x.shape[dim] == out_size:
            if dim == 2 and rows is not None:
                x = x[:, :, first:stop]
            continue
        lower, upper, weight = _source_index(out_size, x.shape[dim], x.device)
        if dim == 2:
            lower, upper, weight = lower[first:stop], upper[first:stop], weight[first:stop]
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        x = torch.lerp(x.index_select(dim, lower).float(), x.index_select(dim, upper).float(), weight.view(shape))
    x = x.float()
    return x / 255.0 if image.dtype == torch.uint8 else x


def upsample_factor(factor_lowres: torch.Tensor, size: tuple) -> torch.Tensor:
    """Bilinear upsampling with align_corners=True (the official ``UpsamplingBilinear2d``) to ``size = (H, W)``."""
    if tuple(factor_lowres.shape[-2:]) == tuple(size):
        return factor_lowres
    return F.interpolate(factor_lowres.float(), size=tuple(size), mode="bilinear", align_corners=True).to(
        factor_lowres.dtype
    )


def estimate_factor(model: nn.Module, image: torch.Tensor, downscale: float = 12) -> torch.Tensor:
    """Full-resolution factor: :func:`estimate_factor_lowres` then :func:`upsample_factor`. ``[B, 3, H, W]``, -1..1."""
    return upsample_factor(estimate_factor_lowres(model, image, downscale), image.shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Recurrent enhancement (full resolution)


def apply_recurrence_reference(image: torch.Tensor, factor: torch.Tensor, recurrences: int = 8) -> torch.Tensor:
    """The straightforward RIE loop ``x = x + factor * (x**2 - x)``, one pass per operation (autograd friendly).

    ``image``: ``[B, 3, H, W]`` in 0..1; ``factor``: broadcastable to it, in -1..1. Returns ``[B, 3, H, W]``.
    """
    x = image
    for _ in range(recurrences):
        x = x + factor * (torch.pow(x, 2) - x)
    return x


def _check_recurrences(recurrences: int) -> None:
    if not isinstance(recurrences, int) or isinstance(recurrences, bool) or recurrences < 0:
        raise ValueError(f"recurrences: expected an integer >= 0, got {recurrences!r}")


def _interpolation_tiles(out_size: int, in_size: int, tile_rows: int, device: torch.device):
    """Banded matrices of an align_corners=True bilinear resize along H, one per tile of ``tile_rows`` output rows.

    Returns ``(matrices [tiles, tile_rows, band], first_source_row [tiles])``: rows ``r0..r0+n`` of the resized
    factor are ``matrices[i, :n, :k] @ source[first[i] : first[i] + k]`` (one small matmul per tile instead of
    gather + gather + lerp). Rows sum to 1.
    """
    if out_size > 1 and in_size > 1:
        src = torch.arange(out_size, device=device, dtype=torch.float64) * ((in_size - 1) / (out_size - 1))
    else:
        src = torch.zeros(out_size, device=device, dtype=torch.float64)
    lower = src.floor().long().clamp_(0, in_size - 1)
    upper = (lower + 1).clamp_(max=in_size - 1)
    weight = (src - lower).float()
    rows = torch.arange(out_size, device=device)
    tile = rows // tile_rows
    first = lower[::tile_rows].clone()
    band = int((upper - first[tile]).max()) + 1
    matrices = torch.zeros(len(first), tile_rows, band, device=device)
    local = rows % tile_rows
    matrices.index_put_((tile, local, lower - first[tile]), 1.0 - weight, accumulate=True)
    matrices.index_put_((tile, local, upper - first[tile]), weight, accumulate=True)
    return matrices, first


def _fused_rows(
    image: torch.Tensor,
    factor_rows: Callable[[int, int, int, int, torch.Tensor, torch.Tensor], None],
    recurrences: int,
    out: torch.Tensor,
    rows: int,
    extrema: Optional[list] = None,
) -> torch.Tensor:
    """Shared tile loop: for each image and block of ``rows`` rows, build the factor tile, run all recurrences, store.

    Works in the memory layout of ``image``/``out`` (NCHW or channels-last): tiles are slices along H of the
    layout's own dims, so every buffer is contiguous. ``factor_rows(tile, b, r0, n, f, g)`` fills the factor tile
    ``f`` and ``g = 1 - f``. The recurrence is rewritten as ``x <- x * (g + f * x)`` (the same polynomial), so a
    step is 2 in-place ops; uint8 input is scaled while converting, uint8 output is scaled in the last step.
    ``extrema``: a list that receives each float input tile's ``torch.aminmax`` (read while the tile is in cache).

    Tiles run one after the other on the calling thread; on CPU each op of a tile is split over torch's intra-op
    threads (measured on 2 cores: faster than handing small tiles to Python worker threads, which contend for
    the GIL).
    """
    batch, _, height, width = image.shape
    channels_last = _is_channels_last(image, out)
    if channels_last:
        src, dst = image.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)  # [B, H, W, 3]

        def tile_of(t, b, r0, n):
            return t[b, r0 : r0 + n]
    else:
        src, dst = image, out

        def tile_of(t, b, r0, n):
            return t[b, :, r0 : r0 + n]

    tiles_per_image = -(-height // rows)
    direct = out.dtype == torch.float32  # compute straight in the output tensor
    from_uint8 = image.dtype == torch.uint8
    to_uint8 = out.dtype == torch.uint8
    # x * (g + f x) * 255 + 0.5, truncated by the uint8 copy = round half up (x >= 0 since |f| <= 1).
    half = torch.tensor(0.5, device=image.device)
    on_cpu = image.device.type == "cpu"

    shape = (rows, width, 3) if channels_last else (3, rows, width)
    buffers = [torch.empty(shape, device=image.device, dtype=torch.float32) for _ in range(4)]
    for b in range(batch):
        for i in range(tiles_per_image):
            r0 = i * rows
            n = min(rows, height - r0)
            views = buffers if n == rows else [buf[:n] if channels_last else buf[:, :n] for buf in buffers]
            f, g, t, x = views
            if direct:
                x = tile_of(dst, b, r0, n)
            x.copy_(tile_of(src, b, r0, n))
            if from_uint8:
                x.mul_(1.0 / 255.0)
            elif extrema is not None:
                extrema.append(torch.stack(torch.aminmax(x)))
            factor_rows(i, b, r0, n, f, g)
            for step in range(recurrences):
                torch.addcmul(g, f, x, out=t)
                if to_uint8 and step == recurrences - 1:
                    torch.addcmul(half, x, t, value=255.0, out=x)
                else:
                    x.mul_(t)
            if to_uint8:
                if recurrences == 0:
                    x.mul_(255.0).add_(0.5)
                if not from_uint8:  # float input may lie outside 0..1
                    x.clamp_(0.0, 255.0)
                if on_cpu:  # numpy's float -> uint8 cast is vectorised, torch's is ~5x slower
                    np.copyto(tile_of(dst, b, r0, n).numpy(), x.numpy(), casting="unsafe")
                    continue
            if not direct:
                tile_of(dst, b, r0, n).copy_(x)

    return out


def _tile_rows(image: torch.Tensor) -> int:
    # CPU: 4 float32 tiles of 2**17 values (2 MB) stay in cache and still split well over intra-op threads. GPUs
    # want big launches; tiles there only bound the float32 scratch buffers (4 x 16 MB).
    elements = _CPU_TILE_ELEMENTS if image.device.type == "cpu" else _DEVICE_TILE_ELEMENTS
    return max(1, min(image.shape[2], elements // (3 * image.shape[3])))


def _new_output(image: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return torch.empty_like(image, dtype=dtype or image.dtype)  # keeps the memory layout (NCHW / channels-last)


def _is_channels_last(image: torch.Tensor, out: torch.Tensor) -> bool:
    return image.stride(1) == 1 and out.stride(1) == 1


@torch.no_grad()
def _apply_recurrence_fused(image, factor, recurrences, out_dtype):
    out = _new_output(image, out_dtype)
    factor = factor.expand_as(image).clamp(-1.0, 1.0)
    if _is_channels_last(image, out):
        factor = factor.permute(0, 2, 3, 1)

        def factor_rows(i, b, r0, n, f, g):
            f.copy_(factor[b, r0 : r0 + n])
            torch.sub(1.0, f, out=g)
    else:

        def factor_rows(i, b, r0, n, f, g):
            f.copy_(factor[b, :, r0 : r0 + n])
            torch.sub(1.0, f, out=g)

    return _fused_rows(image, factor_rows, recurrences, out, _tile_rows(image))


def apply_recurrence(
    image: torch.Tensor, factor: torch.Tensor, recurrences: int = 8, out_dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """RIE at full resolution: ``recurrences`` times ``x = x + factor * (x^2 - x)``.

    Args:
        image: ``[B, 3, H, W]`` in 0..1 (float of any dtype, or uint8 0..255).
        factor: ``[B, 3, H, W]`` (or broadcastable) in -1..1.
        recurrences: number of steps (8 in the paper).
        out_dtype: output dtype (default: the image's; uint8 gives rounded 0..255).
    Returns:
        ``[B, 3, H, W]``. When autograd needs it (training), this is the reference loop and is differentiable;
        otherwise a fused, tiled, in-place pass computed in float32 (factor clamped to -1..1).
    """
    _check_image(image)
    _check_recurrences(recurrences)
    if torch.is_grad_enabled() and (image.requires_grad or factor.requires_grad):
        x = apply_recurrence_reference(image, factor, recurrences)
        return x if out_dtype is None else x.to(out_dtype)
    return _apply_recurrence_fused(image, factor.to(image.device), recurrences, out_dtype)


@torch.no_grad()
def enhance(
    image: torch.Tensor,
    factor_lowres: torch.Tensor,
    recurrences: int = 8,
    out_dtype: Optional[torch.dtype] = None,
    *,
    what: str = "image",
    use_kernel: bool = True,
) -> torch.Tensor:
    """Fused full-resolution pass: upsample ``factor_lowres`` (align_corners=True) and run the RIE.

    Equal (within float32 rounding) to
    ``apply_recurrence_reference(image, upsample_factor(factor_lowres, (H, W)), recurrences)`` but reads the image
    once and writes the output once: on the CPU with the compiled kernel of :mod:`.kernel` (uint8/float32/float64),
    otherwise with torch ops tile by tile (any device and dtype; the kernel's reference).

    Args:
        image: ``[B, 3, H, W]`` in 0..1 (float of any dtype, or uint8 0..255; NCHW or channels-last).
        factor_lowres: ``[B, 3, h, w]`` factor in -1..1 (clamped to it), e.g. from :func:`estimate_factor_lowres`.
        recurrences: number of RIE steps.
        out_dtype: output dtype (default: the image's; uint8 gives rounded 0..255). Same memory layout as image.
        what: the name used in input errors.
        use_kernel: ``False`` forces the torch implementation (tests and benchmarks compare the two).
    Returns:
        ``[B, 3, H, W]`` enhanced image.
    Raises:
        ValueError naming ``what`` when a float image has NaN/inf or values outside 0..1 (checked in the same pass).
    """
    _check_enhance_arguments(image, factor_lowres, recurrences)
    out_dtype = out_dtype or image.dtype
    if use_kernel and kernel.supports(image, out_dtype):
        out, outside = kernel.enhance_cpu(image, factor_lowres, recurrences, out_dtype)
    else:
        extrema = [] if image.is_floating_point() else None
        out = _enhance_tiles(image, factor_lowres, recurrences, out_dtype, extrema)
        outside = bool(extrema) and not _within_unit_range(torch.stack(extrema))
    if outside:
        check_unit_range(image, what)  # the error path: a second pass only to report the range found
    return out


def _within_unit_range(extrema: torch.Tensor) -> bool:
    # NaN compares false and inf is out of range: both fail.
    return bool(((extrema >= -RANGE_SLACK) & (extrema <= 1.0 + RANGE_SLACK)).all())


def _check_enhance_arguments(image, factor_lowres, recurrences) -> None:
    _check_image(image)
    _check_image(factor_lowres, "factor_lowres")
    _check_recurrences(recurrences)
    if factor_lowres.shape[0] != image.shape[0]:
        raise ValueError(
            f"factor_lowres: batch {factor_lowres.shape[0]} does not match the image batch {image.shape[0]}"
        )


def _enhance_tiles(image, factor_lowres, recurrences, out_dtype, extrema):
    height, width = image.shape[-2:]
    small_h = factor_lowres.shape[2]
    out = _new_output(image, out_dtype)
    channels_last = _is_channels_last(image, out)
    rows = _tile_rows(image)
    # Resize along W at low resolution (cheap); rows are interpolated tile by tile.
    wide = F.interpolate(
        factor_lowres.to(device=image.device, dtype=torch.float32).clamp(-1.0, 1.0),
        size=(small_h, width),
        mode="bilinear",
        align_corners=True,
    )
    if channels_last:
        wide = wide.permute(0, 2, 3, 1).reshape(wide.shape[0], small_h, width * 3)  # rows of [W * 3]

    if small_h == height:  # no vertical resize (downscale 1)

        def factor_rows(i, b, r0, n, f, g):
            f.view(wide[b].shape[:-2] + (n, -1)).copy_(wide[b].narrow(-2, r0, n))
            torch.sub(1.0, f, out=g)
    else:
        matrices, first = _interpolation_tiles(height, small_h, rows, image.device)
        first = first.tolist()

        def factor_rows(i, b, r0, n, f, g):
            k = min(matrices.shape[2], small_h - first[i])
            source = wide[b].narrow(-2, first[i], k)
            torch.matmul(matrices[i, :n, :k], source, out=f.view(source.shape[:-2] + (n, -1)))
            torch.sub(1.0, f, out=g)

    return _fused_rows(image, factor_rows, recurrences, out, rows, extrema)
