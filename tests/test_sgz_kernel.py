"""SGZ's compiled CPU kernel (pipelines/sgz/kernel.py) against the torch reference: values, layouts, dtypes,
sizes, threads, the input checks fused into its pass, and the torch fallback without numba."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from comfyui_lowlight.pipelines import SGZPipeline
from comfyui_lowlight.pipelines.sgz import kernel
from comfyui_lowlight.pipelines.sgz.model import (
    apply_recurrence_reference,
    enhance,
    upsample_factor,
)


def enhance_torch(*args, **kwargs):
    return enhance(*args, use_kernel=False, **kwargs)


def _case(batch, height, width, small, seed, factor_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator)
    factor = (torch.rand(batch, 3, *small, generator=generator) * 2 - 1) * factor_scale
    return image, factor


SIZES = [  # (batch, H, W, low-res h x w)
    (1, 1, 1, (1, 1)),
    (1, 1, 7, (1, 2)),
    (2, 5, 3, (2, 1)),
    (1, 13, 29, (13, 29)),  # downscale 1: no resize
    (3, 67, 301, (6, 25)),
    (1, 300, 401, (25, 33)),  # several chunks of rows per image
]


@pytest.mark.parametrize("batch, height, width, small", SIZES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_float_output_matches_reference(batch, height, width, small, layout):
    image, factor = _case(batch, height, width, small, seed=height * width)
    image = image.contiguous(memory_format=layout)
    reference = apply_recurrence_reference(image, upsample_factor(factor, (height, width)))
    out = enhance(image, factor)
    assert out.dtype == torch.float32 and out.shape == image.shape
    assert out.is_contiguous(memory_format=layout)
    assert (out - reference).abs().max() < 1e-4
    assert (out - enhance_torch(image, factor)).abs().max() < 1e-5


@pytest.mark.parametrize("batch, height, width, small", SIZES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_uint8_matches_reference_within_one_level(batch, height, width, small, layout):
    image, factor = _case(batch, height, width, small, seed=7 + height)
    image_u8 = (image * 255).round().to(torch.uint8).contiguous(memory_format=layout)
    reference = apply_recurrence_reference(image_u8.float() / 255, upsample_factor(factor, (height, width)))
    reference = (reference.clamp(0, 1) * 255).round()
    out = enhance(image_u8, factor, out_dtype=torch.uint8)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=layout)
    assert (out.float() - reference).abs().max() <= 1
    float_out = enhance(image_u8, factor, out_dtype=torch.float32)  # uint8 in, float out
    assert (float_out * 255 - reference).abs().max() <= 0.51


@pytest.mark.parametrize("recurrences", [0, 1, 3, 4, 5, 8, 16])
def test_every_recurrence_count(recurrences):
    image, factor = _case(2, 19, 23, (3, 4), seed=recurrences)
    reference = apply_recurrence_reference(image, upsample_factor(factor, (19, 23)), recurrences)
    assert (enhance(image, factor, recurrences) - reference).abs().max() < 1e-4
    if recurrences == 0:
        assert torch.equal(enhance(image, factor, 0), image)
        image_u8 = (image * 255).round().to(torch.uint8)
        assert torch.equal(enhance(image_u8, factor, 0, out_dtype=torch.uint8), image_u8)


def test_factor_is_clamped_as_in_the_reference():
    """What the pipeline's strength produces before clamping (and a raw out-of-range factor) is clamped to -1..1."""
    image, factor = _case(1, 31, 47, (4, 5), seed=3, factor_scale=3.0)
    reference = apply_recurrence_reference(image, upsample_factor(factor.clamp(-1, 1), (31, 47)))
    out = enhance(image, factor)
    assert (out - reference).abs().max() < 1e-4
    assert 0 <= out.min() and out.max() <= 1


def test_float64_and_mixed_dtypes():
    image, factor = _case(1, 17, 21, (2, 2), seed=11)
    reference = apply_recurrence_reference(image, upsample_factor(factor, (17, 21)))
    out64 = enhance(image.double(), factor)
    assert out64.dtype == torch.float64 and (out64.float() - reference).abs().max() < 1e-4
    to_u8 = enhance(image, factor, out_dtype=torch.uint8)
    assert (to_u8.float() - (reference * 255).round()).abs().max() <= 1


def test_float_input_to_uint8_output_is_clamped_and_rounded():
    image = torch.tensor([0.0, 1.0, 1.0005, -0.0005, 0.5, 0.502]).view(1, 3, 1, 2)
    out = enhance(image, torch.zeros(1, 3, 1, 1), recurrences=0, out_dtype=torch.uint8)
    assert out.flatten().tolist() == [0, 255, 255, 0, 128, 128]


