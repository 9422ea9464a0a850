"""Issue 18's reliability cases: no silent wrong output, errors that say what to do.

Each test makes its own input (PIL writes EXIF, animated images and header-only bombs; PyAV writes truncated and
10-bit videos) and fails on the behaviour the issue reported.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.pipelines.media import image_io
from comfyui_lowlight.pipelines.media.image_io import ImageFileError, read_image, write_image
from media import SHIPPED_SGZ_WEIGHTS, camera_exif, cut_off_copy, dark_clip_frames, dark_scene, write_video


def enhance(*args):
    """``lowlight enhance ARGS... --weights SHIPPED --device cpu`` in-process; returns the exit code."""
    return lowlight(["enhance", *map(str, args), "--weights", str(SHIPPED_SGZ_WEIGHTS), "--device", "cpu"])


def _summary(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[-1], captured.err


# ------------------------------------------------------------------------------- row 2: a cut-off video fails


def test_cut_off_mp4_fails_with_the_shortfall_and_leaves_nothing(tmp_path, capsys):
    full = write_video(tmp_path / "full.mp4", dark_clip_frames(60, 48, 64), with_audio=True, index_first=True)
    cut = cut_off_copy(full, tmp_path / "cut.mp4", 0.6)  # 36 of 60 frames are there; the index lists 60
    assert enhance(cut, "-o", tmp_path / "out") == 1
    summary, err = _summary(capsys)
    assert summary == "lowlight: 0 written, 0 skipped, 1 failed"
    # B-frames: the last frames decoded before the cut are shown up to about 1.6 s
    assert re.search(r"cut\.mp4: the video ends after 36 of the 60 frames its header announces \(1\.\d\d s of "
                     r"2\.50 s\): the file is truncated", err), err
    assert "--max-frames 36" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no partial output, no .part
    # what the message suggests works: the part that is there
    assert enhance(cut, "-o", tmp_path / "out", "--max-frames", "36") == 0
    from media import decoded_pts_and_frames

    assert len(decoded_pts_and_frames(tmp_path / "out" / "cut.mp4")) == 36
    capsys.readouterr()


def test_a_complete_mp4_with_the_index_first_is_not_reported(tmp_path, capsys):
    full = write_video(tmp_path / "full.mp4", dark_clip_frames(12, 48, 64), index_first=True)
    assert enhance(full, "-o", tmp_path / "out") == 0
    assert _summary(capsys)[0] == "lowlight: 1 written, 0 skipped, 0 failed"


# --------------------------------------------------------------------- row 4: HDR / 10-bit video refused


@pytest.mark.parametrize("pix_fmt, color_trc, expected", [
    ("yuv420p10le", 16, r"HDR video \(PQ \(SMPTE ST 2084\) transfer, 10-bit yuv420p10le\) is not supported"),
    ("yuv420p", 18, r"HDR video \(HLG \(ARIB STD-B67\) transfer, 8-bit yuv420p\) is not supported"),
    ("yuv420p10le", None, r"10-bit video \(yuv420p10le\) is not supported: it would silently come out with 8 bits"),
])
def test_hdr_and_10bit_video_is_refused_not_flattened_to_sdr(pix_fmt, color_trc, expected, tmp_path, capsys):
    from comfyui_lowlight.pipelines.media.video_io import VideoFileError, VideoReader

    source = write_video(tmp_path / "hdr.mp4", dark_clip_frames(4, 48, 64), pix_fmt=pix_fmt, color_trc=color_trc)
    with pytest.raises(VideoFileError, match=rf"hdr\.mp4: {expected}"):
        VideoReader(source)
    assert enhance(source, "-o", tmp_path / "out") == 1
    summary, err = _summary(capsys)
    assert summary == "lowlight: 0 written, 0 skipped, 1 failed" and "is not supported" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------------------------- row 7: EXIF kept


def _thumbnail() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["photo.jpg", "photo.png", "photo.webp", "photo.tif", "photo16.png"])
def test_exif_is_kept_except_orientation_and_thumbnail(name, tmp_path, capsys):
    thumbnail = _thumbnail()
    pixels = dark_scene(48, 64)  # stored sideways: orientation 6 turns it to 48 wide, 64 high
    source = tmp_path / name
    if name == "photo16.png":
        write_image(source, pixels.astype(np.uint16) * 257, exif=camera_exif(6, thumbnail))
    else:
        Image.fromarray(pixels).save(source, exif=camera_exif(6, thumbnail))
    assert enhance(source, "-o", tmp_path / "out") == 0, capsys.readouterr().err
    output = tmp_path / "out" / name
    with Image.open(output) as result:
        assert result.size == (48, 64)
        exif = result.getexif()
        raw = result.info.get("exif", b"") or exif.tobytes()
    assert exif[0x010F] == "Canon" and exif[0x0110] == "EOS R6"
    assert exif.get_ifd(0x8769)[0x9003] == "2024:01:02 03:04:05"  # capture date
    assert exif.get_ifd(0x8769)[0xA002] == 48 and exif.get_ifd(0x8769)[0xA003] == 64  # upright size
    assert exif.get_ifd(0x8825)[2] == (52.0, 31.0, 12.0)  # GPS latitude
    if not name.endswith(".tif"):  # Pillow reads no interoperability IFD back from a TIFF
        assert exif.get_ifd(0xA005) == {1: "R98", 2: b"0100"}  # re-linked, not a stale offset into the source
    assert 0x0112 not in exif  # the pixels are upright: a kept orientation would rotate them again
    assert thumbnail not in raw and not exif.get_ifd(-1)  # no IFD1 thumbnail of the unenhanced picture
    assert read_image(output).pixels.shape == (64, 48, 3)


def test_tiff_layout_tags_do_not_travel_to_a_jpeg(tmp_path, capsys):
    source = tmp_path / "scan.tif"
    Image.fromarray(dark_scene(30, 40)).save(source, exif=camera_exif())
    assert enhance(source, "-o", tmp_path / "out.jpg") == 0
    with Image.open(tmp_path / "out.jpg") as result:
        exif = result.getexif()
    assert exif[0x010F] == "Canon"
    assert not {256, 257, 273, 279} & set(exif)  # the TIFF's width, height, strip offsets and sizes


# --------------------------------------------------------------------- row 12: 16-bit PNG bomb refused early


def _png_header_only(path: Path, width: int, height: int, colour_type: int = 2) -> Path:
    """A 16-bit PNG signature + IHDR + empty IDAT + IEND: a huge announced size in a few dozen bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_16bit_png_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    # 16000 x 12000 = 192 MP of 16-bit RGB: 1.15 GB decoded (what the 400 KB file announced)
    bomb = _png_header_only(tmp_path / "bomb.png", 16000, 12000)
    with pytest.raises(ImageFileError, match=r"decompression bomb: a 16000x12000 16-bit PNG decodes to 1\.15 GB"):
        read_image(bomb)


