"""Non-reference losses of SGZ (Zheng & Gupta, WACV 2022, eq. 2-7) as pure tensor functions.

Conventions: ``low`` is the low-light input and ``enhanced`` the RIE output, both ``[B, 3, H, W]`` in 0..1
(``enhanced`` may leave that range slightly); ``factor`` is the EFE output x_r ``[B, 3, h, w]`` in -1..1 (at the
resolution the EFE ran at); ``logits`` are segmentation scores ``[B, K, h', w']``. Every loss returns a scalar
(0-dim) tensor averaged over the batch, differentiable with respect to ``enhanced``/``factor``/``logits``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SGZLossWeights",
    "brightness_loss",
    "focal_semantic_loss",
    "rgb_loss",
    "sgz_total_loss",
    "spatial_consistency_loss",
    "total_variation_loss",
]


def _check_image(name: str, x: torch.Tensor, channels: int = 3) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected [B, {channels}, H, W], got {tuple(x.shape)}")


def _region_means(x: torch.Tensor, region: int) -> torch.Tensor:
    """Channel mean pooled over non-overlapping ``region`` x ``region`` cells: [B, C, H, W] -> [B, 1, H/r, W/r].

    A region larger than the image shrinks to the image so tiny inputs still give one cell; rows/columns that
    do not fill a whole cell are dropped (as ``AvgPool2d`` does).
    """
    region = max(1, min(region, x.shape[-2], x.shape[-1]))
    return F.avg_pool2d(x.mean(dim=1, keepdim=True), region)


def spatial_consistency_loss(
    enhanced: torch.Tensor, low: torch.Tensor, region: int = 4, diagonal_weight: float = 0.5
) -> torch.Tensor:
    """L_spa (eq. 2): keep the contrast between neighbouring regions.

    Y and I are the means of ``region`` x ``region`` cells of ``enhanced`` and ``low``. For each cell i and each
    neighbour j inside the image, ``(|Y_i - Y_j| - |I_i - I_j|)^2`` is summed, the 4 adjacent neighbours with
    weight 1 and the 4 diagonal ones with ``diagonal_weight``; the sum is averaged over cells (and the batch).
    Cells on the border simply have fewer neighbours (no zero padding).

    Args:
        enhanced, low: ``[B, 3, H, W]``, same shape.
    Returns:
        scalar; 0 when ``enhanced`` equals ``low`` (or any shift of it by a constant).
    """
    _check_image("enhanced", enhanced)
    _check_image("low", low)
    if enhanced.shape != low.shape:
        raise ValueError(f"enhanced {tuple(enhanced.shape)} and low {tuple(low.shape)} must have the same shape")
    y = _region_means(enhanced, region)
    i = _region_means(low, region)
    cells = y.shape[0] * y.shape[-2] * y.shape[-1]

    def pair_term(dy: int, dx: int) -> torch.Tensor:
        # Each unordered pair (cell, neighbour) appears twice in eq. 2 (once from each side), hence the 2.
        h, w = y.shape[-2], y.shape[-1]
        if dy >= h or abs(dx) >= w:
            return y.new_zeros(())
        ys, ye = slice(0, h - dy), slice(dy, h)
        xs, xe = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        d = (y[..., ys, xs] - y[..., ye, xe]).abs() - (i[..., ys, xs] - i[..., ye, xe]).abs()
        return 2.0 * d.square().sum()

    adjacent = pair_term(0, 1) + pair_term(1, 0)
    diagonal = pair_term(1, 1) + pair_term(1, -1)
    return (adjacent + diagonal_weight * diagonal) / cells


def rgb_loss(enhanced: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_rgb (eq. 3): Charbonnier distance between the image-wide channel means, summed over (R,G), (R,B), (G,B).

    Args:
        enhanced: ``[B, 3, H, W]``.
    Returns:
        scalar ``mean_b sum_pairs sqrt((Y^i - Y^j)^2 + eps^2)``; its minimum ``3 * eps`` is reached by gray images.
    """
    _check_image("enhanced", enhanced)
    r, g, b = enhanced.mean(dim=(-2, -1)).unbind(dim=1)
    pairs = torch.stack([r - g, r - b, g - b], dim=1)
    return torch.sqrt(pairs.square() + eps * eps).sum(dim=1).mean()


