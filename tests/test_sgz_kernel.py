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
from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
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


def test_thread_count_does_not_change_the_result(monkeypatch):
    assert kernel.available()  # compiles the kernels when this test runs alone
    monkeypatch.setattr(kernel, "_MIN_CHUNKS_PER_THREAD", 1)  # share even this small frame's chunks
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
            enhance(*_case(1, 1400, 1000, (8, 8), seed=1))  # 33 chunks of rows
            enhance(*_case(1, 40, 40, (4, 4), seed=1))  # 1 chunk: no helper is worth waking
    finally:
        torch.set_num_threads(threads)
    assert used == [1, 1, 2, 1]


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
    fast = pipe(frame, strength=1.7, **PLAIN_SGZ)  # plain SGZ: the curve kernel alone (v2: tests further down)
    assert calls
    monkeypatch.setattr(kernel, "supports", lambda image, out_dtype: False)
    slow = pipe(frame, strength=1.7, **PLAIN_SGZ)
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


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("size, downscale", [((300, 200), 2), ((1080, 1920), 12), ((61, 47), 1), ((240, 320), 12)])
def test_one_frames_factor_network_runs_in_bands_with_the_whole_frames_result(padding_mode, size, downscale,
                                                                               monkeypatch):
    """At 2+ threads one frame's factor network runs in bands of low-resolution rows (each with the network's
    receptive radius of context): the whole frame's factor within float rounding (oneDNN's conv may round in
    another order for another shape: 1 ulp seen) and the same resized image; the noise estimate runs as one more
    piece beside it."""
    from comfyui_lowlight.pipelines.sgz.denoise import estimate_noise_sigma
    from comfyui_lowlight.pipelines.sgz.model import EnhancementFactorEstimator
    from comfyui_lowlight.pipelines.sgz.pipeline import _estimate_factors

    monkeypatch.setattr(kernel, "sharing_pays", lambda: True)  # whatever else loads the machine meanwhile
    torch.manual_seed(4)
    model = SGZPipeline.from_pretrained().model if padding_mode == "zeros" else (
        EnhancementFactorEstimator(padding_mode="replicate").eval())
    assert model.receptive_radius == 7
    frame = torch.from_numpy(np.random.default_rng(2).integers(0, 120, (1, *size, 3), dtype=np.uint8))
    batch = frame.permute(0, 3, 1, 2)  # channels-last uint8, as frames from numpy arrive
    rows = []
    original = model.forward
    model.forward = lambda x: rows.append(x.shape[2]) or original(x)
    with torch.no_grad():
        whole, whole_lowres, none = _estimate_factors(model, batch, downscale, 1, True, True)
        assert none is None and rows == [whole.shape[2]]
        for threads in (2, 3):
            rows.clear()
            factor, lowres, noise = _estimate_factors(model, batch, downscale, threads, True, True)
            torch.testing.assert_close(factor, whole, rtol=0, atol=1e-6)
            assert torch.equal(lowres, whole_lowres)
            bands = min(threads, whole.shape[2] // (4 * model.receptive_radius))  # tall enough to be worth cutting
            if bands > 1:
                assert len(rows) == bands and max(rows) < whole.shape[2]
                assert torch.equal(noise, estimate_noise_sigma(batch))
            else:
                assert rows == [whole.shape[2]] and noise is None  # the caller computes the noise itself
            factor, lowres, noise = _estimate_factors(model, batch.float() / 255, downscale, threads)
            torch.testing.assert_close(factor, _estimate_factors(model, batch.float() / 255, downscale, 1)[0],
                                       rtol=0, atol=1e-6)
            assert lowres is None and noise is None


def test_shared_calls_measure_the_cpu_they_get_and_bands_stop_when_it_is_one_core(monkeypatch):
    """run_chunks records the cores its threads actually ran on (thread CPU time / wall time): chunks that wait
    (as threads do that the scheduler leaves on one busy core) count as none, and once recent calls got less than
    about one core and a third, calls keep to the calling thread (but for probes) and the factor network is no
    longer cut into overlapping bands (the overlap would be pure extra work); the network's result is the same."""
    import time
    from comfyui_lowlight.pipelines.sgz.pipeline import _estimate_factors

    import threading

    monkeypatch.setattr(kernel, "_cores_in_use", 2.0)
    assert kernel.sharing_pays()
    for _ in range(4):
        kernel.run_chunks(4, lambda i: time.sleep(0.003), 2)
    assert not kernel.sharing_pays()
    # Then calls keep to the calling thread, but for one in _PROBE_EVERY, which shares and measures again.
    callers = []
    for _ in range(2 * kernel._PROBE_EVERY):
        ran_on = set()
        kernel.run_chunks(4, lambda i: ran_on.add(threading.get_ident()) or time.sleep(0.003), 2)
        callers.append(ran_on == {threading.get_ident()})
    assert sum(callers) >= 2 * (kernel._PROBE_EVERY - 1) and not kernel.sharing_pays()
    # A measurement older than a few seconds is forgotten.
    monkeypatch.setattr(kernel, "_measured_at", time.monotonic() - 2 * kernel._STALE_SECONDS)
    assert kernel.sharing_pays()
    monkeypatch.setattr(kernel, "_measured_at", time.monotonic())

    model = SGZPipeline.from_pretrained().model
    batch = torch.from_numpy(np.random.default_rng(3).integers(0, 120, (1, 1080, 1920, 3), dtype=np.uint8))
    batch = batch.permute(0, 3, 1, 2)
    rows = []
    original = model.forward
    model.forward = lambda x: rows.append(x.shape[2]) or original(x)
    with torch.no_grad():
        factor, _, noise = _estimate_factors(model, batch, 12, 2, True, True)
        assert rows == [90] and noise is None  # whole frame; the caller estimates the noise itself
        monkeypatch.setattr(kernel, "_cores_in_use", 2.0)
        rows.clear()
        banded, _, noise = _estimate_factors(model, batch, 12, 2, True, True)
        assert len(rows) == 2 and noise is not None
    torch.testing.assert_close(banded, factor, rtol=0, atol=1e-6)


def test_pool_threads_run_torch_at_one_thread_and_the_host_setting_is_kept(monkeypatch):
    """torch latches its thread count per thread on first use: a pool thread that once ran at another count must
    still run the factor network at one thread (no OpenMP team of its own), and the caller's setting, also the
    default that threads started later take, is what it was."""
    import threading
    import time

    monkeypatch.setattr(kernel, "sharing_pays", lambda: True)  # the frame in bands, however busy the machine is

    pipe = SGZPipeline.from_pretrained()
    frame = np.random.default_rng(5).integers(0, 90, (720, 1280, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pipe(frame)  # creates the pool
        workers = kernel._pool._max_workers
        barrier = threading.Barrier(workers)

        def latch_three():  # one task per pool thread (each waits for all the others)
            torch.set_num_threads(3)
            barrier.wait(timeout=10)

        for future in [kernel._pool.submit(latch_three) for _ in range(workers)]:
            future.result()
        torch.set_num_threads(2)
        seen = []
        original = pipe.model.forward

        def forward(x):
            if threading.current_thread() is threading.main_thread():
                time.sleep(0.05)  # let a pool thread take the other band
            seen.append(torch.get_num_threads())
            return original(x)

        pipe.model.forward = forward
        banded = pipe(frame)
        del pipe.model.forward
        assert len(seen) == 2 and set(seen) == {1}
        assert torch.get_num_threads() == 2
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
        torch.set_num_threads(1)
        assert np.abs(pipe(frame).astype(int) - banded).max() <= 1
    finally:
        torch.set_num_threads(threads)


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
    # Every kernel the default (v2) path runs is cached once per import name: names "..._<tag>-<line>.py3x.nbi".
    cached = {}
    for index in (tmp_path / "numba_cache").rglob("*.nbi"):
        function, tag = index.name.split("-")[0].split(".")[-1].rsplit("_", 1)
        cached.setdefault(function, set()).add(tag)
    assert {"widen", "guided_band", "noise_responses", "truncated_mean", "curve_gain_planes"} <= set(cached)
    assert all(len(tags) == 2 for tags in cached.values()), cached


# ------------------------------------------------------------------ SGZ v2's noise filter (full-resolution step)
def _denoise_case(batch, height, width, seed, dtype, channels_last):
    from comfyui_lowlight.pipelines.sgz.denoise import curve_gain

    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator) * 0.6
    small = (max(1, height // 4), max(1, width // 4))
    factor = torch.rand(batch, 3, *small, generator=generator) * 0.8
    gain = curve_gain(torch.nn.functional.interpolate(image, size=small, mode="area"), factor, 8)
    sigma = torch.full((batch,), 0.03)
    if dtype == torch.uint8:
        image = (image * 255).round().to(torch.uint8)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return image, gain, sigma


@pytest.mark.parametrize("batch,height,width", [(1, 1, 1), (1, 1, 6), (2, 7, 5), (1, 33, 61), (3, 64, 48),
                                                (1, 300, 401)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_denoise_kernel_matches_the_torch_filter(batch, height, width, dtype, channels_last):
    from comfyui_lowlight.pipelines.sgz.denoise import gain_guided_denoise

    image, gain, sigma = _denoise_case(batch, height, width, 5, dtype, channels_last)
    reference = gain_guided_denoise(image, gain, sigma, 1.5, use_kernel=False)
    fused = gain_guided_denoise(image, gain, sigma, 1.5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=layout)
    tolerance = 1 if dtype == torch.uint8 else 1e-4
    assert (fused.double() - reference.double()).abs().max() <= tolerance
    assert not torch.equal(fused, image) or height * width == 1  # the filter did something to compare
    in_place = image.clone(memory_format=layout)
    assert gain_guided_denoise(in_place, gain, sigma, 1.5, in_place=True).data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, fused)


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.float32, torch.float64])
def test_denoise_kernel_converts_between_dtypes_like_the_torch_filter(out_dtype):
    from comfyui_lowlight.pipelines.sgz.denoise import gain_guided_denoise

    for dtype in (torch.uint8, torch.float32, torch.float64):
        image, gain, sigma = _denoise_case(2, 19, 23, 6, torch.uint8 if dtype == torch.uint8 else torch.float32,
                                           False)
        image = image.to(dtype) if dtype != torch.uint8 else image
        reference = gain_guided_denoise(image, gain, sigma, out_dtype=out_dtype, use_kernel=False)
        fused = gain_guided_denoise(image, gain, sigma, out_dtype=out_dtype)
        assert fused.dtype == out_dtype
        tolerance = 1 if out_dtype == torch.uint8 else 1e-4
        assert (fused.double() - reference.double()).abs().max() <= tolerance


def test_denoise_amount_zero_is_the_identity_in_both_paths():
    from comfyui_lowlight.pipelines.sgz.denoise import gain_guided_denoise

    image, gain, sigma = _denoise_case(2, 9, 11, 7, torch.uint8, True)
    for use_kernel in (True, False):
        assert torch.equal(gain_guided_denoise(image, gain, sigma, 0.0, use_kernel=use_kernel), image)
        as_float = gain_guided_denoise(image, gain, sigma, 0.0, out_dtype=torch.float32, use_kernel=use_kernel)
        assert torch.allclose(as_float, image.float() / 255.0)


def test_v2_pipeline_with_the_kernels_matches_the_torch_path(monkeypatch):
    """Defaults (denoise on) end to end: numba kernels vs the torch implementations, uint8 and float frames."""
    pipe = SGZPipeline.from_pretrained()
    frames = np.random.default_rng(11).integers(0, 70, (2, 45, 67, 3), dtype=np.uint8)
    fused_u8, fused_float = pipe(frames), pipe(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0)
    monkeypatch.setattr(kernel, "_kernels", False)
    torch_u8, torch_float = pipe(frames), pipe(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0)
    assert np.abs(fused_u8.astype(int) - torch_u8.astype(int)).max() <= 1
    assert (fused_float - torch_float).abs().max() <= 1e-4
    assert np.abs(fused_u8.astype(int) - pipe(frames, denoise=0.0).astype(int)).max() > 3  # the filter acts


# --------------------------------------------- SGZ v2: curve and filter in one compiled pass, gain, noise estimate
@pytest.mark.parametrize("batch,height,width", [(1, 1, 1), (1, 2, 9), (2, 7, 5), (1, 33, 61), (2, 64, 48),
                                                (1, 301, 402), (1, 150, 160)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_curve_and_filter_in_one_pass_match_enhance_then_the_torch_filter(batch, height, width, dtype,
                                                                          channels_last):
    from comfyui_lowlight.pipelines.sgz.denoise import enhance_denoised

    from comfyui_lowlight.pipelines.sgz.denoise import gain_guided_denoise

    image, gain, sigma = _denoise_case(batch, height, width, 9, dtype, channels_last)
    factor = -torch.rand(batch, 3, *gain.shape[-2:], generator=torch.Generator().manual_seed(3)) * 0.9
    # The float32 filter is itself that precise only: where the window variance is at the level of float32
    # rounding (flat patches the curve compressed), the torch filter moves by up to ~1e-3 when its input moves by
    # the ~7e-6 between the curve's kernel and its torch tiles. Float results are held to twice that, or 1e-4.
    sensitivity = (gain_guided_denoise(enhance(image, factor, 8, torch.float32), gain, sigma, 1.5, use_kernel=False)
                   - gain_guided_denoise(enhance_torch(image, factor, 8, torch.float32), gain, sigma, 1.5,
                                         use_kernel=False)).abs().max().item()
    assert sensitivity < 5e-3
    for out_dtype in (None, torch.float32):
        reference = enhance_denoised(image, factor, 8, gain, sigma, 1.5, out_dtype=out_dtype, use_kernel=False)
        fused = enhance_denoised(image, factor, 8, gain, sigma, 1.5, out_dtype=out_dtype)
        assert fused.dtype == reference.dtype and fused.shape == image.shape
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert fused.is_contiguous(memory_format=layout)
        difference = (fused.double() - reference.double()).abs()
        if fused.dtype == torch.uint8:
            assert difference.max() <= 1
        else:
            assert difference.max() <= max(1e-4, 2 * sensitivity)
            assert (difference > 1e-4).double().mean() < 1e-3  # a few values in such flat patches only
    plain = enhance(image, factor, 8)
    assert height * width == 1 or not torch.equal(fused, plain.float() / (255.0 if dtype == torch.uint8 else 1.0))


def test_one_pass_filter_gives_the_same_result_at_any_thread_count():
    from comfyui_lowlight.pipelines.sgz.denoise import enhance_denoised

    image, gain, sigma = _denoise_case(2, 211, 97, 12, torch.uint8, True)
    factor = -torch.rand(2, 3, *gain.shape[-2:], generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):  # bands shared among threads, each with its own halo rows
            torch.set_num_threads(count)
            results.append(enhance_denoised(image, factor, 8, gain, sigma))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN"), (1.5, "0..1"), (-0.2, "0..1")])
def test_one_pass_filter_checks_float_input(bad, message):
    from comfyui_lowlight.pipelines.sgz.denoise import enhance_denoised

    image, gain, sigma = _denoise_case(1, 40, 30, 13, torch.float32, False)
    image[0, 1, 37, 3] = bad
    factor = -torch.rand(1, 3, *gain.shape[-2:])
    for use_kernel in (True, False):
        with pytest.raises(ValueError, match="frames") as error:
            enhance_denoised(image, factor, 8, gain, sigma, what="frames", use_kernel=use_kernel)
        assert message in str(error.value) or "0..1" in str(error.value)


def test_one_pass_filter_refuses_to_write_over_its_input():
    image, gain, sigma = _denoise_case(1, 20, 20, 14, torch.float32, False)
    kernel.available()
    with pytest.raises(ValueError, match="share memory"):
        kernel.guided_filter_cpu(image, image, None, 0, gain, np.ones(1), np.ones(3), 1e-6, 3, np.eye(3), np.eye(3))


def test_other_filter_windows_run_the_torch_filter(monkeypatch):
    """The compiled pass is written for 3x3 windows: another ``_WINDOW`` (e.g. while tuning) takes the torch path
    instead of a wrong result, and the kernel itself refuses it."""
    from comfyui_lowlight.pipelines.sgz import denoise as sgz_denoise

    image, gain, sigma = _denoise_case(1, 30, 40, 15, torch.uint8, True)
    factor = -torch.rand(1, 3, *gain.shape[-2:], generator=torch.Generator().manual_seed(5))
    three = sgz_denoise.enhance_denoised(image, factor, 8, gain, sigma)
    monkeypatch.setattr(sgz_denoise, "_WINDOW", 5)
    five = sgz_denoise.enhance_denoised(image, factor, 8, gain, sigma)
    reference = sgz_denoise.enhance_denoised(image, factor, 8, gain, sigma, use_kernel=False)
    assert (five.int() - reference.int()).abs().max() <= 1  # the curve's kernel and torch tiles differ by rounding
    assert (five.int() - three.int()).abs().max() > 1
    with pytest.raises(ValueError, match="3x3"):
        kernel.guided_filter_cpu(image, torch.empty_like(image), factor, 8, gain, np.ones(1), np.ones(3), 1e-6, 5,
                                 np.eye(3), np.eye(3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_noise_estimate_and_curve_gain_kernels_match_torch(dtype, channels_last):
    from comfyui_lowlight.pipelines.sgz.denoise import curve_gain, estimate_noise_sigma

    generator = torch.Generator().manual_seed(15)
    image = torch.rand(3, 3, 157, 203, generator=generator) * 0.5
    image[:, :, 40:80, 50:120] += 0.4  # an edge: the truncated mean must leave it out in both paths
    image = image + 0.02 * torch.randn(image.shape, generator=generator)
    image = image.clamp(0, 1)
    if dtype == torch.uint8:
        image = (image * 255).round().to(torch.uint8)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    reference = estimate_noise_sigma(image, use_kernel=False)
    assert torch.allclose(estimate_noise_sigma(image), reference, rtol=1e-4, atol=1e-7)
    small = torch.rand(2, 3, 9, 16, generator=generator)
    factor = -torch.rand(2, 3, 9, 16, generator=generator)
    for recurrences in (0, 1, 8):
        torch.testing.assert_close(curve_gain(small, factor, recurrences),
                                   curve_gain(small, factor, recurrences, use_kernel=False), rtol=1e-5, atol=1e-6)


def test_exposure_candidate_keys_kernel_matches_torch(monkeypatch):
    from comfyui_lowlight.pipelines.sgz import exposure

    generator = torch.Generator().manual_seed(16)
    x = torch.rand(2, 3, 37 * 23, generator=generator) * 0.4
    factor = torch.rand(2, 3, 37 * 23, generator=generator) * 1.6 - 1.0  # some darkening values too
    scales = torch.linspace(-1.4, 1.4, 9).exp()
    compiled = exposure._candidate_keys(x, factor, scales, 8)
    monkeypatch.setattr(kernel, "_kernels", False)
    reference = exposure._candidate_keys(x, factor, scales, 8)
    assert compiled.shape == (2, 9)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_factor_network_reuses_the_low_resolution_image_it_is_given():
    from comfyui_lowlight.pipelines.sgz.model import downsample_bilinear, estimate_factor_lowres, lowres_size

    pipe = SGZPipeline.from_pretrained()
    image = torch.rand(2, 3, 61, 83, generator=torch.Generator().manual_seed(17))
    small = downsample_bilinear(image, lowres_size(61, 83, 12))
    torch.testing.assert_close(estimate_factor_lowres(pipe.model, image, 12, lowres=small),
                               estimate_factor_lowres(pipe.model, image, 12), rtol=0, atol=0)
    assert not torch.equal(estimate_factor_lowres(pipe.model, image, 12, lowres=small * 0.5),
                           estimate_factor_lowres(pipe.model, image, 12))  # it is the input used


@pytest.mark.parametrize("size, ties", [(1, False), (7, False), (1000, True), (92064, False)])
def test_truncated_mean_selects_exactly_like_a_partition(size, ties):
    rng = np.random.default_rng(size)
    responses = (rng.integers(0, 5, size) / 7 if ties else np.abs(rng.normal(size=size))).astype(np.float32)
    kept = max(1, int(size * 0.8))
    threshold = np.partition(responses, kept - 1)[kept - 1]
    kernel.available()
    total, count = kernel._kernels["truncated_mean"](responses, kept)
    assert count == int((responses <= threshold).sum())  # ties at the threshold all included
    assert total == pytest.approx(float(responses[responses <= threshold].astype(np.float64).sum()), rel=1e-9)
