"""The ``lowlight enhance`` command line on images, folders, videos and bad input.

Everything runs on the shipped weights, the bundled sample and images and clips the tests make (``media.py``);
only the check that the released official ``Epoch99.pth`` loads needs ``../shared``.
"""

import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.cli import main
from comfyui_lowlight.pipelines.media import video_io
from comfyui_lowlight.pipelines.media.image_io import read_image
from comfyui_lowlight.pipelines.sgz.model import load_sgz_weights
from media import REPO_ROOT, SHIPPED_SGZ_WEIGHTS, V1_SGZ_WEIGHTS, dark_clip_frames, decoded_pts_and_frames, write_video


@pytest.fixture
def run(capsys):
    """Run the CLI in-process with the shipped weights on CPU; returns (exit code, stdout, stderr)."""

    def _run(*args, weights=SHIPPED_SGZ_WEIGHTS):
        code = main(["enhance", *map(str, args), "--weights", str(weights), "--device", "cpu"])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


def _dark_image(path: Path, size=(40, 30), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(5, 60, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def _summary(out: str) -> str:
    return out.strip().splitlines()[-1]


def _no_hidden_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.rglob("*"))


def test_images_are_enhanced_with_their_size_and_format(tmp_path, run):
    inputs = [_dark_image(tmp_path / "a.jpg"), _dark_image(tmp_path / "b.png", size=(33, 17), seed=1)]
    code, out, _ = run(*inputs, "-o", tmp_path / "out")
    assert code == 0 and _summary(out) == "lowlight: 2 written, 0 skipped, 0 failed"
    for source in inputs:
        before, after = read_image(source).pixels, read_image(tmp_path / "out" / source.name).pixels
        assert after.shape == before.shape
        assert after.mean() > before.mean() + 10  # the shipped weights brighten dark images a lot
    with Image.open(tmp_path / "out" / "b.png") as written:
        assert written.format == "PNG"


def test_single_input_may_name_the_output_file(tmp_path, run):
    source = _dark_image(tmp_path / "a.jpg")
    code, _, _ = run(source, "-o", tmp_path / "result.png")
    assert code == 0
    with Image.open(tmp_path / "result.png") as written:
        assert written.format == "PNG" and written.size == (40, 30)


def test_folder_is_searched_recursively_and_relative_paths_kept(tmp_path, run):
    folder = tmp_path / "photos"
    (folder / "trip" / "day2").mkdir(parents=True)
    _dark_image(folder / "top.jpg")
    _dark_image(folder / "trip" / "x.png")
    _dark_image(folder / "trip" / "day2" / "y.bmp")
    (folder / "notes.txt").write_text("not an image")
    _dark_image(folder / ".hidden.jpg")  # e.g. a temporary file of an interrupted run
    out = tmp_path / "out"
    code, stdout, _ = run(folder, "-o", out)
    assert code == 0 and _summary(stdout) == "lowlight: 3 written, 0 skipped, 0 failed"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["top.jpg", "trip/day2/y.bmp", "trip/x.png"]


def test_output_folder_inside_the_input_folder_is_not_rescanned(tmp_path, run):
    folder = tmp_path / "photos"
    folder.mkdir()
    _dark_image(folder / "a.jpg")
    assert run(folder, "-o", folder / "enhanced")[0] == 0
    code, out, _ = run(folder, "-o", folder / "enhanced")
    assert code == 0 and _summary(out).startswith("lowlight: 0 written, 1 skipped")
    assert not (folder / "enhanced" / "enhanced").exists()


def test_corrupt_file_fails_alone_and_is_reported(tmp_path, run):
    folder = tmp_path / "in"
    folder.mkdir()
    _dark_image(folder / "good1.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _dark_image(folder / "good2.png")
    code, out, err = run(folder, tmp_path / "missing.jpg", "-o", tmp_path / "out")
    assert code == 1
    assert _summary(out) == "lowlight: 2 written, 0 skipped, 2 failed"
    assert "corrupt.jpg" in err and "missing.jpg" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good1.jpg", "good2.png"]


def test_unusual_pixel_formats_come_out_in_kind(tmp_path, run):
    folder = tmp_path / "in"
    folder.mkdir()
    _dark_image(folder / "grey.png", mode="L")
    rgba = np.dstack([np.full((20, 24, 3), 30, np.uint8), np.tile(np.arange(24, dtype=np.uint8) * 10, (20, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    grey16 = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (10, 1))  # dark 16-bit ramp
    Image.fromarray(grey16).save(folder / "deep.png")
    Image.new("CMYK", (16, 12), (40, 40, 40, 200)).save(folder / "print.jpg")
    stored = np.full((10, 30, 3), 25, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif.tobytes())

    code, out, err = run(folder, "-o", tmp_path / "out")
    assert code == 0, err
    result = tmp_path / "out"
    with Image.open(result / "grey.png") as grey:
        assert grey.mode == "L"
    rgba_out = read_image(result / "rgba.png")
    assert (rgba_out.alpha == rgba[..., 3]).all() and rgba_out.pixels.mean() > 30
    deep = read_image(result / "deep.png")
    assert deep.bit_depth == 16 and deep.grayscale and deep.pixels.mean() > grey16.mean()
    # 16-bit precision survives: far more distinct levels than an 8-bit file could hold
    assert len(np.unique(deep.pixels)) == len(np.unique(grey16))
    with Image.open(result / "print.jpg") as printed:
        assert printed.mode == "RGB" and printed.size == (16, 12)
    with Image.open(result / "phone.jpg") as phone:
        assert phone.size == (10, 30)  # upright, and no orientation tag left to rotate it again
        assert phone.getexif().get(0x0112) in (None, 1)


def test_inputs_are_never_overwritten(tmp_path, run):
    source = _dark_image(tmp_path / "a.jpg")
    original = source.read_bytes()
    code, out, err = run(source, "-o", tmp_path, "--overwrite")
    assert code == 1 and "refusing to overwrite the input" in err
    code, out, err = run(tmp_path, "-o", tmp_path, "--overwrite")
    assert code == 1 and "refusing to overwrite the input" in err
    assert source.read_bytes() == original


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, run):
    source = _dark_image(tmp_path / "a.png")
    out = tmp_path / "out"
    assert run(source, "-o", out)[0] == 0
    first = (out / "a.png").read_bytes()
    first_mean = read_image(out / "a.png").pixels.mean()
    code, stdout, _ = run(source, "-o", out, "--strength", "0.3")
    assert code == 0 and _summary(stdout).startswith("lowlight: 0 written, 1 skipped")
    assert (out / "a.png").read_bytes() == first
    code, stdout, _ = run(source, "-o", out, "--strength", "0.3", "--overwrite")
    assert code == 0 and _summary(stdout) == "lowlight: 1 written, 0 skipped, 0 failed"
    assert read_image(out / "a.png").pixels.mean() < first_mean - 5  # weaker strength really was applied
    assert (out / "a.png").read_bytes() != first
    assert _no_hidden_files(tmp_path)


def test_foreign_pth_state_dict_is_accepted_as_weights(tmp_path, run):
    """``--weights`` takes a plain PyTorch state dict (.pth), the official checkpoint's format."""
    torch.save(load_sgz_weights(SHIPPED_SGZ_WEIGHTS).state_dict(), tmp_path / "foreign.pth")
    source = _dark_image(tmp_path / "a.png")
    code, out, err = run(source, "-o", tmp_path / "out", weights=tmp_path / "foreign.pth")
    assert code == 0 and _summary(out) == "lowlight: 1 written, 0 skipped, 0 failed", err
    assert read_image(tmp_path / "out" / "a.png").pixels.mean() > read_image(source).pixels.mean() + 10


def test_shipped_v1_weights_are_picked_by_name_from_any_directory(tmp_path, run, monkeypatch):
    """``--weights sgz_lowlight_v1.safetensors`` (no folder) finds the pack's file from an unrelated directory, and
    plain SGZ with it is the pipeline's plain SGZ with that file (not the default weights)."""
    from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    source = _dark_image(tmp_path / "a.png", size=(64, 48))
    code, out, err = run(source, "-o", tmp_path / "out", "--denoise", "0", "--auto-exposure", "0",
                         weights="sgz_lowlight_v1.safetensors")
    assert code == 0 and _summary(out) == "lowlight: 1 written, 0 skipped, 0 failed", err
    written = read_image(tmp_path / "out" / "a.png").pixels
    expected = SGZPipeline.from_pretrained(V1_SGZ_WEIGHTS)(read_image(source).pixels, **PLAIN_SGZ)
    default = SGZPipeline.from_pretrained(SHIPPED_SGZ_WEIGHTS)(read_image(source).pixels, **PLAIN_SGZ)
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(written.astype(int) - default.astype(int)).max() > 1  # the two files differ


def test_official_released_weights_are_accepted(shared_dir, tmp_path, run):
    source = _dark_image(tmp_path / "a.png")
    code, out, err = run(source, "-o", tmp_path / "out", weights=shared_dir / "reference" / "sgz" / "Epoch99.pth")
    assert code == 0 and _summary(out) == "lowlight: 1 written, 0 skipped, 0 failed", err
    assert read_image(tmp_path / "out" / "a.png").pixels.mean() > read_image(source).pixels.mean() + 10


def test_bad_weights_exit_2_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"nonsense")
    code = main(["enhance", str(_dark_image(tmp_path / "a.jpg")), "-o", str(tmp_path / "out"), "--weights", str(bad)])
    assert code == 2 and "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "out" / "a.jpg").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_saying_what_to_use(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["enhance", str(_dark_image(tmp_path / "a.jpg")), "-o", str(tmp_path / "out"), "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--device {device}" in err and "no CUDA device is available" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()


def test_invalid_options_are_usage_errors(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["enhance", str(tmp_path), "-o", str(tmp_path / "o"), "--temporal-smoothing", "1.5"])
    assert exit_info.value.code == 2


def _decoded(path: Path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
        audio = len(container.streams.audio)
        rate = stream.average_rate
    return frames, audio, rate


@pytest.fixture(scope="module")
def night_clip(tmp_path_factory) -> Path:
    """A dark phone-like clip: portrait 96x170, H.264 with B-frames, variable frame rate around 29.97 fps (1/90000
    time base), AAC stereo audio; 12 frames of a panning night scene with +-15 % exposure jitter (mean ~11/255)."""
    gains = 1 + 0.15 * np.random.default_rng(0).standard_normal(12)
    frames = dark_clip_frames(12, 170, 96, gains)
    path = tmp_path_factory.mktemp("video") / "night_street.mp4"
    return write_video(path, frames, fps=Fraction(30000, 1001), irregular_timestamps=True, with_audio=True)


def _audio_packets(path: Path) -> list[tuple[int, bytes]]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [(packet.pts, bytes(packet)) for packet in container.demux(stream) if packet.size]


def test_video_keeps_timestamps_and_audio_and_brightens(night_clip, tmp_path, run):
    out = tmp_path / "out"
    code, stdout, err = run(night_clip, "-o", out, "--max-frames", "6", "--chunk-size", "4")
    assert code == 0, err
    enhanced, audio_tracks, _ = _decoded(out / "night_street.mp4")
    original = decoded_pts_and_frames(night_clip, max_frames=6)
    assert len(enhanced) == 6
    assert [pts for pts, _ in enhanced] == [pts for pts, _ in original]  # irregular: not recomputable from the fps
    assert len(set(np.diff([pts for pts, _ in original]))) > 1
    assert enhanced[0][1].shape == original[0][1].shape == (170, 96, 3)
    assert audio_tracks == 1
    # the audio is copied, not re-encoded, and stops where the (truncated) video stops
    copied, source_audio = _audio_packets(out / "night_street.mp4"), _audio_packets(night_clip)
    assert 0 < len(copied) < len(source_audio) and copied == source_audio[: len(copied)]
    assert np.mean([f.mean() for _, f in enhanced]) > np.mean([f.mean() for _, f in original]) + 5
    assert _no_hidden_files(out)


def test_temporal_smoothing_carries_across_chunks(night_clip, tmp_path, run):
    # --crf 0 (lossless H.264): at crf 18 float-noise differences between batch sizes change x264's decisions.
    for chunk_size in (2, 6):
        code = run(night_clip, "-o", tmp_path / f"c{chunk_size}", "--max-frames", "6", "--chunk-size", chunk_size,
                   "--crf", 0)[0]
        assert code == 0
    assert run(night_clip, "-o", tmp_path / "off", "--max-frames", "6", "--crf", 0, "--no-temporal-smoothing")[0] == 0
    small, _, _ = _decoded(tmp_path / "c2" / "night_street.mp4")
    large, _, _ = _decoded(tmp_path / "c6" / "night_street.mp4")
    unsmoothed, _, _ = _decoded(tmp_path / "off" / "night_street.mp4")

    def mean_difference(x, y):
        return np.mean([np.abs(a.astype(float) - b.astype(float)).mean() for (_, a), (_, b) in zip(x, y)])

    assert len(small) == len(large) == len(unsmoothed) == 6
    assert mean_difference(small, large) < 0.02  # the smoothing state is not reset per chunk
    assert mean_difference(small, unsmoothed) > 0.1  # ...and smoothing does change the frames


def _synthetic_clip(path: Path, codec: str, frames: int = 8, with_audio: bool = False, rotation: int = 0):
    """A small dark 64x48 clip at 24 fps, optionally with a sine tone and a display rotation, written with PyAV."""
    return write_video(path, dark_clip_frames(frames, 48, 64, seed=1), codec=codec, with_audio=with_audio,
                       rotation=rotation)


@pytest.mark.parametrize("name, codec, with_audio", [("clip.mov", "libx264", True), ("clip.avi", "mpeg4", False)])
def test_mov_and_avi_round_trip_with_fps_kept(tmp_path, run, name, codec, with_audio):
    source = _synthetic_clip(tmp_path / name, codec, with_audio=with_audio)
    code, _, err = run(source, "-o", tmp_path / "out", "--no-temporal-smoothing")
    assert code == 0, err
    frames, audio_tracks, rate = _decoded(tmp_path / "out" / name)
    assert len(frames) == 8 and frames[0][1].shape == (48, 64, 3)
    assert rate == 24 and audio_tracks == int(with_audio)


def test_video_display_rotation_is_kept(tmp_path, run):
    source = _synthetic_clip(tmp_path / "phone.mp4", "libx264", frames=3, rotation=90)
    assert run(source, "-o", tmp_path / "out")[0] == 0
    with av.open(str(tmp_path / "out" / "phone.mp4")) as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height, frame.rotation) == (64, 48, 90)


def test_failure_in_the_middle_of_a_video_leaves_no_file(night_clip, tmp_path, run, monkeypatch):
    calls = []
    original_write = video_io.VideoWriter.write

    def failing_write(self, chunk):
        calls.append(len(chunk.pts))
        if len(calls) == 2:
            raise RuntimeError("simulated encoder failure")
        original_write(self, chunk)

    monkeypatch.setattr(video_io.VideoWriter, "write", failing_write)
    code, out, err = run(night_clip, "-o", tmp_path / "out", "--max-frames", "4", "--chunk-size", "2")
    assert code == 1 and "simulated encoder failure" in err and "night_street.mp4" in err
    assert _summary(out) == "lowlight: 0 written, 0 skipped, 1 failed"
    assert list((tmp_path / "out").iterdir()) == []  # neither the output nor its temporary file


def test_quickstart_line_uses_the_shipped_weights(tmp_path):
    """The README quickstart: `python -m comfyui_lowlight enhance assets/sample_night.jpg -o OUT`, no other flags."""
    sample = REPO_ROOT / "assets" / "sample_night.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "comfyui_lowlight", "enhance", str(sample), "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("1 written, 0 skipped, 0 failed")
    enhanced = read_image(tmp_path / "sample_night.jpg").pixels
    assert enhanced.shape == (384, 512, 3)
    assert enhanced.mean() > read_image(sample).pixels.mean() + 10


def _launch_two_processes(*args) -> subprocess.CompletedProcess:
    """``accelerate launch`` with 2 CPU processes (a gloo group; --multi_gpu is what makes accelerate start N
    processes, --cpu alone starts one), on a free port as in test_scuf_batch.py."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "comfyui_lowlight", "enhance", *map(str, args), "--device", "cpu",
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_accelerate_launch_splits_sgz_files_and_videos(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for index, name in enumerate(["a.png", "b.jpg", "sub/c.png", "sub/d.bmp"]):
        _dark_image(folder / name, size=(40 + 8 * index, 30), seed=index)
    _synthetic_clip(folder / "clip.mp4", "libx264", frames=4)
    sources = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())

    launched = _launch_two_processes(folder, "-o", tmp_path / "two", "--crf", 0)
    assert launched.returncode == 0, launched.stderr[-3000:]
    summaries = dict(re.findall(r"lowlight \[process (\d)/2\]: (\d+) written, 0 skipped, 0 failed", launched.stdout))
    assert set(summaries) == {"1", "2"}, launched.stdout + launched.stderr[-3000:]
    assert sum(int(n) for n in summaries.values()) == 5 and all(int(n) >= 2 for n in summaries.values())

    code = main(["enhance", str(folder), "-o", str(tmp_path / "one"), "--crf", "0", "--device", "cpu"])
    assert code == 0
    for relative in sources:
        assert sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*")
                      if p.is_file() and p.name == relative.name) == [relative]  # written once, where it belongs
        two, one = tmp_path / "two" / relative, tmp_path / "one" / relative
        assert two.read_bytes() == one.read_bytes(), relative  # bit for bit the single-process result
        if relative.suffix == ".mp4":
            before = np.mean([f.mean() for _, f in decoded_pts_and_frames(folder / relative)])
            after = np.mean([f.mean() for _, f in decoded_pts_and_frames(two)])
        else:
            before, after = read_image(folder / relative).pixels.mean(), read_image(two).pixels.mean()
        assert after > before + 10, relative
    assert len([p for p in (tmp_path / "two").rglob("*") if p.is_file()]) == len(sources)
    assert _no_hidden_files(tmp_path / "two")


def test_sigterm_mid_video_removes_temporary_files_and_prints_the_summary(tmp_path):
    """``docker stop`` / systemd: SIGTERM while a video is being written ends the run as Ctrl-C does."""
    import signal
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    _dark_image(folder / "a.png")
    write_video(folder / "b.mp4", dark_clip_frames(400, 180, 320), fps=Fraction(30))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "comfyui_lowlight", "enhance", str(folder), "-o", str(out), "--device", "cpu",
         "--chunk-size", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        # the video is being written (a.png's own temporary file must not count: it is written first)
        while not (out.is_dir() and any(p.name.startswith(".b.") and ".part" in p.name for p in out.rglob("*"))):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the video started"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert re.fullmatch(r"lowlight: 1 written, 0 skipped, 0 failed; interrupted by SIGTERM, .*", _summary(stdout))
    assert (out / "a.png").is_file() and not (out / "b.mp4").exists()
    assert _no_hidden_files(out)