def test_thread_count_does_not_change_the_result():
    image, factor = _case(2, 301, 257, (25, 21), seed=5)
    results = [kernel.enhance_cpu(image, factor, 8, torch.uint8, threads=n)[0] for n in (1, 2, 3)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_kernel_follows_torch_thread_setting(monkeypatch):
    used = []
    original = kernel.run_chunks
    monkeypatch.setattr(kernel, "run_chunks", lambda chunks, work, threads: used.append(threads) or original(
        chunks, work, threads))
    threads = torch.get_num_threads()
    try:
        for setting in (1, 2):
            torch.set_num_threads(setting)
            enhance(*_case(1, 40, 40, (4, 4), seed=1))
    finally:
        torch.set_num_threads(threads)
    assert used == [1, 2]


def test_inside_inference_mode_and_from_read_only_numpy():
    """ComfyUI runs nodes under inference_mode; PIL/numpy frames arrive as read-only channels-last views."""
    array = np.random.default_rng(0).integers(0, 256, (1, 30, 50, 3), dtype=np.uint8)
    array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = torch.from_numpy(array).permute(0, 3, 1, 2)
    factor = torch.rand(1, 3, 3, 4) * 2 - 1
    with torch.inference_mode():
        out = enhance(image, factor, out_dtype=torch.uint8)
    expected = enhance_torch(image, factor, out_dtype=torch.uint8)
    assert (out.int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("path", [enhance, enhance_torch])
@pytest.mark.parametrize(
    "bad, message",
    [
        (255.0, r"image: float images must be in 0\.\.1, got 0\.\.255 \(pass uint8 for 0\.\.255 data\)"),
        (-0.5, r"image: float images must be in 0\.\.1, got -0\.5\.\.0\.9"),
        (float("nan"), "image: contains NaN or inf values"),
        (float("inf"), "image: contains NaN or inf values"),
    ],
)
def test_float_input_checked_in_the_pass(path, bad, message):
    image = torch.linspace(0, 0.9, 3 * 40 * 50).view(1, 3, 40, 50).clone()
    image[0, 1, 39, 49] = bad
    if bad == 255.0:
        image = image * 0 + torch.linspace(0, 255, 3 * 40 * 50).view(1, 3, 40, 50)
    with pytest.raises(ValueError, match=message):
        path(image, torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("path", [enhance, enhance_torch])
def test_resampling_noise_within_slack_is_accepted(path):
    image = torch.full((1, 3, 8, 8), 0.5)
    image[0, 0, 0, 0], image[0, 0, 0, 1] = -0.0009, 1.0009
    assert path(image, torch.zeros(1, 3, 1, 1)).shape == image.shape
    assert enhance(image, torch.zeros(1, 3, 1, 1), what="frames").shape == image.shape
    image[0, 0, 0, 0] = -0.01
    with pytest.raises(ValueError, match="frames: float images must be in 0..1"):
        path(image, torch.zeros(1, 3, 1, 1), what="frames")


def test_without_numba_falls_back_to_torch_and_says_so_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.setattr(kernel, "_kernels", None)
    image, factor = _case(1, 20, 30, (2, 3), seed=9)
    with pytest.warns(RuntimeWarning, match="numba is not installed"):
        first = enhance(image, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = enhance(image, factor)
    assert not kernel.available()
    assert torch.equal(first, enhance_torch(image, factor)) and torch.equal(first, second)


def test_pipeline_uses_the_kernel_and_matches_the_torch_path(monkeypatch):
    pipe = SGZPipeline.from_pretrained()
    frame = np.random.default_rng(2).integers(0, 90, (2, 45, 61, 3), dtype=np.uint8)  # numpy NHWC batch
    calls = []
    original = kernel.enhance_cpu
    monkeypatch.setattr(kernel, "enhance_cpu", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = pipe(frame, strength=1.7)
    assert calls
    monkeypatch.setattr(kernel, "supports", lambda image, out_dtype: False)
    slow = pipe(frame, strength=1.7)
    assert fast.dtype == np.uint8 and fast.shape == frame.shape
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1


def test_importing_the_pipeline_does_not_import_numba():
    code = "import sys, comfyui_lowlight.pipelines.sgz.pipeline; assert 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_of_small_frames_shares_frames_among_threads_with_the_same_result():
    """At 2 threads a video chunk's factor network runs frame by frame on the caller's threads, torch at 1 thread."""
    pipe = SGZPipeline.from_pretrained()
    frames = np.random.default_rng(3).integers(0, 90, (5, 48, 64, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    seen = []
    original = pipe.model.forward

    def forward(x):
        seen.append((x.shape[0], torch.get_num_threads()))
        return original(x)

    pipe.model.forward = forward
    try:
        torch.set_num_threads(1)
        one = pipe(frames, temporal_smoothing=0.8)
        batched = list(seen)
        seen.clear()
        torch.set_num_threads(2)
        two = pipe(frames, temporal_smoothing=0.8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert batched == [(5, 1)] and seen == [(1, 1)] * 5
    assert np.abs(one.astype(int) - two.astype(int)).max() <= 1


def test_cached_kernel_loads_under_another_import_name(tmp_path):
    """ComfyUI imports the pack under its folder's path, an install as ``comfyui_lowlight``: numba's disk cache,
    shared by both (same source file), must not hand one the kernel the other compiled (that failed with
    ``ModuleNotFoundError: No module named 'comfyui_lowlight'`` inside ComfyUI)."""
    from pathlib import Path

    repo = Path(kernel.__file__).parents[2]  # as imported (numba keys its cache folder by this path)
    run = (
        "import numpy as np\n"
        "frames = np.full((1, 24, 32, 3), 20, np.uint8)\n"
        "out = pipelines.SGZPipeline.from_pretrained(\n"
        f"    {str(repo / 'lora_weights' / 'sgz_lowlight.safetensors')!r})(frames)\n"
        "assert out.shape == frames.shape and out.mean() > 20, out.mean()\n"
    )
    as_installed = "import comfyui_lowlight.pipelines as pipelines\n" + run
    as_in_comfyui = (  # what ComfyUI's custom-node loader does
        "import importlib.util, sys\n"
        f"name = {str(tmp_path / 'custom_nodes' / 'comfyui-lowlight')!r}\n"
        f"spec = importlib.util.spec_from_file_location(name, {str(repo / '__init__.py')!r})\n"
        "pack = importlib.util.module_from_spec(spec)\n"
        "sys.modules[name] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "pipelines = importlib.import_module(name + '.pipelines')\n" + run
    )
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}
    for code in (as_installed, as_in_comfyui, as_installed):  # each after the other has written the cache
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "numba_cache").rglob("*.nbi"))) == 4  # rows and widen, once per import name
