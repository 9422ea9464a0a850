"""SGZ v2 (issue 16): gain-driven noise filter, automatic exposure, highlight shoulder, and their faces.

Runs on the shipped weights, the bundled sample and synthetic images (no ``../shared``).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.cli import main
from comfyui_lowlight.nodes.sgz_nodes import SGZEnhance
from comfyui_lowlight.pipelines import SGZPipeline
from comfyui_lowlight.pipelines.sgz import denoise as sgz_denoise
from comfyui_lowlight.pipelines.sgz import exposure as sgz_exposure
from comfyui_lowlight.pipelines.sgz.model import (
    apply_recurrence_reference,
    downsample_bilinear,
    enhance,
    estimate_factor_lowres,
)
from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ, SGZ_OPTIONS
from media import SHIPPED_SGZ_WEIGHTS, sample_night


@pytest.fixture(scope="module")
def pipe():
    return SGZPipeline.from_pretrained()


@pytest.fixture(scope="module")
def night():
    return sample_night()


def _noisy_dark_card(seed=0, size=(96, 128), level=20.0, sigma=2.5, edge=True):
    """A flat dark card with sensor noise (and a vertical step edge), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    image = np.full(size + (3,), level)
    if edge:
        image[:, size[1] // 2 :] += 25.0
    image += rng.normal(0.0, sigma, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _noise(image: np.ndarray, columns: slice) -> float:
    """Pixel-to-pixel noise in a flat part (standard deviation of horizontal neighbour differences / sqrt 2),
    relative to its mean (so brightness does not matter; slow shading does not count)."""
    patch = image[8:-8, columns].astype(np.float64)
    return float(np.diff(patch, axis=1).std() / np.sqrt(2) / patch.mean())


def test_new_options_are_appended_after_the_old_widgets():
    # Saved ComfyUI workflows list widget values by position: the four old options keep their places.
    assert list(SGZ_OPTIONS) == ["recurrences", "downscale", "strength", "temporal_smoothing", "denoise",
                                 "auto_exposure"]
    inputs = SGZEnhance.INPUT_TYPES()
    node_inputs = [*inputs["required"], *inputs.get("optional", {})]
    assert node_inputs[-2:] == ["denoise", "auto_exposure"]
    assert SGZ_OPTIONS["denoise"].default > 0 and SGZ_OPTIONS["auto_exposure"].default == 1.0


def test_plain_settings_are_the_model_and_curve_alone(pipe, night):
    image = torch.from_numpy(night).permute(2, 0, 1)[None].float() / 255
    expected = enhance(image, estimate_factor_lowres(pipe.model, image, 12), 8)
    torch.testing.assert_close(pipe(image, **PLAIN_SGZ), expected, atol=1e-6, rtol=0)
    assert not torch.equal(pipe(image), expected)  # the defaults are v2


def test_curve_gain_is_the_slope_of_the_curve():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 5, 7, dtype=torch.float64) * 0.5
    factor = -torch.rand(1, 3, 5, 7, dtype=torch.float64)
    x.requires_grad_(True)
    apply_recurrence_reference(x, factor, 8).sum().backward()
    expected = x.grad.mean(dim=1, keepdim=True)
    torch.testing.assert_close(sgz_denoise.curve_gain(x.detach(), factor, 8).double(), expected)


def test_noise_estimate_finds_the_sensor_noise():
    for sigma in (1.5, 4.0):
        card = _noisy_dark_card(sigma=sigma, size=(200, 300), level=60.0, edge=False)
        estimate = float(sgz_denoise.estimate_noise_sigma(torch.from_numpy(card).permute(2, 0, 1)[None])[0]) * 255
        luma_sigma = sigma * np.sqrt(0.299**2 + 0.587**2 + 0.114**2)  # independent noise per channel
        assert abs(estimate - luma_sigma) < 0.15 * luma_sigma


def test_denoise_removes_amplified_noise_and_keeps_edges(pipe):
    card = _noisy_dark_card()
    plain = pipe(card, **PLAIN_SGZ)
    v2 = pipe(card, auto_exposure=0.0)
    # Same exposure; the flat halves get far less noise...
    assert abs(v2.mean() - plain.mean()) < 0.02 * plain.mean()
    for half in (slice(8, 56), slice(72, 120)):
        assert _noise(v2, half) < 0.5 * _noise(plain, half)
    # ...and the step edge keeps its height.
    step = lambda image: image[:, 72:120].mean() - image[:, 8:56].mean()  # noqa: E731
    assert step(v2) > 0.9 * step(plain)
    stronger = pipe(card, auto_exposure=0.0, denoise=3.0)
    assert _noise(stronger, slice(8, 56)) <= _noise(v2, slice(8, 56))


@pytest.mark.parametrize("use_kernel", [False, True])
def test_denoise_is_sized_for_at_most_the_capped_noise(use_kernel):
    # Heavier noise than the cap is filtered as if it were at the cap (smoothing all of it away would flatten
    # texture of the same contrast); below the cap the filter follows the estimate.
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, 48, 64), dtype=np.float32) * 0.3 + 0.2)
    gain = torch.full((1, 1, 6, 8), 6.0)
    cap = sgz_denoise._MAX_FILTERED_SIGMA

    def filtered(sigma):
        return sgz_denoise.gain_guided_denoise(image, gain, torch.tensor([sigma]), use_kernel=use_kernel)

    assert torch.equal(filtered(3.0 * cap), filtered(cap))
    assert not torch.equal(filtered(0.5 * cap), filtered(cap))
    assert not torch.equal(filtered(cap), image)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_denoise_keeps_fine_luma_detail_at_full_resolution(use_kernel):
    # 1-pixel lines every 8 pixels (odd and even columns alike), 3 noise standard deviations above a flat card
    # (left), a flat card (right): the filter on a subsample-2 grid (~11 px support) kept 30 % of the lines'
    # contrast; the 3x3 windows at full resolution keep 58 % and still take the flat card's noise to 0.35x.
    generator = torch.Generator().manual_seed(0)
    height, width, contrast, noise = 96, 128, 0.1, 8.0 / 255.0
    clean = torch.full((1, 3, height, width), 0.35)
    columns = torch.arange(width)
    lines = ((columns % 16 == 3) | (columns % 16 == 12)) & (columns < width // 2)
    clean[..., lines] += contrast
    noisy = (clean + torch.randn(1, 1, height, width, generator=generator) * noise).clamp(0.0, 1.0)
    # the curve lifted 8x an input with luma noise of 1 level: the noise above
    gain, sigma = torch.full((1, 1, 8, 11), 8.0), torch.tensor([1.0 / 255.0])
    luma = sgz_denoise.gain_guided_denoise(noisy, gain, sigma, use_kernel=use_kernel).mean(dim=1)[0, 8:-8]
    texture = luma[:, 8 : width // 2 - 8]
    texture_lines = lines[8 : width // 2 - 8]
    kept = (texture[:, texture_lines].mean() - texture[:, ~texture_lines].mean()) / contrast
    assert kept > 0.45
    flat = luma[:, width // 2 + 8 : -8]
    assert (flat - flat.mean()).std() < 0.5 * noise


def test_denoise_leaves_unamplified_images_alone(pipe, night):
    # strength 0 (the curve is the identity) and 0 recurrences return the input exactly, filter or not
    image = torch.from_numpy(night).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(pipe(image, strength=0.0, denoise=2.0), image)
    assert torch.equal(pipe(image, recurrences=0, denoise=2.0), image)


def test_auto_exposure_lifts_dark_photos_far_and_mid_dark_ones_little(pipe, night):
    dark = night
    mid = np.clip(night.astype(np.float64) * 4.0, 0, 255).astype(np.uint8)  # a moderately dark exposure
    plain_gain = [pipe(im, **PLAIN_SGZ).mean() / im.mean() for im in (dark, mid)]
    auto = [pipe(im, denoise=0.0) for im in (dark, mid)]
    auto_gain = [out.mean() / im.mean() for out, im in zip(auto, (dark, mid))]
    # plain SGZ lifts both about alike; v2 lifts the dark exposure much further than the mid-dark one
    assert auto_gain[0] / auto_gain[1] > 1.5 * plain_gain[0] / plain_gain[1]


def test_exposure_fit_reaches_the_target_key(pipe, night):
    for gain in (0.5, 1.0, 4.0):  # x0.5: too dark to reach the target within the scaling bound
        image = torch.from_numpy(np.clip(night * gain, 0, 255).astype(np.uint8)).permute(2, 0, 1)[None]
        factor = estimate_factor_lowres(pipe.model, image, 12)
        small = downsample_bilinear(image, tuple(factor.shape[-2:]))
        fitted, scale = sgz_exposure.fit_exposure(small, factor, 8)
        key_in = sgz_exposure._key(small.flatten(2)).exp()
        key_out = sgz_exposure._key(apply_recurrence_reference(small, fitted, 8).flatten(2)).exp()
        target = sgz_exposure._TARGET_KEY + sgz_exposure._TARGET_SLOPE * key_in
        if gain == 0.5:
            assert float(scale) == sgz_exposure._SCALE_BOUNDS[1] and key_out < target
        else:
            assert abs(float(key_out / target) - 1) < 0.02
        assert torch.equal(sgz_exposure.fit_exposure(small, factor, 8, amount=0.0)[0], factor)


def test_strength_and_recurrences_stay_overrides_with_auto_exposure(pipe, night):
    means = [pipe(night, strength=s).mean() for s in (0.5, 1.0, 1.5)]
    assert means == sorted(means) and means[0] < means[-1]
    partial = [pipe(night, denoise=0.0, auto_exposure=a).mean() for a in (0.0, 0.5, 1.0)]
    assert partial == sorted(partial) or partial == sorted(partial, reverse=True)


def test_highlight_shoulder_fades_the_factor_in_bright_regions_only():
    image = torch.zeros(1, 3, 8, 16)
    image[..., 8:] = 0.98  # a lit half
    factor = torch.full((1, 3, 8, 16), -0.5)
    out = sgz_exposure.highlight_shoulder(image, factor)
    assert torch.equal(out[..., :6], factor[..., :6])  # dark half (away from the border) untouched
    assert out[..., 9:].abs().max() < 1e-6  # bright half: no lift
    assert torch.equal(sgz_exposure.highlight_shoulder(image, factor, amount=0.0), factor)


def test_bright_regions_clip_less_than_plain(pipe, night):
    scene = night.astype(np.float64)
    scene[100:200, 100:300] = 210.0  # a lit sign
    scene = scene.astype(np.uint8)
    sign = lambda image: image[110:190, 110:290]  # noqa: E731
    clipped = lambda image: (sign(image).max(axis=-1) >= 254).mean()  # noqa: E731
    plain = pipe(scene, strength=1.5, **PLAIN_SGZ)
    assert clipped(plain) > 0.5  # plain SGZ burns the sign out
    assert clipped(pipe(scene, strength=1.5)) < 0.5 * clipped(plain)  # v2, even brighter overall
    assert clipped(pipe(scene)) < 0.01  # nor does the noise filter overshoot on the flat sign


def test_bad_new_options_raise_clear_errors(pipe):
    with pytest.raises(ValueError, match=r"denoise: expected a number in 0\.\.4"):
        pipe(torch.rand(1, 3, 8, 8), denoise=-1.0)
    with pytest.raises(ValueError, match=r"auto_exposure: expected a number in 0\.\.1"):
        pipe(torch.rand(1, 3, 8, 8), auto_exposure=1.5)


def test_video_with_v2_keeps_temporal_smoothing_across_chunks(pipe, night):
    crop = night[100:228, 150:310]
    gains = 1.0 + 0.1 * np.random.default_rng(1).standard_normal(9)
    frames = np.clip(crop[None].astype(np.float32) * gains[:, None, None, None].astype(np.float32), 0, 255)
    frames = frames.round().astype(np.uint8)
    whole = pipe(frames, temporal_smoothing=0.8)
    state = pipe.new_video_state()
    chunked = np.concatenate([pipe(frames[i : i + 4], temporal_smoothing=0.8, video_state=state)
                              for i in range(0, 9, 4)])
    assert np.array_equal(whole, chunked)
    flicker = lambda out: np.abs(np.diff(out.reshape(len(out), -1).mean(axis=1))).mean()  # noqa: E731
    assert flicker(whole) < 0.6 * flicker(pipe(frames))


def test_cli_flags_reach_the_pipeline(tmp_path, pipe, night):
    source = tmp_path / "night.png"
    Image.fromarray(night).save(source)
    outputs = {}
    for name, flags in {"v2": [], "plain": ["--denoise", "0", "--auto-exposure", "0"]}.items():
        target = tmp_path / f"{name}.png"
        code = main(["enhance", str(source), "-o", str(target), "--weights", str(SHIPPED_SGZ_WEIGHTS),
                     "--device", "cpu", *flags])
        assert code == 0
        outputs[name] = np.asarray(Image.open(target))
    assert np.array_equal(outputs["plain"], pipe(night, **PLAIN_SGZ))
    assert np.array_equal(outputs["v2"], pipe(night))
    with pytest.raises(SystemExit):
        main(["enhance", str(source), "-o", str(tmp_path / "x.png"), "--denoise", "5"])