def brightness_loss(enhanced: torch.Tensor, exposure: float = 0.6, region: int = 16) -> torch.Tensor:
    """L_bri (eq. 4): mean L1 distance of the ``region`` x ``region`` cell means (over channels) to ``exposure``.

    The official code pools 16 x 16 cells for its exposure loss; eq. 4 leaves the size open.

    Args:
        enhanced: ``[B, 3, H, W]``.
    Returns:
        scalar; 0 when every cell has mean ``exposure``.
    """
    _check_image("enhanced", enhanced)
    return (_region_means(enhanced, region) - exposure).abs().mean()


def total_variation_loss(factor: torch.Tensor) -> torch.Tensor:
    """L_tv (eq. 5) on the enhancement factor, with SGZ's extra inter-channel term.

    ``(1 / CHW) * sum (d_x x)^2 + (d_y x)^2 + (d_c x)^2`` where ``d_c`` is the difference between consecutive
    channels (R-G, G-B), averaged over the batch.

    Args:
        factor: ``[B, C, h, w]`` x_r.
    Returns:
        scalar; 0 for a factor that is the same constant in every pixel and channel.
    """
    if factor.ndim != 4:
        raise ValueError(f"factor: expected [B, C, h, w], got {tuple(factor.shape)}")
    b, c, h, w = factor.shape
    dx = (factor[..., :, 1:] - factor[..., :, :-1]).square().sum()
    dy = (factor[..., 1:, :] - factor[..., :-1, :]).square().sum()
    dc = (factor[:, 1:] - factor[:, :-1]).square().sum()
    return (dx + dy + dc) / (b * c * h * w)


def focal_semantic_loss(logits: torch.Tensor, beta: float = 1.0, gamma: float = 2.0, eps: float = 1e-7) -> torch.Tensor:
    """L_sem (eq. 6): label-free focal loss on the segmentation net's own most likely class.

    p is the softmax probability of each pixel's arg-max class (the pseudo-label is taken without gradient,
    p keeps it); loss ``mean over pixels of -beta * (1 - p)^gamma * log p``.

    Args:
        logits: ``[B, K, h, w]`` raw class scores.
    Returns:
        scalar.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits: expected [B, K, h, w], got {tuple(logits.shape)}")
    probs = logits.float().softmax(dim=1)
    target = probs.detach().argmax(dim=1, keepdim=True)
    p = probs.gather(1, target).clamp(eps, 1.0 - eps)
    return (-beta * (1.0 - p).pow(gamma) * p.log()).mean()


@dataclass(frozen=True)
class SGZLossWeights:
    """Weights and constants of eq. 7 (the paper's values)."""

    spatial: float = 1.0
    rgb: float = 1.0
    brightness: float = 1.0
    tv: float = 1.0
    semantic: float = 0.1
    exposure: float = 0.6
    spatial_region: int = 4
    brightness_region: int = 16
    focal_beta: float = 1.0
    focal_gamma: float = 2.0


def sgz_total_loss(
    low: torch.Tensor,
    enhanced: torch.Tensor,
    factor: torch.Tensor,
    logits: torch.Tensor | None,
    weights: SGZLossWeights = SGZLossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_total (eq. 7) = weighted sum of the five losses.

    Args:
        low, enhanced: ``[B, 3, H, W]``; factor: ``[B, 3, h, w]``; logits: ``[B, K, h', w']`` of the frozen
            segmentation net on ``enhanced``, or None to leave L_sem out.
    Returns:
        (total scalar tensor, dict of the unweighted parts as floats: spa, rgb, bri, tv, sem, total).
    """
    parts = {
        "spa": spatial_consistency_loss(enhanced, low, weights.spatial_region),
        "rgb": rgb_loss(enhanced),
        "bri": brightness_loss(enhanced, weights.exposure, weights.brightness_region),
        "tv": total_variation_loss(factor),
    }
    total = (
        weights.spatial * parts["spa"]
        + weights.rgb * parts["rgb"]
        + weights.brightness * parts["bri"]
        + weights.tv * parts["tv"]
    )
    if logits is not None:
        parts["sem"] = focal_semantic_loss(logits, weights.focal_beta, weights.focal_gamma)
        total = total + weights.semantic * parts["sem"]
    values = {name: float(value.detach()) for name, value in parts.items()}
    values["total"] = float(total.detach())
    return total, values
