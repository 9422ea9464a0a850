"""SGZPipeline: input kinds, sizes, dtypes, exposure control, temporal smoothing, errors.

Behaviour tests run the shipped weights on the bundled night photo; only parity with the official code's golden
outputs needs ``../shared`` (skipped without it).
"""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.pipelines import SGZPipeline
from comfyui_lowlight.pipelines.sgz import pipeline as sgz_pipeline_module
from comfyui_lowlight.pipelines.media.image_convert import to_tensor_batch
from comfyui_lowlight.pipelines.sgz.model import (
    SHIPPED_WEIGHTS,
    V1_WEIGHTS,
    EnhancementFactorEstimator,
    init_weights_for_training,
    load_sgz_weights,
)
from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
from media import sample_night


@pytest.fixture(scope="module")
def pipe():
    """The shipped weights (the default of ``from_pretrained``): every behaviour test runs on a plain clone."""
    return SGZPipeline.from_pretrained()


@pytest.fixture(scope="module")
def official_pipe(shared_dir):
    """The official ``Epoch99.pth``: only for parity with the official code's golden outputs."""
    return SGZPipeline.from_pretrained(shared_dir / "reference" / "sgz" / "Epoch99.pth")


@pytest.fixture(scope="module")
def low_u8():
    """A crop of the bundled real night photo (statues under lamps, mean ~29/255), uint8 HxWx3, odd size on purpose."""
    return sample_night()[150:247, 180:311].copy()


@pytest.fixture(scope="module")
def golden(shared_dir):
    return dict(np.load(shared_dir / "reference" / "sgz" / "golden_official.npz"))


def test_numpy_uint8_matches_golden(official_pipe, golden):
    out, factor = official_pipe(golden["lol111_s12_input_u8"], return_factor=True, **PLAIN_SGZ)
    expected = np.round(np.clip(golden["lol111_s12_output"], 0, 1) * 255)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    assert np.abs(out.astype(np.float64) - expected).max() <= 1
    expected_factor = np.round((golden["lol111_s12_factor"] + 1) / 2 * 255)
    assert factor.dtype == np.uint8 and np.abs(factor.astype(np.float64) - expected_factor).max() <= 1


def test_torch_matches_golden_and_returns_raw_factor(official_pipe, golden):
    image = torch.from_numpy(golden["lol1_s1_input_u8"]).permute(2, 0, 1)[None].float() / 255.0
    out, factor = official_pipe(image, downscale=1, return_factor=True, **PLAIN_SGZ)
    assert out.dtype == torch.float32 and out.shape == image.shape
    assert (out - torch.from_numpy(golden["lol1_s1_output"]).permute(2, 0, 1)).abs().max() < 1e-4
    assert (factor - torch.from_numpy(golden["lol1_s1_factor"]).permute(2, 0, 1)).abs().max() < 1e-4
    assert factor.min() < 0  # raw -1..1, not remapped


def test_input_kinds_round_trip(pipe, low_u8):
    reference = pipe(low_u8)
    pil = pipe(Image.fromarray(low_u8))
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and np.array_equal(np.asarray(pil), reference)
    pils = pipe([Image.fromarray(low_u8)] * 2)
    assert isinstance(pils, list) and len(pils) == 2
    batch = pipe(np.stack([low_u8, low_u8[::-1].copy()]))
    assert batch.shape == (2, *low_u8.shape) and np.array_equal(batch[0], reference)
    single_tensor = pipe(torch.from_numpy(low_u8).permute(2, 0, 1).float() / 255)
    assert single_tensor.shape == (3, *low_u8.shape[:2])
    as_float = pipe(low_u8.astype(np.float32) / 255)
    assert as_float.dtype == np.float32 and np.abs(as_float * 255 - reference).max() <= 1
    as_16 = pipe(low_u8.astype(np.uint16) * 257)
    assert as_16.dtype == np.uint16 and np.abs(as_16 / 257.0 - reference).max() <= 1


