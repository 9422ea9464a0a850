"""Animated GIF, PNG (APNG) and WebP files: read their frames, write enhanced frames back as the same kind of file.

``read_image`` refuses these files (a still would silently lose every frame but the first); ``lowlight enhance``
sends them here instead:

- :class:`AnimationReader` decodes one frame at a time (Pillow composites each one, applying GIF disposal and
  APNG blending, so every frame is a complete picture) as ``uint8`` RGB plus alpha when the file is transparent,
  with its duration; the loop count, ICC profile and EXIF are read once. A file whose frames together hold more
  pixels than Pillow allows one image (twice ``Image.MAX_IMAGE_PIXELS``) is refused before any frame is decoded,
  as Pillow refuses a still decompression bomb.
- :func:`write_animation` writes frames atomically (``atomic_files.atomic_output``) as an animated GIF, PNG or
  WebP (from the extension), keeping each frame's duration and the loop count. GIF frames get their own adaptive
  256-colour palette (``image_io.gif_palette_frame``); ICC and EXIF go into PNG and WebP.

Reading is streamed, writing is not: Pillow's writers take the frames as a list (GIF: palettised, 1 byte a pixel;
APNG and WebP: 3 or 4 bytes a pixel), so one file's enhanced frames are held in memory until it is written; the
decompression-bomb limit on the sum of all frames bounds that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic_files import atomic_output
from .image_io import (
    _EXIF_ORIENTATION,
    ImageFileError,
    _apply_exif_orientation,
    _exif_to_keep,
    _read_exif,
    _upright_size,
    gif_palette_frame,
)

# Formats that can hold an animation, by what Pillow calls them, and the extensions that name them.
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
ANIMATION_EXTENSIONS = frozenset({".gif", ".png", ".apng", ".webp"})


@dataclass
class AnimationChunk:
    """Consecutive frames of an animation.

    Attributes:
        pixels: ``[N, H, W, 3]`` ``uint8`` RGB.
        alpha: ``[N, H, W]`` ``uint8``, or ``None`` when the file is opaque.
        durations: each frame's display time in milliseconds.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    durations: list[float]

    def __len__(self) -> int:
        return len(self.durations)


def is_animated_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an animated GIF/PNG/WebP (more than one frame); False for anything Pillow cannot open
    (the still-image reader then reports why)."""
    try:
        with Image.open(path) as image:
            return image.format in ANIMATED_FORMATS and bool(getattr(image, "is_animated", False))
    except Exception:  # noqa: BLE001  not an image, truncated, a bomb...: not ours to report
        return False


class AnimationReader:
    """Frames of an animated GIF/PNG/WebP, decoded one at a time (use as a context manager).

    Attributes:
        path, format ("GIF", "PNG", "WEBP"), frame_count, size (width, height, upright), loop (0 = forever, N =
        N times; ``None``: the GIF has no loop extension and plays once), has_alpha (Pillow composites a GIF whose
        first frame is opaque onto an opaque canvas, so only its first frame decides), icc_profile, exif (bytes for
        the writer, without orientation and thumbnail).

    Raises:
        ImageFileError: not readable, not an animation, 16-bit (Pillow would read its frames at 8 bits), or more
            pixels over all frames than twice ``Image.MAX_IMAGE_PIXELS``; the message names the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._image = Image.open(self.path)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            raise ImageFileError(f"{self.path}: not a readable image ({error})") from error
        try:
            self._inspect()
        except BaseException:
            self._image.close()
            raise

    def _inspect(self) -> None:
        image = self._image
        self.format = image.format
        if self.format not in ANIMATED_FORMATS or not getattr(image, "is_animated", False):
            raise ImageFileError(f"{self.path}: not an animated GIF, PNG or WebP")
        try:
            self.frame_count = image.n_frames  # GIF: a scan of the frame headers, nothing decoded
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise ImageFileError(f"{self.path}: not a readable animation ({error})") from error
        width, height = image.size
        if self.format == "PNG" and _png_bit_depth(self.path) == 16:
            raise ImageFileError(f"{self.path}: 16-bit animated PNGs are not supported (their frames would be read "
                                 f"at 8 bits); convert it to an 8-bit APNG or a video first")
        if Image.MAX_IMAGE_PIXELS is not None:
            total = self.frame_count * width * height
            if total > 2 * Image.MAX_IMAGE_PIXELS:
                raise ImageFileError(
                    f"{self.path}: refused as a possible decompression bomb: {self.frame_count} frames of "
                    f"{width}x{height} are {total} pixels in all, over twice PIL.Image.MAX_IMAGE_PIXELS "
                    f"({Image.MAX_IMAGE_PIXELS}); raise Image.MAX_IMAGE_PIXELS if the file is trusted")
        self.loop = image.info.get("loop")
        self.icc_profile = image.info.get("icc_profile")
        exif = _read_exif(image)
        self._orientation = exif.get(_EXIF_ORIENTATION, 1)
        self.size = _upright_size((width, height), self._orientation)
        self.exif = _exif_to_keep(exif, self.size)
        self.has_alpha = "transparency" in image.info or image.mode in ("RGBA", "LA", "La", "RGBa", "PA")

    def frames(self, max_frames: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None, float]]:
        """``(rgb [H, W, 3] uint8, alpha [H, W] uint8 or None, duration in ms)`` for each frame, in order."""
        count = self.frame_count if max_frames is None else min(self.frame_count, max_frames)
        for index in range(count):
            try:
                self._image.seek(index)
                self._image.load()
                rgba = np.array(self._image.convert("RGBA"))
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                raise ImageFileError(
                    f"{self.path}: frame {index + 1} of {self.frame_count} cannot be decoded ({error}); "
                    f"the file is damaged or truncated") from error
            rgba = np.ascontiguousarray(_apply_exif_orientation(rgba, self._orientation))
            duration = float(self._image.info.get("duration", 0) or 0)
            yield rgba[..., :3].copy(), (rgba[..., 3].copy() if self.has_alpha else None), duration

    def chunks(self, size: int, max_frames: int | None = None) -> Iterator[AnimationChunk]:
        """The frames in chunks of at most ``size``."""
        batch: list[tuple[np.ndarray, np.ndarray | None, float]] = []
        for frame in self.frames(max_frames):
            batch.append(frame)
            if len(batch) == size:
                yield _chunk(batch)
                batch = []
        if batch:
            yield _chunk(batch)

    def close(self) -> None:
        self._image.close()

    def __enter__(self) -> AnimationReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(25)
    return header[24] if len(header) == 25 else 8


