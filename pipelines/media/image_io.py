"""Robust image file reading and atomic writing, shared by the CLI and the SCUF tools.

``read_image`` turns any common still image into RGB pixels plus an optional alpha channel:

- 8-bit files (JPEG, PNG, BMP, TIFF, WebP, ...) through Pillow -> ``uint8``;
- 16-bit PNG (grey, grey+alpha, RGB, RGBA) through FFmpeg's PNG codec in PyAV -> ``uint16``, because Pillow
  truncates 16-bit colour PNGs to 8 bits; ``write_image`` writes ``uint16`` pixels back as 16-bit PNG, so the
  precision survives a read -> enhance -> write round trip;
- grayscale is expanded to RGB (``LoadedImage.grayscale`` remembers it so the output can be grey again);
- palette images are expanded, transparency becomes alpha; RGBA keeps its alpha;
- CMYK (e.g. print JPEGs) is converted to sRGB, through the embedded ICC profile when there is one;
- the EXIF orientation tag is applied, so the pixels are upright and the tag is not written back; the rest of the
  EXIF (date, camera, exposure, GPS...) is kept in ``LoadedImage.exif`` for ``write_image``, without the thumbnail
  (it shows the unenhanced picture) and without TIFF layout tags;
- animated GIF/PNG/WebP files are refused (taking their first frame would silently drop the rest):
  ``animated_io`` reads them frame by frame, and ``lowlight enhance`` sends them there;
- 16-bit PNGs whose decoded size exceeds Pillow's decompression-bomb limit are refused from the header, before
  any pixel is decoded.

Writes are atomic (``atomic_files.atomic_output``): an interrupted run never leaves a partial image under the
real name.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from .atomic_files import atomic_output

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION = 0x0112
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
_EXIF_PIXEL_X, _EXIF_PIXEL_Y = 0xA002, 0xA003
# IFD0 tags that describe a TIFF file's own layout (or data kept elsewhere: ICC, XMP, IPTC, Photoshop), which
# ``Image.getexif()`` of a TIFF returns along with the real metadata; none of them may travel to another file.
_TIFF_LAYOUT_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 290, 291, 292, 293, 317, 318,
    319, 320, 321, 322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, 513, 514, 529, 530, 531, 532, 700, 33723,
    34377, 34675, _EXIF_ORIENTATION,
})
# Formats whose files may hold several frames of an animation (multi-page TIFF and MPO previews are not animations).
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
# Formats that can store an alpha channel when Pillow writes them.
_ALPHA_FORMATS = frozenset({"PNG", "TIFF", "WEBP", "GIF"})  # GIF: on or off per pixel
_GIF_TRANSPARENT_INDEX = 255


class ImageFileError(ValueError):
    """An image file could not be read or written; the message names the file."""


@dataclass
class LoadedImage:
    """An upright RGB image read from a file.

    Attributes:
        pixels: ``[H, W, 3]`` RGB, ``uint8`` (0..255) or ``uint16`` (0..65535, 16-bit PNG only).
        alpha: ``[H, W]`` of the same dtype, or ``None`` when the file has no transparency.
        grayscale: the file had a single colour channel (``pixels`` then holds three equal channels).
        icc_profile: the embedded ICC profile of an RGB/grey file (``None`` for CMYK, which is converted to sRGB).
        exif: the file's EXIF as bytes for ``write_image``, without orientation (the pixels are upright), thumbnail
            and TIFF layout tags; ``None`` when there is none.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    grayscale: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def bit_depth(self) -> int:
        """8 or 16 bits per channel."""
        return 16 if self.pixels.dtype == np.uint16 else 8

    def to_float(self) -> np.ndarray:
        """``[H, W, 3]`` float32 RGB in 0..1."""
        return self.pixels.astype(np.float32) / float(np.iinfo(self.pixels.dtype).max)


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file as upright RGB (+ alpha), see the module docstring for the conversions.

    Raises:
        ImageFileError: the file cannot be opened, is not an image, is truncated/corrupt, or has a pixel format
            with no RGB meaning (e.g. 32-bit float); the message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            header = handle.read(33)
    except OSError as error:
        raise ImageFileError(f"{path}: cannot open ({error.strerror or error})") from error
    try:
        if header.startswith(_PNG_SIGNATURE) and len(header) >= 26 and header[24] == 16:
            width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
            _refuse_png16_bomb(path, width, height, has_alpha=header[25] in (4, 6))
            return _read_png16(path, colour_type=header[25])
        return _read_with_pillow(path)
    except ImageFileError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        # Pillow reports corrupt data as OSError/SyntaxError/ValueError depending on the codec; PyAV as OSError.
        raise ImageFileError(f"{path}: not a readable image ({error})") from error