def test_alpha_and_gray_are_kept(pipe, low_u8):
    alpha = np.arange(low_u8.shape[0] * low_u8.shape[1], dtype=np.uint8).reshape(low_u8.shape[:2])
    rgba = np.dstack([low_u8, alpha])
    out = pipe(rgba)
    assert out.shape == rgba.shape and np.array_equal(out[..., 3], alpha)
    assert np.array_equal(out[..., :3], pipe(low_u8))
    pil_rgba = pipe(Image.fromarray(rgba, "RGBA"))
    assert pil_rgba.mode == "RGBA" and np.array_equal(np.asarray(pil_rgba)[..., 3], alpha)
    gray = low_u8[..., 1]
    assert pipe(gray).shape == gray.shape
    pil_gray = pipe(Image.fromarray(gray, "L"))
    assert pil_gray.mode == "L" and pil_gray.size == (gray.shape[1], gray.shape[0])
    assert np.asarray(pil_gray).mean() > gray.mean() + 10  # brightened
    _, factor = pipe(Image.fromarray(gray, "L"), return_factor=True)
    assert factor.mode == "RGB"  # factor maps stay 3-channel


def test_list_of_different_sizes(pipe, low_u8):
    images = [Image.fromarray(low_u8), Image.fromarray(low_u8[:40, :51])]
    out, factors = pipe(images, return_factor=True)
    assert [im.size for im in out] == [im.size for im in images] == [im.size for im in factors]


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1), (3, 5), (11, 13), (25, 37)])
def test_tiny_and_odd_sizes(pipe, size):
    image = torch.rand(2, 3, *size)
    out = pipe(image)
    assert out.shape == image.shape and torch.isfinite(out).all()
    assert (pipe(image[:1]) - out[:1]).abs().max() < 1e-6  # batch items are independent


