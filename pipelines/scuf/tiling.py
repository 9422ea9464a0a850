"""Tiled SCUF inference for large images: bounded memory, no visible seams.

Why the whole one-step pass is tiled, not only the VAE: SCUF's decoder consumes encoder skip activations of the
same pixels, so diffusers' ``AutoencoderKL.tiled_encode``/``tiled_decode`` (which blend latents / decoded tiles
independently) would drop or misalign the skips; and the UNet's self-attention at the finest level is quadratic in
the number of latent pixels (a 4K image has 130 k tokens there), so the UNet must be tiled too. Each tile runs
encoder -> UNet -> decoder with its own skips; the text and image-prompt conditioning (CLIP embedding of the 1 - V
map of the *whole* image) is computed once and shared, so every tile is steered the same way; with
``sample_latent=True`` the posterior noise is drawn once for the whole latent and sliced, so results do not depend
on the tiling. Overlapping tiles are blended with separable linear ramps ("feathering") that go to ~0 at a tile's
inner edges, so the blend is continuous across tile borders.

What tiling changes: GroupNorm statistics and attention are computed per tile instead of over the whole image, so
tiled output differs slightly from untiled output (less with larger tiles); the feathering hides the transitions.
"""

from __future__ import annotations

from typing import Callable

import torch

from .options import check_tiling_options

#: Default tile size in pixels (SD-Turbo's native 512) and overlap between neighbouring tiles.
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 64
#: Tile offsets and sizes are multiples of the VAE factor so each tile maps to whole latent pixels.
_LATENT_FACTOR = 8


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile_size`` covering ``0..length`` with at least ``overlap`` shared pixels.

    ``length`` and the returned offsets are multiples of 8; the last tile ends exactly at ``length`` (it may overlap
    its neighbour by more than ``overlap``). One tile at 0 if ``length <= tile_size``.
    """
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = -(-(length - tile_size) // stride) + 1
    return [i * stride for i in range(count - 1)] + [length - tile_size]


def _ramp(size: int, start: int, starts: list[int], tile_size: int) -> torch.Tensor:
    """1-D blend weight ``[size]`` of the tile at ``start``: linear ramps over the parts shared with neighbours.

    A ramp rises from ``1 / (n + 1)`` to 1 over the ``n`` pixels shared with the previous tile (and falls likewise
    towards the next tile); image borders get weight 1. Weights never reach 0, so normalising by their sum is safe.
    """
    weight = torch.ones(size, dtype=torch.float32)
    index = starts.index(start)
    if index > 0:
        shared = starts[index - 1] + tile_size - start
        weight[:shared] = torch.arange(1, shared + 1, dtype=torch.float32) / (shared + 1)
    if index < len(starts) - 1:
        shared = start + tile_size - starts[index + 1]
        weight[size - shared:] = torch.minimum(
            weight[size - shared:], torch.arange(shared, 0, -1, dtype=torch.float32) / (shared + 1)
        )
    return weight


def tiled_enhance(
    enhance: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    context: torch.Tensor,
    noise: torch.Tensor | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
) -> torch.Tensor:
    """Run ``enhance`` on overlapping tiles of ``x`` and blend the results.

    Args:
        enhance: one full pass ``(x_tile [B, 3, h, w] in -1..1, context, noise_tile | None) -> [B, 3, h, w]``
            float32 in 0..1 (``SCUFPipeline._enhance``).
        x: ``[B, 3, H, W]`` network input in -1..1, H and W multiples of 8.
        context: ``[B, T, D]`` UNet conditioning shared by all tiles.
        noise: ``[B, C, H / 8, W / 8]`` latent noise for sampled latents (sliced per tile), or None.
        tile_size, tile_overlap: pixels, multiples of 8 (bounds: ``options.TILE_SIZE``/``TILE_OVERLAP``).
    Returns:
        ``[B, 3, H, W]`` float32 in 0..1 on the CPU (the accumulation buffers live there so that device memory only
        holds one tile).
    """
    check_tiling_options(tile_size, tile_overlap)
    b, _, height, width = x.shape
    if height % _LATENT_FACTOR or width % _LATENT_FACTOR:
        raise ValueError(f"x: height and width must be multiples of {_LATENT_FACTOR}, got {height}x{width}")
    rows = tile_starts(height, tile_size, tile_overlap)
    cols = tile_starts(width, tile_size, tile_overlap)
    if len(rows) == 1 and len(cols) == 1:
        return enhance(x, context, noise).float().cpu()
    out = torch.zeros(b, 3, height, width, dtype=torch.float32)
    total_weight = torch.zeros(1, 1, height, width, dtype=torch.float32)
    for top in rows:
        h = min(tile_size, height)
        row_weight = _ramp(h, top, rows, tile_size)
        for left in cols:
            w = min(tile_size, width)
            weight = row_weight[:, None] * _ramp(w, left, cols, tile_size)[None, :]
            tile_noise = None
            if noise is not None:
                f = _LATENT_FACTOR
                tile_noise = noise[:, :, top // f: (top + h) // f, left // f: (left + w) // f]
            result = enhance(x[:, :, top: top + h, left: left + w], context, tile_noise).float().cpu()
            out[:, :, top: top + h, left: left + w] += result * weight
            total_weight[:, :, top: top + h, left: left + w] += weight
    return out / total_weight