def _read_with_pillow(path: Path) -> LoadedImage:
    with Image.open(path) as image:  # Pillow refuses decompression bombs here, from the header
        _refuse_animation(path, image)
        exif = _read_exif(image)  # before load(), which closes a TIFF
        image.load()  # decode now: truncated or corrupt data fails here, not later
        image = ImageOps.exif_transpose(image)
    exif = _exif_to_keep(exif, image.size)
    icc_profile = image.info.get("icc_profile")
    mode = image.mode
    if mode == "CMYK":
        return LoadedImage(np.array(_cmyk_to_srgb(image, icc_profile)), grayscale=False, exif=exif)
    if mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit grey from TIFF/PGM (16-bit PNG takes the PyAV path); "I" is Pillow's 32-bit container for it.
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        return LoadedImage(np.repeat(grey[..., None], 3, axis=2), grayscale=True, icc_profile=icc_profile, exif=exif)
    if mode == "F":
        raise ImageFileError(f"{path}: 32-bit float images are not supported (expected 8 or 16 bits per channel)")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info
    grayscale = mode in ("1", "L", "LA", "La")
    # np.array copies: Pillow's buffers are read-only, and callers (torch.from_numpy) want writable arrays.
    rgba = np.array(image.convert("RGBA" if has_alpha else "RGB"))
    pixels = np.ascontiguousarray(rgba[..., :3])
    alpha = np.ascontiguousarray(rgba[..., 3]) if has_alpha else None
    return LoadedImage(pixels, alpha, grayscale, icc_profile, exif)


def _refuse_animation(path: Path, image: Image.Image) -> None:
    """An animated GIF/APNG/WebP is a clip: enhancing its first frame as a still would silently lose the rest."""
    if image.format in _ANIMATED_FORMATS and getattr(image, "is_animated", False):
        raise ImageFileError(
            f"{path}: animated {image.format} with {image.n_frames} frames; read_image reads still images only: "
            f"read its frames with pipelines.media.animated_io.AnimationReader, or enhance it with "
            f"`lowlight enhance {path.name} -o OUT`, which writes an animated {image.format} back"
        )


def _read_exif(image: Image.Image) -> Image.Exif:
    """``image.getexif()`` with its Exif, GPS and interoperability IFDs read now: Pillow reads them lazily from
    the file, which ``load()`` closes for a TIFF."""
    exif = image.getexif()
    try:
        for tag in (_EXIF_IFD, _GPS_IFD, _INTEROP_IFD):
            exif.get_ifd(tag)
    except Exception:  # noqa: BLE001  malformed EXIF: _exif_to_keep drops it
        pass
    return exif


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied: orientations 5-8 swap the sides."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _exif_to_keep(exif: Image.Exif, upright_size: tuple[int, int]) -> bytes | None:
    """The EXIF worth writing into the enhanced file, as bytes (``None`` if nothing is left).

    Kept: camera, date, exposure, GPS... Dropped: the orientation (the pixels are transposed upright), the
    thumbnail (IFD1, a small copy of the unenhanced picture: ``Exif.tobytes`` writes IFD0 and its sub-IFDs only),
    and TIFF layout tags. The pixel dimensions of the Exif IFD are set to the upright size.
    """
    try:
        return _serialise_kept_exif(exif, upright_size)
    except Exception:  # noqa: BLE001  malformed EXIF fails in Pillow in many ways: lose the metadata, not the image
        return None