def test_an_image_with_nothing_to_lift_comes_out_the_same_in_any_batch(pipe):
    # A bright image gets a zero factor (the highlight shoulder); batched with a dark one it used to go through the
    # noise filter too (decided for the whole batch) and moved by up to 16 levels.
    generator = torch.Generator().manual_seed(0)
    bright = 0.9 + 0.1 * torch.rand(1, 3, 37, 53, generator=generator)
    dark = 0.08 * torch.rand(1, 3, 37, 53, generator=generator)
    batch = torch.cat([bright, dark])
    out, factor = pipe(batch, return_factor=True)
    assert factor[0].abs().max() == 0 and factor[1].abs().max() > 0
    assert torch.equal(out[0], bright[0]) and torch.equal(pipe(bright)[0], bright[0])
    assert (pipe(dark) - out[1:]).abs().max() < 1e-6
    as_u8 = (batch * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out_u8 = pipe(as_u8)
    assert (out_u8[0] == as_u8[0]).all() and (pipe(as_u8[1]) == out_u8[1]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_and_models(pipe, low_u8, dtype):
    image = torch.from_numpy(low_u8).permute(2, 0, 1)[None].float() / 255
    reference = pipe(image)
    out = pipe(image.to(dtype))
    assert out.dtype == dtype and out.shape == image.shape
    assert (out.float() - reference).abs().max() < 2e-2
    low_model = SGZPipeline.from_pretrained(dtype=dtype)
    assert low_model.dtype == dtype
    out = low_model(image)
    assert out.dtype == torch.float32 and (out - reference).abs().mean() < 2e-2


def test_large_image_full_size(pipe):
    # 6000 x 8000 uint8: memory and size handling of the whole path (factor at 500 x 667, fused tiles).
    image = np.full((6000, 8000, 3), 40, dtype=np.uint8)
    image[:, ::7] = 10
    out = pipe(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.mean() > image.mean()


def test_strength_is_an_exposure_control(pipe, low_u8):
    image = torch.from_numpy(low_u8).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(pipe(image, strength=0.0), image)
    assert torch.equal(pipe(image, recurrences=0), image)
    means = [pipe(image, strength=s).mean().item() for s in (0.25, 0.5, 1.0, 1.5, 2.0)]
    assert means == sorted(means) and means[0] < means[-1]
    by_recurrences = [pipe(image, recurrences=r).mean().item() for r in (2, 4, 8, 12)]
    assert by_recurrences == sorted(by_recurrences)
    bright = pipe(image, strength=4.0)
    assert bright.min() >= 0 and bright.max() <= 1 + 1e-6  # factor clamped: the curve stays inside 0..1


def _flicker_sequence(low_u8, frames=12):
    base = torch.from_numpy(low_u8).permute(2, 0, 1).float() / 255
    gains = torch.tensor([1.0, 1.6] * (frames // 2))
    return (base[None] * gains[:, None, None, None]).clamp(0, 1)


def _exposure_sequence(low_u8, gains) -> np.ndarray:
    """The night crop under a per-frame global exposure gain, uint8 N x H x W x 3 (as the CLI feeds video)."""
    frames = low_u8[None].astype(np.float32) * np.asarray(gains, np.float32)[:, None, None, None]
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def _brightness(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


def _flicker(frames: np.ndarray) -> float:
    """Mean absolute change of the per-frame mean brightness (0..255), as benchmarks/bench_flicker.py measures."""
    return float(np.abs(np.diff(_brightness(frames))).mean())


def test_temporal_smoothing_reduces_exposure_flicker(pipe, low_u8):
    gains = 1.0 + 0.1 * np.random.default_rng(0).standard_normal(30)  # +-10% exposure jitter per frame
    frames = _exposure_sequence(low_u8, gains)
    off = pipe(frames)
    flicker = {a: _flicker(pipe(frames, temporal_smoothing=a)) for a in (0.5, 0.8, 0.9)}
    assert flicker[0.5] < 0.7 * _flicker(off)
    assert flicker[0.9] < flicker[0.8] < flicker[0.5]
    assert flicker[0.8] < 0.4 * _flicker(off)
    smooth = pipe(frames, temporal_smoothing=0.8)
    assert np.array_equal(smooth[0], off[0])  # the first frame starts the averages: no correction
    # the overall level is kept (the correction only holds back frame-to-frame changes)
    assert abs(_brightness(smooth).mean() - _brightness(off).mean()) < 0.03 * _brightness(off).mean()


def test_temporal_smoothing_zero_is_exactly_off(pipe, low_u8):
    frames = _exposure_sequence(low_u8, [1.0, 1.2, 0.9])
    state = pipe.new_video_state()
    assert np.array_equal(pipe(frames, temporal_smoothing=0.0, video_state=state), pipe(frames))
    assert np.array_equal(pipe(frames, strength=1.5, temporal_smoothing=0.0), pipe(frames, strength=1.5))


def test_scene_cut_is_followed_at_once(pipe, low_u8):
    # dark shot, then a cut to a much brighter one: smoothing restarts on the first frame of the new shot
    frames = _exposure_sequence(low_u8, [0.6] * 6 + [2.5] * 6)
    smooth = pipe(frames, temporal_smoothing=0.9)
    assert np.array_equal(smooth[6:], pipe(frames[6:], temporal_smoothing=0.9))


def test_gradual_brightening_is_followed_within_a_few_frames(pipe, low_u8):
    # +50% in one step (no cut): held back at first, within 2% of the unsmoothed output after 12 frames at 0.8.
    # Without the automatic exposure, which by design evens out most of such a change by itself.
    frames = _exposure_sequence(low_u8, [1.0] * 4 + [1.5] * 16)
    off = _brightness(pipe(frames, auto_exposure=0.0))
    smooth = _brightness(pipe(frames, temporal_smoothing=0.8, auto_exposure=0.0))
    assert smooth[4] < off[4] - 1.0  # the jump is smoothed...
    assert smooth[4] > off[3]  # ...but followed, not frozen
    assert np.all(np.abs(smooth[16:] - off[16:]) < 0.02 * off[16:])


def test_video_state_carries_smoothing_across_calls(pipe, low_u8):
    frames = _flicker_sequence(low_u8)
    original = frames.clone()
    whole = pipe(frames, temporal_smoothing=0.7)
    assert torch.equal(frames, original)  # the input is never written to
    state = pipe.new_video_state()
    chunks = [pipe(frames[i : i + 5], temporal_smoothing=0.7, video_state=state) for i in range(0, 12, 5)]
    assert (torch.cat(chunks) - whole).abs().max() < 1e-6
    assert state.factor is not None and state.output_level is not None
    pipe(frames[:1, :, :40, :40], temporal_smoothing=0.7, video_state=state)  # other size: restarts, no error
    assert state.factor.shape[-2:] == (3, 3)
    jitter = _exposure_sequence(low_u8, 1.0 + 0.1 * np.random.default_rng(1).standard_normal(10))
    state = pipe.new_video_state()
    chunked = [pipe(jitter[i : i + 3], temporal_smoothing=0.8, video_state=state) for i in range(0, 10, 3)]
    chunked = np.concatenate(chunked)
    assert np.array_equal(chunked, pipe(jitter, temporal_smoothing=0.8))


def test_bad_inputs_raise_clear_errors(pipe):
    image = torch.rand(1, 3, 8, 8)
    image[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe(image)
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe(np.full((4, 4, 3), np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        pipe(torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="PIL.Image"):
        pipe("image.png")
    with pytest.raises(ValueError, match="temporal_smoothing"):
        pipe(torch.rand(1, 3, 8, 8), temporal_smoothing=1.0)
    with pytest.raises(ValueError, match="strength"):
        pipe(torch.rand(1, 3, 8, 8), strength=float("nan"))
    with pytest.raises(ValueError, match="same size"):
        to_tensor_batch([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])


def test_weights_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        SGZPipeline.from_pretrained(tmp_path / "missing.safetensors")
    assert SHIPPED_WEIGHTS.is_file()  # the repository ships them: the default needs no download
    assert isinstance(SGZPipeline.from_pretrained().model, EnhancementFactorEstimator)
    monkeypatch.setattr(sgz_pipeline_module, "SHIPPED_WEIGHTS", tmp_path / "gone" / "sgz_lowlight.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone" / "sgz_lowlight.safetensors"))):
        SGZPipeline.from_pretrained()


def _same_weights(a: EnhancementFactorEstimator, b: EnhancementFactorEstimator) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_shipped_files_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no lora_weights/ here
    first, default = load_sgz_weights(V1_WEIGHTS), load_sgz_weights(SHIPPED_WEIGHTS)
    assert not _same_weights(first, default)
    for name in ("sgz_lowlight_v1.safetensors", "lora_weights/sgz_lowlight_v1.safetensors"):
        assert _same_weights(SGZPipeline.from_pretrained(name).model, first), name
    assert _same_weights(SGZPipeline.from_pretrained("sgz_lowlight.safetensors").model, default)
    # a file of that name where the caller is wins over the shipped one
    own = EnhancementFactorEstimator()
    init_weights_for_training(own, torch.Generator().manual_seed(3))
    SGZPipeline(own).save_pretrained(tmp_path / "sgz_lowlight_v1.safetensors")
    assert _same_weights(SGZPipeline.from_pretrained("sgz_lowlight_v1.safetensors").model, own)
    # names the pack does not ship, and shipped names under another folder, stay errors naming what was given
    with pytest.raises(FileNotFoundError, match="sgz_lowlight_v9.safetensors"):
        SGZPipeline.from_pretrained("sgz_lowlight_v9.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(str(Path("other") / "sgz_lowlight.safetensors"))):
        SGZPipeline.from_pretrained(Path("other") / "sgz_lowlight.safetensors")


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = EnhancementFactorEstimator()
    init_weights_for_training(model)
    pipe = SGZPipeline(model)
    path = pipe.save_pretrained(tmp_path)
    assert path.name == "sgz_lowlight.safetensors"
    image = torch.rand(1, 3, 30, 40)
    assert torch.equal(SGZPipeline.from_pretrained(tmp_path)(image), pipe(image))
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"


def test_pipeline_does_not_import_diffusers():
    code = (
        "import sys, comfyui_lowlight.pipelines.sgz.pipeline as m; "
        "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "F", "RGBA", "LA", "P", "CMYK", "1"])
def test_pil_modes_round_trip_unchanged_at_strength_zero(pipe, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((6, 9, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        image = Image.fromarray((rng.random((6, 9)) * 65535).astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((6, 9)).astype(np.float32))
    else:
        image = rgb.convert(mode)
    out = pipe(image, strength=0.0)
    expected = image.convert("RGB") if mode in ("P", "CMYK") else image.convert("L") if mode == "1" else image
    assert out.size == image.size and out.mode == expected.mode
    assert np.allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-6 if mode == "F" else 0)


@pytest.mark.parametrize("options", [PLAIN_SGZ, {}, {"temporal_smoothing": 0.8}], ids=["plain", "v2", "video"])
def test_no_torch_op_forks_openmp_threads_on_the_cpu(pipe, options):
    """At 2 threads no torch op of a call works on enough values to fork OpenMP threads (torch's grain: 32768):
    everything parallel runs on the kernel's pool, where a thread the scheduler stops only slows its own chunks.
    An OpenMP team waits at its barrier for a stopped thread (a scheduler slice per op under load), and its idle
    threads spin (OMP_WAIT_POLICY): the SGZ call must not depend on either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    no_compute = {"lift_fresh", "permute", "detach", "empty_like", "empty", "alias", "view", "as_strided", "slice",
                  "unsqueeze", "expand", "select", "t"}
    forking = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            tensors = [a for a in (*args, result) if isinstance(a, torch.Tensor)]
            if torch.get_num_threads() > 1 and name not in no_compute and max(
                    (t.numel() for t in tensors), default=0) >= 32768:
                forking.append((name, [tuple(t.shape) for t in tensors]))
            return result

    frame = np.random.default_rng(8).integers(0, 90, (2, 1080, 1920, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Recorder():
            pipe(frame, **options)
            pipe(frame[:1], **options)
    finally:
        torch.set_num_threads(threads)
    assert forking == []


def test_thread_count_is_restored(pipe):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pipe(torch.rand(1, 3, 40, 60))  # small low-res input: the factor network runs serially meanwhile
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "images",
    [
        torch.rand(1, 3, 20, 30) * 255,  # 0..255 floats: a scaling mistake, used to return inf
        torch.rand(1, 3, 20, 30) - 0.5,  # negative values, used to return garbage
        np.random.default_rng(0).random((20, 30, 3)).astype(np.float32) * 255,
        Image.fromarray(np.random.default_rng(1).random((20, 30)).astype(np.float32) * 255, mode="F"),
    ],
    ids=["torch-0..255", "torch-negative", "numpy-0..255", "pil-F-0..255"],
)
@pytest.mark.parametrize("temporal_smoothing", [0.0, 0.8])
def test_float_input_out_of_range_gives_scufs_error(pipe, images, temporal_smoothing):
    """Issue 18 row 5: the same message as SCUFPipeline (``to_unit_hwc``), and no video state is touched."""
    from comfyui_lowlight.pipelines.media.image_convert import split_images, to_unit_hwc

    with pytest.raises(ValueError) as scuf_error:
        for image in split_images(images):
            to_unit_hwc(image, "images")
    state = pipe.new_video_state()
    with pytest.raises(ValueError) as sgz_error:
        pipe(images, temporal_smoothing=temporal_smoothing, video_state=state)
    assert str(sgz_error.value) == str(scuf_error.value)
    assert re.match(r"images: float images must be in 0\.\.1, got .*\(pass uint8 for 0\.\.255 data\)",
                    str(sgz_error.value))
    assert state.factor is None and state.input_level is None


@pytest.mark.parametrize("strength", [-0.1, 4.05, float("inf"), True, "1"])
def test_strength_bounds_as_the_command_line(pipe, strength):
    from comfyui_lowlight.pipelines.sgz.options import STRENGTH

    with pytest.raises(ValueError, match=re.escape(f"strength: expected {STRENGTH.expected}")):
        pipe(torch.rand(1, 3, 8, 8), strength=strength)
    assert STRENGTH.min == 0 and STRENGTH.max == 4
