"""Layout glue between ComfyUI's tensors and the pipelines' ``[B, 3, H, W]`` convention.

ComfyUI: IMAGE is ``[B, H, W, C]`` float 0..1 (C = 3, sometimes 4 or 1), MASK is ``[B, H, W]`` float 0..1.
The conversions are views where possible (a permuted IMAGE is a channels-last ``[B, 3, H, W]`` tensor).
"""

import torch


def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` -> ``[B, 3, H, W]`` float (alpha dropped, gray repeated), a view if possible.

    An empty batch (B = 0, e.g. from a filter or a folder loader that found nothing) is refused with a one-line
    message naming the input ``name``, instead of failing later inside the model or in ``torch.cat``.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected a ComfyUI IMAGE [B, H, W, C] with C in (1, 3, 4), got {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(
            f"{name}: the image batch is empty (shape {tuple(image.shape)}); connect a node that outputs at least "
            "one image (check the loader or filter before this node)"
        )
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    return image[..., :3].permute(0, 3, 1, 2).float()


def bchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` (C = 3, or 1 repeated to gray RGB) -> ComfyUI IMAGE ``[B, H, W, 3]`` float32 on the CPU."""
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    return tensor.permute(0, 2, 3, 1).float().cpu().contiguous()


def b1hw_to_mask(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` -> ComfyUI MASK ``[B, H, W]`` float32 on the CPU."""
    return tensor[:, 0].float().cpu().contiguous()
