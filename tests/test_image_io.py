"""Image file IO: every odd input kind reads as upright RGB (+ alpha), writes keep precision, writes are atomic."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from comfyui_lowlight.pipelines.media import atomic_files
from comfyui_lowlight.pipelines.media.image_io import ImageFileError, read_image, to_integer_pixels, write_image


def _png16_bytes(array: np.ndarray) -> bytes:
    """A minimal independent 16-bit PNG encoder (filter 0 on every row) for RGB or RGBA ``uint16`` arrays."""
    height, width, channels = array.shape
    colour_type = {3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _random(shape, dtype, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


def test_rgb_jpeg_reads_as_uint8_rgb(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (32, 20), (200, 30, 10)).save(path, quality=95)
    image = read_image(path)
    assert image.pixels.shape == (20, 32, 3) and image.pixels.dtype == np.uint8
    assert image.alpha is None and not image.grayscale and image.bit_depth == 8
    assert abs(int(image.pixels[..., 0].mean()) - 200) <= 3
    assert image.to_float().dtype == np.float32 and image.to_float().max() <= 1.0


def test_grayscale_expands_to_rgb_and_writes_back_grey(tmp_path):
    grey = _random((12, 10), np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    assert image.grayscale and image.pixels.shape == (12, 10, 3)
    assert (image.pixels == grey[..., None]).all()
    write_image(tmp_path / "out.png", image.pixels, grayscale=True)
    with Image.open(tmp_path / "out.png") as written:
        assert written.mode == "L"
        assert (np.asarray(written) == grey).all()


def test_rgba_alpha_is_kept_through_a_round_trip(tmp_path):
    rgba = _random((9, 11, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert (image.pixels == rgba[..., :3]).all() and (image.alpha == rgba[..., 3]).all()
    write_image(tmp_path / "b.png", image.pixels, image.alpha)
    with Image.open(tmp_path / "b.png") as written:
        assert written.mode == "RGBA" and (np.asarray(written) == rgba).all()


def test_palette_transparency_becomes_alpha(tmp_path):
    image = Image.new("P", (6, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = read_image(tmp_path / "p.png")
    assert loaded.alpha is not None and loaded.alpha[1, 1] == 255 and loaded.alpha[0, 0] == 0
    assert tuple(loaded.pixels[1, 1]) == (255, 0, 0)


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_png_keeps_all_16_bits(tmp_path, channels):
    array = _random((7, 13, channels), np.uint16)
    (tmp_path / "in.png").write_bytes(_png16_bytes(array))
    image = read_image(tmp_path / "in.png")
    assert image.bit_depth == 16 and image.pixels.dtype == np.uint16
    assert (image.pixels == array[..., :3]).all()
    assert (image.alpha == array[..., 3]).all() if channels == 4 else image.alpha is None
    # float round trip at 16 bits is lossless, and the written file is a 16-bit PNG again
    requantised = to_integer_pixels(image.to_float(), bit_depth=16)
    assert (requantised == array[..., :3]).all()
    write_image(tmp_path / "out.png", requantised, image.alpha)
    header = (tmp_path / "out.png").read_bytes()[:26]
    assert header[24] == 16 and header[25] == (6 if channels == 4 else 2)
    again = read_image(tmp_path / "out.png")
    assert (again.pixels == array[..., :3]).all()


def test_16bit_grey_png_from_pillow(tmp_path):
    grey = _random((8, 5), np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.grayscale and image.bit_depth == 16 and (image.pixels == grey[..., None]).all()
    write_image(tmp_path / "out.png", image.pixels, grayscale=True)
    again = read_image(tmp_path / "out.png")
    assert again.grayscale and (again.pixels[..., 0] == grey).all()


def test_16bit_written_to_jpeg_is_reduced_to_8bit(tmp_path):
    pixels = np.full((4, 4, 3), 65535, np.uint16)
    write_image(tmp_path / "out.jpg", pixels)
    assert read_image(tmp_path / "out.jpg").pixels.min() >= 250


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # full magenta + yellow = red
    image = read_image(tmp_path / "cmyk.jpg")
    assert image.pixels.shape == (8, 16, 3) and image.icc_profile is None
    red, green, blue = image.pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :5] = 255  # white marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    image = read_image(tmp_path / "rotated.jpg")
    assert image.pixels.shape == (40, 20, 3)  # upright: width and height swapped
    assert image.pixels[:5, -5:].mean() > 200 and image.pixels[:5, :5].mean() < 50  # marker now top-right


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not an image", None],  # None: a JPEG cut in half
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_files_raise_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content is None:
        Image.fromarray(_random((64, 64, 3), np.uint8)).save(tmp_path / "good.jpg")
        data = (tmp_path / "good.jpg").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageFileError, match="broken.jpg"):
        read_image(path)


def test_corrupt_16bit_png_raises_naming_the_file(tmp_path):
    data = _png16_bytes(_random((6, 6, 3), np.uint16))
    (tmp_path / "bad16.png").write_bytes(data[:40] + b"\x00" * 20)
    with pytest.raises(ImageFileError, match="bad16.png"):
        read_image(tmp_path / "bad16.png")


def test_missing_file_raises_naming_the_file(tmp_path):
    with pytest.raises(ImageFileError, match="nowhere.png"):
        read_image(tmp_path / "nowhere.png")


def test_to_integer_pixels_rounds_and_clips():
    values = np.array([-0.5, 0.0, 0.5 / 255, 1.0, 2.0], np.float32)
    assert to_integer_pixels(values).tolist() == [0, 0, 1, 255, 255]
    assert to_integer_pixels(values, 16).tolist() == [0, 0, 129, 65535, 65535]


def test_write_rejects_alpha_in_jpeg_and_nan(tmp_path):
    pixels = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ImageFileError, match="alpha"):
        write_image(tmp_path / "a.jpg", pixels, np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageFileError, match="NaN"):
        write_image(tmp_path / "b.png", np.full((4, 4, 3), np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_destination_untouched_and_no_temp_file(tmp_path, monkeypatch):
    destination = tmp_path / "out.png"
    destination.write_bytes(b"previous content")

    def failing_save(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")  # a write that dies half way
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(destination, np.zeros((4, 4, 3), np.uint8))
    assert destination.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_temporary_name_is_hidden_beside_the_destination_and_keeps_the_extension(tmp_path):
    temporary = atomic_files.temporary_path_for(tmp_path / "photo.jpg")
    assert temporary.parent == tmp_path and temporary.name.startswith(".") and temporary.suffix == ".jpg"
