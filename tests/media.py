"""Test material the repository has or makes itself, so that tests run on a clone without ``../shared``.

- :func:`sample_night`: the bundled sample photo ``assets/sample_night.jpg`` (a real low-light scene, mean ~16/255).
- :func:`dark_scene`: a synthetic night scene (dim gradients, lit windows, lamps, sensor noise), uint8 HxWx3.
- :func:`dark_clip_frames` and :func:`write_video`: short dark clips with motion and exposure changes, written
  with PyAV (H.264 with B-frames, irregular timestamps and an AAC track when asked).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_NIGHT = REPO_ROOT / "assets" / "sample_night.jpg"
SHIPPED_SGZ_WEIGHTS = REPO_ROOT / "lora_weights" / "sgz_lowlight.safetensors"  # the default (trained for v2)
V1_SGZ_WEIGHTS = REPO_ROOT / "lora_weights" / "sgz_lowlight_v1.safetensors"  # the first file (trained for plain SGZ)


def sample_night() -> np.ndarray:
    """The bundled sample, uint8 384x512x3."""
    with Image.open(SAMPLE_NIGHT) as image:
        return np.asarray(image.convert("RGB")).copy()


def dark_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A dark, photo-like RGB scene, uint8 ``[height, width, 3]``: mean about 15-30 of 255, a few bright spots.

    Smooth structure (not white noise) so that the enhancement factor varies the way it does on photographs.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y, x = y / max(height - 1, 1), x / max(width - 1, 1)
    light = 0.02 + 0.05 * x * (0.6 + 0.4 * np.sin(7 * y + seed))  # dim ambient gradient (walls, sky)
    for _ in range(4):  # lit windows / shop fronts: dim rectangles
        top, left = rng.uniform(0, 0.8, 2)
        tall, wide = rng.uniform(0.05, 0.25, 2)
        light = light + rng.uniform(0.03, 0.1) * ((y >= top) & (y < top + tall) & (x >= left) & (x < left + wide))
    for _ in range(2):  # street lamps: small bright blobs with a glow
        cy, cx = rng.uniform(0.1, 0.9, 2)
        distance2 = (y - cy) ** 2 + (x - cx) ** 2
        light = light + 0.8 * np.exp(-distance2 / 0.0008) + 0.08 * np.exp(-distance2 / 0.02)
    tint = np.array([1.0, 0.85, 0.65])  # sodium-lamp orange
    image = light[..., None] * tint + rng.normal(0, 0.006, (height, width, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def dark_clip_frames(count: int, height: int, width: int, gains=None, seed: int = 0) -> np.ndarray:
    """``count`` frames of a dark scene panning 1 px per frame, each times its exposure gain; uint8 ``[N, H, W, 3]``."""
    scene = dark_scene(height, width + count, seed).astype(np.float32)
    gains = np.ones(count) if gains is None else np.asarray(gains, np.float64)
    frames = [scene[:, i : i + width] * gain for i, gain in zip(range(count), gains)]
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def write_video(
    path: Path,
    frames: np.ndarray,
    *,
    codec: str = "libx264",
    fps: Fraction = Fraction(24),
    irregular_timestamps: bool = False,
    with_audio: bool = False,
    rotation: int = 0,
    pix_fmt: str = "yuv420p",
    color_trc: int | None = None,
    index_first: bool = False,
) -> Path:
    """Encode ``frames`` (uint8 ``[N, H, W, 3]`` RGB) to ``path`` with PyAV.

    ``irregular_timestamps``: a 1/90000 time base with frame durations jittered by up to +-20 % (variable frame
    rate, as phones record), so that timestamps cannot be recomputed from the frame rate. ``with_audio``: a stereo
    AAC 440 Hz tone as long as the video. ``rotation``: display rotation in degrees (a phone's portrait flag).
    ``pix_fmt``: e.g. ``yuv420p10le`` for 10-bit; ``color_trc``: FFmpeg's transfer tag (16 = PQ, 18 = HLG, with
    BT.2020 primaries and matrix). ``index_first``: the MP4 index at the front (``movflags=faststart``, as
    streaming sites serve), so a cut-off copy still announces every frame.
    """
    count, height, width, _ = frames.shape
    options = {"movflags": "faststart"} if index_first else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        if color_trc is not None:
            video.codec_context.color_trc = color_trc
            video.codec_context.color_primaries = video.codec_context.colorspace = 9  # BT.2020
        if rotation:
            video.set_display_rotation(rotation)
        time_base = Fraction(1, 90000) if irregular_timestamps else 1 / fps
        video.time_base = video.codec_context.time_base = time_base
        step = float(1 / (fps * time_base))
        jitter = np.random.default_rng(1).uniform(-0.2, 0.2, count) if irregular_timestamps else np.zeros(count)
        timestamps = np.round(np.cumsum(np.r_[0.0, step * (1 + jitter[:-1])])).astype(int)
        audio = None
        if with_audio:
            audio = container.add_stream("aac", rate=44100)
            audio.layout = "stereo"
        for pixels, pts in zip(frames, timestamps):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if pix_fmt != "yuv420p":
                frame = frame.reformat(format=pix_fmt)
            frame.pts, frame.time_base = int(pts), time_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            samples = int(float(count / fps) * 44100)
            tone = (0.2 * np.sin(np.arange(samples) * 2 * np.pi * 440 / 44100)).astype(np.float32)
            sound = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            sound.sample_rate, sound.pts = 44100, 0
            container.mux(audio.encode(sound))
            container.mux(audio.encode(None))
    return path


def decoded_pts_and_frames(path: Path, max_frames: int | None = None) -> list[tuple[int, np.ndarray]]:
    """``(pts, rgb24 frame)`` of the first video stream, in presentation order."""
    result = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if max_frames is not None and len(result) == max_frames:
                break
            result.append((frame.pts, frame.to_ndarray(format="rgb24")))
    return result


def camera_exif(orientation: int = 1, thumbnail: bytes | None = None) -> bytes:
    """EXIF as a camera writes it: make/model, orientation, capture date, pixel size, GPS, and optionally an IFD1
    thumbnail (``thumbnail``: JPEG bytes), for ``Image.save(..., exif=...)``."""
    import struct

    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Canon", "EOS R6", orientation
    exif.get_ifd(0x8769).update({0x9003: "2024:01:02 03:04:05", 0x829A: 1 / 60, 0xA002: 64, 0xA003: 48,
                                 0xA005: {1: "R98", 2: b"0100"}})  # the interoperability IFD, nested
    exif.get_ifd(0x8825).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    data = bytearray(exif.tobytes())
    if thumbnail is None:
        return bytes(data)
    # Pillow writes no IFD1: append one (JPEGInterchangeFormat + length, both LONG) and link it from IFD0.
    tiff = 6  # b"Exif\0\0" precedes the TIFF header; offsets count from the header
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    ifd0 = struct.unpack_from(order + "I", data, tiff + 4)[0]
    entries = struct.unpack_from(order + "H", data, tiff + ifd0)[0]
    ifd1 = len(data) - tiff
    struct.pack_into(order + "I", data, tiff + ifd0 + 2 + 12 * entries, ifd1)
    thumb_offset = ifd1 + 2 + 2 * 12 + 4
    data += struct.pack(order + "H", 2)
    data += struct.pack(order + "HHII", 0x0201, 4, 1, thumb_offset)
    data += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumbnail))
    data += struct.pack(order + "I", 0) + thumbnail
    return bytes(data)


def cut_off_copy(source: Path, destination: Path, fraction: float) -> Path:
    """The first bytes of ``source`` up to its video packet at ``fraction`` of the packets (a clean cut between
    packets: the demuxer then meets the end of the file without an error, as with an interrupted download)."""
    with av.open(str(source)) as container:
        positions = sorted(packet.pos for packet in container.demux(video=0) if packet.size)
    destination.write_bytes(source.read_bytes()[: positions[int(len(positions) * fraction)]])
    return destination
