"""Illumination maps: the HSV value channel V = max(R, G, B) and its inverse 1 - V.

1 - V is SCUF's illumination-aware image prompt; both are useful masks on their own.
"""

import torch


def value_channel(image: torch.Tensor) -> torch.Tensor:
    """HSV value of an RGB image.

    Args:
        image: ``[B, 3, H, W]`` RGB in 0..1 (any float dtype).
    Returns:
        ``[B, 1, H, W]`` V = max over channels, same dtype and device.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image: expected [B, 3, H, W], got {tuple(image.shape)}")
    return image.amax(dim=1, keepdim=True)


def inverted_value_channel(image: torch.Tensor) -> torch.Tensor:
    """1 - V, bright where the image is dark. ``[B, 3, H, W]`` -> ``[B, 1, H, W]``."""
    return 1.0 - value_channel(image)