def _chunk(frames: list[tuple[np.ndarray, np.ndarray | None, float]]) -> AnimationChunk:
    alphas = [alpha for _, alpha, _ in frames]
    return AnimationChunk(np.stack([rgb for rgb, _, _ in frames]), None if alphas[0] is None else np.stack(alphas),
                          [duration for _, _, duration in frames])


def write_animation(
    path: str | os.PathLike,
    chunks: Iterable[AnimationChunk],
    *,
    loop: int | None = 0,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    quality: int = 95,
) -> Path:
    """Write frames atomically as an animated GIF, PNG or WebP (from the extension of ``path``).

    Args:
        path: destination (``.gif``, ``.png``, ``.apng``, ``.webp``); its folder must exist.
        chunks: the frames in order; ``alpha`` (binary in GIF) is kept when given.
        loop: 0 = forever, N = N times, ``None`` = play once (GIF: no loop extension; PNG/WebP: 1).
        icc_profile, exif: embedded in PNG and WebP (GIF carries neither).
        quality: WebP quality.
    Returns:
        ``path`` as a ``Path``.
    Raises:
        ImageFileError: another extension, or no frame at all.
    """
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in ANIMATED_FORMATS:
        raise ImageFileError(f"{path}: {path.suffix or 'no extension'} cannot hold an animation "
                             f"(use .gif, .png or .webp)")
    # A list: Pillow's APNG and WebP writers go over the frames twice, its GIF writer keeps them all anyway.
    frames = list(_pil_frames(chunks, image_format))
    if not frames:
        raise ImageFileError(f"{path}: no frame to write")
    if image_format != "GIF" and any(frame.mode == "RGBA" for frame in frames):
        frames = [frame.convert("RGBA") for frame in frames]  # one mode for all (convert keeps the duration)
    first, rest = frames[0], frames[1:]
    options: dict = {"save_all": True, "append_images": rest}
    if image_format == "GIF":
        if loop is not None:
            options["loop"] = loop
        # Transparent pixels must show what is behind the animation, not the previous frame.
        if any("transparency" in frame.info for frame in frames):
            options["disposal"] = 2
    else:
        options["loop"] = 1 if loop is None else loop
        if icc_profile:
            options["icc_profile"] = icc_profile
        if exif:
            options["exif"] = exif
    if image_format == "WEBP":  # Pillow's WebP writer reads the durations from its arguments only
        options["duration"] = [frame.info["duration"] for frame in frames]
        options["quality"] = quality
    with atomic_output(path) as temporary:
        first.save(temporary, format=image_format, **options)
    return path


def _pil_frames(chunks: Iterable[AnimationChunk], image_format: str) -> Iterator[Image.Image]:
    for chunk in chunks:
        for index, duration in enumerate(chunk.durations):
            alpha = None if chunk.alpha is None else chunk.alpha[index]
            if image_format == "GIF":
                frame = gif_palette_frame(chunk.pixels[index], alpha)
            elif alpha is None:
                frame = Image.fromarray(chunk.pixels[index], "RGB")
            else:
                frame = Image.fromarray(np.dstack([chunk.pixels[index], alpha]), "RGBA")
            frame.info["duration"] = duration  # GIF and APNG writers read each frame's own duration
            yield frame


def enhance_animation(
    reader: AnimationReader,
    destination: str | os.PathLike,
    enhance: Callable[[np.ndarray], np.ndarray],
    *,
    chunk_size: int = 8,
    max_frames: int | None = None,
    quality: int = 95,
    on_frames: Callable[[int], None] = lambda count: None,
) -> Path:
    """Enhance an animation chunk by chunk into ``destination`` (atomic): ``enhance`` maps ``uint8`` RGB
    ``[N, H, W, 3]`` to the same; alpha, durations, loop, ICC and EXIF are carried over. ``on_frames(n)`` after
    each chunk (progress)."""

    def enhanced() -> Iterator[AnimationChunk]:
        for chunk in reader.chunks(chunk_size, max_frames):
            pixels = np.asarray(enhance(chunk.pixels))
            if pixels.shape != chunk.pixels.shape or pixels.dtype != np.uint8:
                raise ValueError(f"enhancing frames gave {pixels.dtype} {pixels.shape}, expected uint8 "
                                 f"{chunk.pixels.shape}")
            yield AnimationChunk(pixels, chunk.alpha, chunk.durations)
            on_frames(len(chunk))

    return write_animation(destination, enhanced(), loop=reader.loop, icc_profile=reader.icc_profile,
                           exif=reader.exif, quality=quality)
