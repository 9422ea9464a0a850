"""Tiled SCUF inference (pipelines/scuf/tiling.py, ``pipe.enable_vae_tiling``): coverage, exact blending, seams."""

import numpy as np
import pytest
import torch

from comfyui_lowlight.pipelines.scuf.options import check_tiling_options
from comfyui_lowlight.pipelines.scuf.tiling import tile_starts, tiled_enhance
from tiny_scuf import official_fixture, tiny_scuf  # noqa: F401  (session fixture: the tiny SCUF model)


@pytest.mark.parametrize("length,tile,overlap", [(64, 64, 16), (520, 512, 64), (2160, 512, 64), (3840, 1024, 128),
                                                 (200, 96, 0)])
def test_tile_starts_cover_with_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(s % 8 == 0 for s in starts)
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + tile - b >= overlap  # neighbours share at least `overlap` pixels


@pytest.mark.parametrize("tile,overlap", [(60, 8), (32, 8), (128, 64), (128, 12), (128, -8)])
def test_bad_tiling_parameters(tile, overlap):
    with pytest.raises(ValueError, match="tile_"):
        check_tiling_options(tile, overlap)


def test_blending_is_exact_for_a_pointwise_enhancer():
    """Weights are normalised: if every tile returns its input (mapped to 0..1), the blend is the input; tiles of a
    4K frame never exceed the tile size, and the sliced noise lines up with the tile."""
    x = torch.rand(1, 3, 2160, 3840) * 2 - 1
    noise = torch.randn(1, 4, 270, 480)
    seen = []

    def enhance(tile, context, tile_noise):
        seen.append(tuple(tile.shape[-2:]))
        assert tile_noise.shape[-2:] == (tile.shape[-2] // 8, tile.shape[-1] // 8)
        return tile * 0.5 + 0.5

    out = tiled_enhance(enhance, x, torch.zeros(1, 81, 32), noise, tile_size=1024, tile_overlap=128)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert max(h for h, _ in seen) <= 1024 and max(w for _, w in seen) <= 1024 and len(seen) == 3 * 5
    torch.testing.assert_close(out, x * 0.5 + 0.5, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- SCUF models


@pytest.fixture(scope="module")
def pipe(tiny_scuf):  # noqa: F811
    """The tiny SCUF model made in code (tests/tiny_scuf.py)."""
    pipe = tiny_scuf.pipeline()
    yield pipe
    pipe.disable_vae_tiling()


@pytest.fixture(scope="module")
def official_pipe():
    """The official tiny fixture (../shared/reference/scuf), for the seam checks.

    On a smooth gradient a random model paints texture that is coherent along columns; the seam check needs it below
    the step that unblended tiles leave. Measured (99th percentile of the column steps vs unblended seam): 0.059 vs
    0.061 on this model, 0.31 vs 0.08 on the tiny model of tests/tiny_scuf.py, where the check has no teeth.
    """
    pipe = official_fixture().pipeline()
    yield pipe
    pipe.disable_vae_tiling()


@pytest.fixture(scope="module")
def gradient() -> np.ndarray:
    """A smooth dark 192x320 RGB gradient, float32 0..1."""
    yy, xx = np.mgrid[0:192, 0:320].astype(np.float32)
    return np.stack([0.05 + 0.25 * xx / 320, 0.05 + 0.2 * yy / 192, 0.1 + 0.1 * (xx + yy) / 512], axis=2)


def _run(pipe, image, tiling=None, **kwargs):
    if tiling is None:
        pipe.disable_vae_tiling()
    else:
        pipe.enable_vae_tiling(*tiling)
    try:
        return pipe(image, output_type="np", **kwargs).images[0]
    finally:
        pipe.disable_vae_tiling()


def test_image_within_one_tile_is_unchanged(pipe, gradient):
    small = gradient[:96, :128]
    np.testing.assert_array_equal(_run(pipe, small, (128, 32)), _run(pipe, small))
    generator = [torch.Generator().manual_seed(3) for _ in range(2)]
    np.testing.assert_array_equal(
        _run(pipe, small, (128, 32), sample_latent=True, generator=generator[0]),
        _run(pipe, small, sample_latent=True, generator=generator[1]),
    )


def _seam_jumps(out: np.ndarray, starts: list[int], tile: int) -> tuple[float, float]:
    """(largest coherent column step at tile edges, 99th percentile of those steps at other columns).

    Coherent step of column c: ``max over channels |mean over rows (out[:, c + 1] - out[:, c])|``; a seam is a jump
    shared by all rows, whereas the random model's texture averages out over rows.
    """
    steps = np.abs(np.diff(out, axis=1).mean(axis=0)).max(axis=1)
    edges = {s - 1 for s in starts[1:]} | {s + tile - 1 for s in starts[:-1]}
    near = {c + d for c in edges for d in (-1, 0, 1)}
    others = np.array([v for c, v in enumerate(steps) if c not in near and 8 <= c < len(steps) - 8])
    return max(steps[c] for c in edges), float(np.percentile(others, 99))


def _tiled_close_to_untiled(pipe, gradient) -> np.ndarray:
    """The gradient tiled (128 px, overlap 32), checked against the whole-image pass.

    Per-tile GroupNorm statistics and attention make tiles differ from the whole-image pass; on a random model that
    is a visible but smooth change (measured mean 0.066 on the tiny model, 0.067 on the official fixture); trained
    models differ less.
    """
    untiled = _run(pipe, gradient)
    tiled = _run(pipe, gradient, (128, 32))
    assert tiled.shape == untiled.shape and np.isfinite(tiled).all()
    assert np.abs(tiled - untiled).mean() <= 0.1
    assert abs(float(tiled.mean()) - float(untiled.mean())) <= 0.03
    return tiled


def test_tiled_gradient_stays_close(pipe, gradient):
    _tiled_close_to_untiled(pipe, gradient)


def test_tiled_gradient_has_no_seams_and_stays_close(official_pipe, gradient):
    tiled = _tiled_close_to_untiled(official_pipe, gradient)
    seam, elsewhere = _seam_jumps(tiled, tile_starts(320, 128, 32), 128)
    assert seam <= elsewhere, f"step at tile edges {seam:.4f} > 99th percentile elsewhere {elsewhere:.4f}"


def test_seam_check_detects_unblended_tiles(official_pipe, gradient):
    """The check above has teeth: two abutting 128-px tiles without overlap (nothing to feather) leave a seam."""
    hard = _run(official_pipe, gradient[:, :256], (128, 0))
    seam, elsewhere = _seam_jumps(hard, tile_starts(256, 128, 0), 128)
    assert seam > elsewhere, f"unblended seam {seam:.4f} not above {elsewhere:.4f}"