def test_16bit_png_over_the_byte_budget_is_never_decoded(tmp_path, monkeypatch):
    source = write_image(tmp_path / "big.png", np.full((100, 120, 3), 1000, np.uint16))
    # 12000 pixels of 6 bytes against a budget of 2 x 5000 x 4 bytes: refused, though an 8-bit one would pass
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the PNG was decoded")

    import av

    monkeypatch.setattr(av.CodecContext, "create", no_decoding)
    with pytest.raises(ImageFileError, match=r"big\.png: refused as a possible decompression bomb: a 120x100"):
        read_image(source)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's switch to turn the check off
    with pytest.raises(AssertionError, match="decoded"):
        read_image(source)


# --------------------------------------- row 13: animated images enhanced as animations (tests/test_animated_images.py)


@pytest.mark.parametrize("name", ["clip.gif", "clip.png", "clip.webp"])
def test_animated_image_is_not_cut_to_its_first_frame(name, tmp_path, capsys):
    frames = [Image.fromarray(dark_scene(24, 32, seed=seed)) for seed in range(3)]
    source = tmp_path / name
    frames[0].save(source, save_all=True, append_images=frames[1:], duration=100, loop=0)
    # the still-image API refuses it, pointing at the command that handles it
    with pytest.raises(ImageFileError, match=rf"{name}: animated .* with 3 frames; read_image reads still images "
                                             rf"only: .*lowlight enhance {name} -o OUT"):
        read_image(source)
    assert enhance(source, "-o", tmp_path / "out") == 0
    assert _summary(capsys)[0] == "lowlight: 1 written, 0 skipped, 0 failed"
    with Image.open(tmp_path / "out" / name) as result:
        assert result.is_animated and result.n_frames == 3