def _serialise_kept_exif(exif: Image.Exif, upright_size: tuple[int, int]) -> bytes | None:
    sub_ifds = {tag: dict(exif.get_ifd(tag)) for tag in (_EXIF_IFD, _GPS_IFD) if tag in exif}
    kept = Image.Exif()
    for tag, value in exif.items():
        if tag not in _TIFF_LAYOUT_TAGS and tag not in sub_ifds:
            kept[tag] = value
    for tag, entries in sub_ifds.items():
        if tag == _EXIF_IFD:
            for dimension_tag, dimension in zip((_EXIF_PIXEL_X, _EXIF_PIXEL_Y), upright_size):
                if dimension_tag in entries:
                    entries[dimension_tag] = dimension
            if _INTEROP_IFD in entries:  # an offset into the source's bytes: written again as a nested IFD
                interop = dict(exif.get_ifd(_INTEROP_IFD))
                if interop:
                    entries[_INTEROP_IFD] = interop
                else:
                    del entries[_INTEROP_IFD]
        if entries:
            kept.get_ifd(tag).update(entries)
    return kept.tobytes() if len(kept) or any(sub_ifds.values()) else None


def _refuse_png16_bomb(path: Path, width: int, height: int, has_alpha: bool) -> None:
    """Refuse, from the header, a 16-bit PNG that would decode to more memory than Pillow allows an 8-bit one.

    ``Image.MAX_IMAGE_PIXELS`` counts pixels whatever their size, and Pillow refuses above twice that; it stores an
    8-bit RGB(A) pixel in 4 bytes, so that is the byte budget here. Our 16-bit decode holds 6 (RGB) or 8 (RGBA)
    bytes per pixel, hence a lower pixel limit (``MAX_IMAGE_PIXELS = None`` turns the check off, as in Pillow).
    """
    if Image.MAX_IMAGE_PIXELS is None:
        return
    budget = 2 * Image.MAX_IMAGE_PIXELS * 4
    needed = width * height * (8 if has_alpha else 6)
    if needed > budget:
        raise ImageFileError(
            f"{path}: refused as a possible decompression bomb: a {width}x{height} 16-bit PNG decodes to "
            f"{needed / 1e9:.2f} GB, over the {budget / 1e9:.2f} GB allowed (twice PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS} pixels of 4 bytes); raise Image.MAX_IMAGE_PIXELS if the file is trusted"
        )


def _cmyk_to_srgb(image: Image.Image, icc_profile: bytes | None) -> np.ndarray:
    if icc_profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            return np.asarray(converted)
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken embedded profile: fall back to the naive conversion below
    return np.asarray(image.convert("RGB"))


def _read_png16(path: Path, colour_type: int) -> LoadedImage:
    import av  # PyAV bundles FFmpeg's PNG codec, which keeps all 16 bits of every channel

    has_alpha = colour_type in (4, 6)  # grey+alpha, RGBA
    with Image.open(path) as header_only:  # Pillow reads the header and eXIf chunk without decoding pixels
        _refuse_animation(path, header_only)
        exif = header_only.getexif()
        orientation = exif.get(_EXIF_ORIENTATION, 1)
        icc_profile = header_only.info.get("icc_profile")
        exif = _exif_to_keep(exif, _upright_size(header_only.size, orientation))  # eXIf: Pillow upright nothing
    decoder = av.CodecContext.create("png", "r")
    try:
        frames = list(decoder.decode(av.Packet(path.read_bytes()))) + list(decoder.decode(None))
    except av.FFmpegError as error:
        raise ImageFileError(f"{path}: not a readable image ({error})") from error
    if not frames:
        raise ImageFileError(f"{path}: not a readable image (16-bit PNG with no decodable frame)")
    array = frames[0].to_ndarray(format="rgba64le" if has_alpha else "rgb48le")
    array = _apply_exif_orientation(array, orientation)
    pixels = np.ascontiguousarray(array[..., :3])
    alpha = np.ascontiguousarray(array[..., 3]) if has_alpha else None
    return LoadedImage(pixels, alpha, grayscale=colour_type in (0, 4), icc_profile=icc_profile, exif=exif)


