"""Animated GIF, APNG and WebP through ``lowlight enhance``: written back as animations of the same format, with
the frame count, durations and loop of the input (issue 18, row 13).

PIL writes every input here: a few small dark frames with different durations.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.pipelines.media.animated_io import AnimationChunk, AnimationReader, write_animation
from comfyui_lowlight.pipelines.media.image_io import ImageFileError, read_image
from media import SHIPPED_SGZ_WEIGHTS, dark_clip_frames

DURATIONS = [80, 120, 200]


def enhance(*args):
    """``lowlight enhance ARGS... --weights SHIPPED --device cpu`` in-process; returns the exit code."""
    return lowlight(["enhance", *map(str, args), "--weights", str(SHIPPED_SGZ_WEIGHTS), "--device", "cpu"])


def _summary(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[-1], captured.err


def _write_animation(path, frames: np.ndarray, durations=DURATIONS, loop=2, **options):
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=list(durations), loop=loop, **options)
    return path


def _frames_and_timing(path) -> tuple[np.ndarray, list[float], int | None, str]:
    with Image.open(path) as image:
        assert image.is_animated
        image_format, loop = image.format, image.info.get("loop")
        frames, durations = [], []
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")).copy())
            durations.append(image.info["duration"])
    return np.stack(frames), durations, loop, image_format


@pytest.mark.parametrize("name, image_format", [("party.gif", "GIF"), ("party.png", "PNG"), ("party.webp", "WEBP")])
def test_an_animation_comes_back_as_an_animation_of_its_format_with_its_timing(name, image_format, tmp_path, capsys):
    frames = dark_clip_frames(3, 24, 32)
    source = _write_animation(tmp_path / name, frames)
    with pytest.raises(ImageFileError, match=rf"{name}: animated {image_format} with 3 frames; read_image reads "
                                             rf"still images only: .*lowlight enhance {name}"):
        read_image(source)  # the still-image API keeps refusing, pointing at the command

    assert enhance(source, "-o", tmp_path / "out") == 0, capsys.readouterr().err
    assert _summary(capsys)[0] == "lowlight: 1 written, 0 skipped, 0 failed"
    written, durations, loop, written_format = _frames_and_timing(tmp_path / "out" / name)
    original, *_ = _frames_and_timing(source)
    assert written_format == image_format and written.shape == original.shape
    assert durations == DURATIONS and loop == 2
    for before, after in zip(original, written):  # every frame brightened, not just the first
        assert after.mean() > before.mean() + 20
    assert [path.name for path in (tmp_path / "out").iterdir()] == [name]  # no .part left


def test_a_transparent_gif_keeps_its_transparency_per_frame(tmp_path, capsys):
    frames = dark_clip_frames(3, 24, 32)
    images = []
    for index, frame in enumerate(frames):
        alpha = np.full(frame.shape[:2], 255, np.uint8)
        alpha[:, : 4 + 8 * index] = 0  # a transparent band that changes width (disposal 2 restores it)
        images.append(Image.fromarray(np.dstack([frame, alpha]), "RGBA"))
    source = tmp_path / "sprite.gif"
    images[0].save(source, save_all=True, append_images=images[1:], duration=DURATIONS, loop=0, disposal=2)

    assert enhance(source, "-o", tmp_path / "out") == 0, capsys.readouterr().err
    with AnimationReader(tmp_path / "out" / "sprite.gif") as reader:
        assert reader.has_alpha and reader.loop == 0 and reader.frame_count == 3
        chunk = next(reader.chunks(8))
    for index in range(3):
        assert (chunk.alpha[index] == 0).sum(axis=1).tolist() == [4 + 8 * index] * 24


def test_frames_are_composited_whole_when_the_gif_stores_only_what_changed(tmp_path):
    # 16 colours: the GIF stores them exactly, so frames can be compared pixel for pixel
    first = np.asarray(Image.fromarray(dark_clip_frames(1, 24, 32)[0]).quantize(16).convert("RGB"))
    second = first.copy()
    second[10:14, 10:14] = 200  # Pillow's GIF writer stores only this square for frame 2
    source = _write_animation(tmp_path / "delta.gif", np.stack([first, second]), durations=[100, 100])
    with Image.open(source) as image:
        image.seek(1)
        assert image.tile[0][1] == (10, 10, 14, 14)  # the file really holds a 4x4 frame 2
    with AnimationReader(source) as reader:
        chunk = next(reader.chunks(8))
    np.testing.assert_array_equal(chunk.pixels[0], first)
    np.testing.assert_array_equal(chunk.pixels[1], second)  # a complete picture, not a 4x4 patch


def test_a_still_gif_goes_the_image_path(tmp_path, capsys):
    source = tmp_path / "still.gif"
    Image.fromarray(dark_clip_frames(1, 24, 32)[0]).save(source)
    loaded = read_image(source)  # not an animation: read_image takes it
    assert enhance(source, "-o", tmp_path / "out") == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "still.gif") as result:
        assert result.format == "GIF" and not getattr(result, "is_animated", False)
        assert np.asarray(result.convert("RGB")).mean() > loaded.pixels.mean() + 20


def test_a_failing_animation_in_a_folder_counts_as_failed_while_the_rest_is_written(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    frames = dark_clip_frames(3, 24, 32)
    _write_animation(folder / "good.gif", frames)
    _write_animation(folder / "good.webp", frames)
    broken = _write_animation(tmp_path / "broken.gif", frames).read_bytes()
    (folder / "broken.gif").write_bytes(broken[: len(broken) * 2 // 3])  # cut off inside the frames
    assert enhance(folder, "-o", tmp_path / "out") == 1
    summary, err = _summary(capsys)
    assert summary == "lowlight: 2 written, 0 skipped, 1 failed"
    assert "failed: " in err and "broken.gif" in err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["good.gif", "good.webp"]  # no debris


def test_scuf_on_an_animation_enhances_every_frame(tmp_path):
    from comfyui_lowlight.pipelines.scuf.batch import enhance_file

    class Brighten:  # the SCUF pipeline's call as enhance_file makes it, without the model
        calls = 0

        def __call__(self, image, prompt=None, output_type="np"):
            Brighten.calls += 1
            return type("Output", (), {"images": [np.clip(image / 255.0 * 2, 0, 1)]})()

    frames = dark_clip_frames(3, 24, 32)
    source = _write_animation(tmp_path / "clip.png", frames)
    enhance_file(Brighten(), source, tmp_path / "out" / "clip.png", prompt=None, show_progress=False)
    written, durations, loop, image_format = _frames_and_timing(tmp_path / "out" / "clip.png")
    assert Brighten.calls == 3 and image_format == "PNG" and durations == DURATIONS and loop == 2
    np.testing.assert_allclose(written.astype(int), np.clip(frames.astype(int) * 2, 0, 255), atol=1)


def test_an_animation_over_the_pixel_limit_in_all_its_frames_is_refused_before_decoding(tmp_path, monkeypatch):
    source = _write_animation(tmp_path / "many.gif", dark_clip_frames(3, 24, 32))
    # each frame (768 pixels) is within the limit, the three together (2304) are over twice 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageFileError, match=r"many\.gif: refused as a possible decompression bomb: 3 frames of "
                                             r"32x24 are 2304 pixels in all"):
        AnimationReader(source)


def test_16bit_apng_is_refused_by_the_animation_reader(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 65535, (8, 8)).astype(np.uint16)) for _ in range(2)]
    source = tmp_path / "clip16.png"
    frames[0].save(source, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageFileError, match=r"clip16\.png: 16-bit animated PNGs are not supported"):
        AnimationReader(source)


def test_the_writer_refuses_a_format_without_animation_and_leaves_nothing(tmp_path):
    chunk = AnimationChunk(dark_clip_frames(2, 8, 8), None, [100, 100])
    with pytest.raises(ImageFileError, match=r"clip\.jpg: \.jpg cannot hold an animation"):
        write_animation(tmp_path / "clip.jpg", [chunk])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("options, smoothing", [((), "default"), (("--no-temporal-smoothing",), 0.0)])
def test_sgz_gives_an_animation_the_video_temporal_smoothing(options, smoothing, tmp_path, monkeypatch, capsys):
    from comfyui_lowlight.pipelines.sgz.options import VIDEO_TEMPORAL_SMOOTHING
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    calls = []
    original = SGZPipeline.__call__

    def recording(self, image, **kwargs):
        calls.append((np.shape(image), kwargs.get("temporal_smoothing"), kwargs.get("video_state")))
        return original(self, image, **kwargs)

    monkeypatch.setattr(SGZPipeline, "__call__", recording)
    source = _write_animation(tmp_path / "clip.webp", dark_clip_frames(3, 24, 32))
    assert enhance(source, "-o", tmp_path / "out", "--chunk-size", "2", *options) == 0, capsys.readouterr().err
    expected = VIDEO_TEMPORAL_SMOOTHING if smoothing == "default" else smoothing
    assert [(shape, value) for shape, value, _ in calls] == [((2, 24, 32, 3), expected), ((1, 24, 32, 3), expected)]
    states = {id(state) for _, _, state in calls}
    assert (calls[0][2] is not None and len(states) == 1) if expected else calls[0][2] is None  # one state, carried


def _gif_transparency_flags(path) -> list[bool]:
    """Each frame's "has a transparent index" flag, from the graphic control extensions of the file."""
    data = path.read_bytes()
    flags, start = [], data.find(b"\x21\xf9\x04")
    while start >= 0:
        flags.append(bool(data[start + 3] & 1))
        start = data.find(b"\x21\xf9\x04", start + 1)
    return flags


@pytest.mark.parametrize("name", ["late.gif", "late.png", "late.webp"])
def test_the_writer_keeps_alpha_that_starts_after_opaque_frames(name, tmp_path):
    frames = dark_clip_frames(3, 8, 8)
    alpha = np.full((2, 8, 8), 255, np.uint8)
    alpha[:, :, :3] = 0
    write_animation(tmp_path / name, [AnimationChunk(frames[:1], None, [100]),
                                      AnimationChunk(frames[1:], alpha, [50, 70])], loop=0)
    if name.endswith(".gif"):  # Pillow reads such a GIF onto an opaque canvas: look at the file itself
        assert _gif_transparency_flags(tmp_path / name) == [False, True, True]
        return
    with AnimationReader(tmp_path / name) as reader:
        chunk = next(reader.chunks(8))
    assert chunk.durations == [100, 50, 70] and (chunk.alpha[0] == 255).all()
    for index in (1, 2):
        assert (chunk.alpha[index][:, :3] == 0).all() and (chunk.alpha[index][:, 3:] == 255).all()