def test_animated_16bit_png_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 65535, (8, 8)).astype(np.uint16)) for _ in range(2)]
    source = tmp_path / "clip16.png"
    frames[0].save(source, save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(source).is_animated and source.read_bytes()[24] == 16  # the 16-bit reading path
    with pytest.raises(ImageFileError, match="animated PNG with 2 frames"):
        read_image(source)


# ---------------------------------------------------------------------- row 14: trainers on empty/corrupt data


def _data_folders(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    (corrupt / "sub").mkdir(parents=True)
    (corrupt / "a.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (corrupt / "sub" / "b.png").write_bytes(np.random.default_rng(0).bytes(300))
    return {"empty": empty, "corrupt": corrupt}


@pytest.mark.parametrize("case, expected", [
    ("empty", "it holds no image files; put low-light photos"),
    ("corrupt", "none of its 2 image files could be read; put low-light photos"),
])
def test_train_sgz_on_unusable_data_is_one_line_exit_2(case, expected, tmp_path, capsys):
    folder = _data_folders(tmp_path)[case]
    code = lowlight(["train", "sgz", "--data", str(folder), "--output", str(tmp_path / "out"), "--max-steps", "1",
                     "--no-semantic", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"--data {folder}: {expected}" in error_lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case, expected", [
    ("empty", "--low: no images (extensions"),
    ("corrupt", "--low: none of the 2 image files could be read (e.g. "),
])
def test_train_scuf_on_unusable_data_is_one_line_saying_what_to_do(case, expected, tmp_path, capsys):
    folder = _data_folders(tmp_path)[case]
    code = lowlight(["train", "scuf", "--low", str(folder), "--normal", str(folder), "--output", str(tmp_path / "out"),
                     "--pretrained", str(tmp_path / "no-model"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert expected in line
    assert "put the training images there" in line or "replace them with readable images" in line


# ------------------------------------- the SGZ segmentation backbone and training state go through weights_files


class _Exploit:
    """Pickled, calls ``os.system`` on load: must be refused without running."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_sgz_backbone_and_training_state_refuse_pickled_code_with_our_message(tmp_path):
    import torch

    from comfyui_lowlight.pipelines.sgz import segmentation
    from comfyui_lowlight.pipelines.sgz import trainer
    from comfyui_lowlight.pipelines.weights_files import WeightsFileError

    marker = tmp_path / "ran"
    backbone = tmp_path / "backbone.pth"
    torch.save({"stem.weight": _Exploit(marker)}, backbone)
    with pytest.raises(WeightsFileError, match=r"backbone\.pth: refused to load: it contains code: .*system"):
        segmentation._load_state_dict(backbone)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"")
    torch.save({"step": 3, "optimizer": _Exploit(marker)}, run / "last_state.pt")
    with pytest.raises(WeightsFileError, match=r"last_state\.pt: refused to load: it contains code"):
        trainer.load_training_state(run)
    assert not marker.exists()
    with pytest.raises(WeightsFileError, match="not a valid safetensors file"):
        (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(0).bytes(200))
        segmentation._load_state_dict(tmp_path / "random.safetensors")


# ------------------------------------------------------------------------------- row 15: SCUF keeps alpha


from tiny_scuf import tiny_scuf  # noqa: E402,F401  session fixture: the tiny random SCUF model


def test_scuf_keeps_alpha_in_the_pipeline_and_the_command_core(tiny_scuf, tmp_path):  # noqa: F811
    import torch

    from comfyui_lowlight.pipelines.scuf.batch import enhance_file

    pipe = tiny_scuf.pipeline()
    rgb = tiny_scuf.image("img64x64").resize((36, 20))  # not a multiple of 8: resized and back, alpha untouched
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    alpha = np.asarray(rgba)[:, :, 3]

    out = pipe(rgba).images[0]
    assert out.mode == "RGBA" and out.size == rgb.size
    np.testing.assert_array_equal(np.asarray(out)[:, :, 3], alpha)
    np.testing.assert_array_equal(np.asarray(out)[:, :, :3], np.asarray(pipe(rgb).images[0]))

    array = np.asarray(rgba).astype(np.uint16) * 257  # 16-bit HxWx4
    result = pipe(array, output_type="np").images[0]
    assert result.shape == (20, 36, 4)
    np.testing.assert_allclose(result[:, :, 3], alpha / 255, atol=1e-7)
    tensor = torch.from_numpy(np.asarray(rgba).copy()).permute(2, 0, 1)[None]  # uint8 [1, 4, H, W]
    result = pipe(tensor, output_type="pt").images
    assert result.shape == (1, 4, 20, 36)
    assert torch.equal(result[0, 3], torch.from_numpy(alpha / np.float32(255)))

    # the command's core (lowlight enhance --method scuf): 8-bit and 16-bit RGBA PNGs keep their alpha
    for name, pixels in (("a8.png", np.asarray(rgba)), ("a16.png", array)):
        write_image(tmp_path / name, pixels[:, :, :3], pixels[:, :, 3])
        enhance_file(pipe, tmp_path / name, tmp_path / "out" / name, prompt=None)
        written = read_image(tmp_path / "out" / name)
        np.testing.assert_array_equal(written.alpha, pixels[:, :, 3])