def _apply_exif_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Same transforms as ``PIL.ImageOps.exif_transpose`` on an ``[H, W, C]`` array."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=1)[::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    return transforms[orientation](array) if orientation in transforms else array


def to_integer_pixels(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Quantise float pixels in 0..1 (any shape) to ``uint8`` or ``uint16`` with rounding and clipping."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth: expected 8 or 16, got {bit_depth}")
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    maximum = float(np.iinfo(dtype).max)
    return np.clip(np.asarray(image, dtype=np.float32) * maximum + 0.5, 0.0, maximum).astype(dtype)


def write_image(
    path: str | os.PathLike,
    pixels: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    grayscale: bool = False,
    icc_profile: bytes | None = None,
    quality: int = 95,
    exif: bytes | None = None,
) -> Path:
    """Write RGB pixels (+ alpha) atomically; the format follows the file extension.

    Args:
        path: destination; its folder must exist. An existing file is replaced (callers decide about overwriting).
        pixels: ``[H, W, 3]`` RGB, ``uint8``, ``uint16`` or float in 0..1 (quantised to 8 bits).
            ``uint16`` is written as 16-bit PNG for ``.png``; other formats store 8 bits.
        alpha: ``[H, W]`` of the same kind as ``pixels``, or ``None``. Formats without alpha (JPEG, BMP) raise.
        grayscale: write a single grey channel (the mean of R, G, B).
        icc_profile: embedded in formats that carry one (JPEG, PNG, TIFF, WebP).
        quality: JPEG/WebP quality.
        exif: EXIF bytes (``LoadedImage.exif``) embedded in JPEG, PNG (8 and 16 bits), TIFF and WebP; BMP has none.
    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    pixels = _as_integer(pixels, "pixels", path)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageFileError(f"{path}: pixels must be [H, W, 3], got {pixels.shape}")
    if alpha is not None:
        alpha = _as_integer(alpha, "alpha", path, bit_depth=8 * pixels.itemsize)
        if alpha.shape != pixels.shape[:2]:
            raise ImageFileError(f"{path}: alpha must be {pixels.shape[:2]}, got {alpha.shape}")
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ImageFileError(f"{path}: unknown image extension {path.suffix!r} (expected one of {sorted(IMAGE_EXTENSIONS)})")
    if alpha is not None and image_format not in _ALPHA_FORMATS:
        raise ImageFileError(f"{path}: {image_format} cannot store an alpha channel (use .png, .tif or .webp)")
    if grayscale:
        # Mean of the three enhanced channels (the model may tint a grey input slightly), kept as [H, W, 3].
        mean = pixels.astype(np.float32).mean(axis=2, keepdims=True)
        grey = np.clip(mean + 0.5, 0, np.iinfo(pixels.dtype).max).astype(pixels.dtype)
        pixels = np.repeat(grey, 3, axis=2)
    if pixels.dtype == np.uint16 and image_format != "PNG":
        pixels, alpha = (_to_8bit(pixels), None if alpha is None else _to_8bit(alpha))
    with atomic_output(path) as temporary:
        if pixels.dtype == np.uint16:
            _write_png16(temporary, pixels, alpha, grayscale, exif)
        else:
            _write_with_pillow(temporary, image_format, pixels, alpha, grayscale, icc_profile, quality, exif)
    return path


def _as_integer(array: np.ndarray, name: str, path: Path, bit_depth: int = 8) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype in (np.uint8, np.uint16):
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageFileError(f"{path}: {name} contains NaN or inf")
        return to_integer_pixels(array, bit_depth)
    raise ImageFileError(f"{path}: {name} must be uint8, uint16 or float in 0..1, got {array.dtype}")


def _to_8bit(array: np.ndarray) -> np.ndarray:
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def gif_palette_frame(pixels: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """``uint8`` RGB ``[H, W, 3]`` (+ alpha) as a GIF frame: its own adaptive palette (median cut, 256 colours, or
    255 and a transparent index where alpha < 128), Floyd-Steinberg dithered against banding in smooth dark
    gradients."""
    if alpha is not None and not (np.asarray(alpha) < 128).any():
        alpha = None  # opaque: all 256 colours, no transparent index
    rgb = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
    colours = 256 if alpha is None else 255
    palette = rgb.quantize(colours, method=Image.Quantize.MEDIANCUT)
    frame = rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    if alpha is not None:
        indices = np.array(frame)
        indices[np.asarray(alpha) < 128] = _GIF_TRANSPARENT_INDEX
        entries = frame.getpalette()[: 3 * colours]
        frame = Image.fromarray(indices, "P")
        frame.putpalette(entries + [0, 0, 0] * (256 - colours))
        frame.info["transparency"] = _GIF_TRANSPARENT_INDEX
    return frame


def _write_with_pillow(path, image_format, pixels, alpha, grayscale, icc_profile, quality, exif) -> None:
    if image_format == "GIF":  # a still GIF: no EXIF or ICC in Pillow's GIF writer
        frame = gif_palette_frame(pixels, alpha)
        frame.save(path, format="GIF", **({"transparency": _GIF_TRANSPARENT_INDEX} if alpha is not None else {}))
        return
    if grayscale:
        image = Image.fromarray(pixels[..., 0], "L")
        if alpha is not None:
            image = Image.merge("LA", (image, Image.fromarray(alpha, "L")))
    elif alpha is not None:
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    else:
        image = Image.fromarray(pixels, "RGB")
    options = {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    # A JPEG APP1 segment holds at most 64 KB: larger EXIF (only possible from a PNG/TIFF source) is left out.
    if exif and image_format in ("PNG", "TIFF", "WEBP") or (exif and image_format == "JPEG" and len(exif) <= 65533):
        options["exif"] = exif
    if image_format in ("JPEG", "WEBP"):
        options["quality"] = quality
    image.save(path, format=image_format, **options)


def _write_png16(path: Path, pixels: np.ndarray, alpha: np.ndarray | None, grayscale: bool,
                 exif: bytes | None = None) -> None:
    import av

    if alpha is not None:
        # Grey + alpha is written as RGBA: FFmpeg's RGB -> grey+alpha conversion is not exact at 16 bits.
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.dstack([pixels, alpha])), format="rgba64le")
        png_format = "rgba64be"
    elif grayscale:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[..., 0]), format="gray16le")
        png_format = "gray16be"
    else:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb48le")
        png_format = "rgb48be"
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = pixels.shape[1], pixels.shape[0], png_format
    # PNG stores big-endian samples; this reformat is a byte swap, exact.
    packets = list(encoder.encode(frame.reformat(format=png_format))) + list(encoder.encode(None))
    png = b"".join(bytes(packet) for packet in packets)
    with open(path, "wb") as handle:
        handle.write(_with_exif_chunk(png, exif) if exif else png)


def _with_exif_chunk(png: bytes, exif: bytes) -> bytes:
    """``png`` with an eXIf chunk right after IHDR (FFmpeg's PNG encoder writes no EXIF)."""
    import struct
    import zlib

    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif  # the chunk holds the TIFF structure alone
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    end_of_ihdr = len(_PNG_SIGNATURE) + 8 + 13 + 4  # length, type, 13 data bytes, CRC
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]
