"""Retinex decomposition I = R * L for SCUF's reflectance consistency (paper sec. 3.3).

Two decomposers with the same interface (``[B, 3, H, W]`` RGB in 0..1 -> reflectance ``[B, 3, H, W]`` and
illumination ``[B, 1, H, W]``, both in 0..1):

* :class:`DecomNet`: RetinexNet's decomposition network (Wei et al., BMVC 2018), the frozen network the official
  SCUF training uses for its target reflectance maps. Load the official weights (``decomp.pth``, keys
  ``DecomNet.net1_*``) with :func:`load_decomnet`; they are read with ``torch.load(weights_only=True)``.
* :class:`ClassicalRetinex`: a training-free fallback for when no DecomNet weights are given. The illumination is
  the LIME initial estimate (per-pixel channel maximum, Guo et al. 2017) smoothed by a Gaussian, floored at
  ``eps``; the reflectance is ``I / L`` clipped to 0..1. It is exactly invariant to a global brightness scale
  (``R(k * I) = R(I)`` while nothing clips), which is the property reflectance consistency relies on.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..weights_files import torch_load_weights

#: Prefix of every key in the official ``decomp.pth`` (the ``RetinexNet`` wrapper's attribute name).
DECOMNET_PREFIX = "DecomNet."


class DecomNet(nn.Module):
    """RetinexNet DecomNet: ``[B, 3, H, W]`` RGB in 0..1 -> (R ``[B, 3, H, W]``, L ``[B, 1, H, W]``), sigmoid outputs.

    The per-pixel channel maximum is prepended as a 4th input channel (max first, then R, G, B); a 9x9 conv
    (no activation), five 3x3 convs with ReLU and a 3x3 conv to 4 channels, all with replicate padding.
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3):
        super().__init__()
        self.net1_conv0 = nn.Conv2d(4, channels, kernel_size * 3, padding=4, padding_mode="replicate")
        layers = []
        for _ in range(5):
            layers += [nn.Conv2d(channels, channels, kernel_size, padding=1, padding_mode="replicate"), nn.ReLU()]
        self.net1_convs = nn.Sequential(*layers)
        self.net1_recon = nn.Conv2d(channels, 4, kernel_size, padding=1, padding_mode="replicate")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rgb(image)
        x = torch.cat([image.amax(dim=1, keepdim=True), image], dim=1)
        out = self.net1_recon(self.net1_convs(self.net1_conv0(x)))
        return torch.sigmoid(out[:, :3]), torch.sigmoid(out[:, 3:4])


class ClassicalRetinex(nn.Module):
    """Training-free decomposition: L = max(eps, Gaussian(max_c I, sigma)), R = clip(I / L, 0, 1).

    Args:
        sigma: Gaussian smoothing of the max-channel illumination in pixels (0 = none, then L = max_c I and
            R * L = I exactly wherever max_c I >= eps).
        eps: illumination floor (keeps R finite in black regions).
    """

    def __init__(self, sigma: float = 2.0, eps: float = 1e-3):
        super().__init__()
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a finite value >= 0, got {sigma}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.sigma = float(sigma)
        self.eps = float(eps)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rgb(image)
        illumination = image.amax(dim=1, keepdim=True)
        if self.sigma > 0:
            illumination = _gaussian_blur(illumination, self.sigma)
        illumination = illumination.clamp_min(self.eps)
        reflectance = (image / illumination).clamp(0.0, 1.0)
        return reflectance, illumination.clamp(0.0, 1.0)


def _check_rgb(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected [B, 3, H, W] RGB in 0..1, got shape {tuple(image.shape)}")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, H, W]`` with replicate borders (radius 3 sigma)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    # Replicate padding needs pad < size; for tiny images the kernel is cropped to what padding allows.
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="replicate")
    x = F.conv2d(x, kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="replicate")
    return F.conv2d(x, kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))


def load_decomnet(path, device=None) -> DecomNet:
    """The official RetinexNet ``decomp.pth`` -> frozen :class:`DecomNet` in eval mode.

    Accepts keys with or without the ``DecomNet.`` prefix. Raises ``ValueError`` naming the file if it is not a
    plain state dict (it is read with ``torch.load(weights_only=True)``) or does not fit the architecture.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"RetinexNet DecomNet weights not found: {path}")
    state = torch_load_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (RetinexNet DecomNet state dict)")
    state = {k[len(DECOMNET_PREFIX):] if k.startswith(DECOMNET_PREFIX) else k: v for k, v in state.items()}
    net = DecomNet()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: does not fit RetinexNet's DecomNet: {exc}") from exc
    net.requires_grad_(False).eval()
    return net.to(device) if device is not None else net


def build_decomposer(weights=None, device=None) -> nn.Module:
    """:func:`load_decomnet` when ``weights`` is given, :class:`ClassicalRetinex` otherwise (both frozen, eval)."""
    if weights is not None:
        return load_decomnet(weights, device)
    net = ClassicalRetinex().eval()
    return net.to(device) if device is not None else net
