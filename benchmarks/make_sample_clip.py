"""Write ``assets/night_clip.mp4``, the small night clip the SGZ video template loads (``night_clip.mp4``).

Made from the bundled photo ``assets/sample_night.jpg`` (so it carries that photo's licence, see assets/README.md):
a slow handheld drift over the scene, the exposure breathing and a street lamp flickering (what deflicker is for),
fresh sensor noise on every frame; 320x240, 24 fps, 2 s, H.264, with a quiet stereo AAC ambience (low rumble and
soft hiss) so that the template shows the audio being kept. Deterministic: the same file bytes on every run with
the same PyAV/FFmpeg.

    python benchmarks/make_sample_clip.py [--output assets/night_clip.mp4]
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS, FRAMES = 320, 240, 24, 48
SAMPLE_RATE = 44100


def clip_frames() -> np.ndarray:
    """uint8 ``[FRAMES, HEIGHT, WIDTH, 3]``."""
    photo = Image.open(REPO / "assets" / "sample_night.jpg").convert("RGB")  # 512x384
    rng = np.random.default_rng(15)
    t = np.arange(FRAMES) / FPS
    # Handheld drift of a 432x324 window (3/4 of the photo), in photo pixels.
    left = 40 + 30 * np.sin(2 * np.pi * t / 2.0) + rng.normal(0, 1.0, FRAMES)
    top = 30 + 15 * np.sin(2 * np.pi * t / 1.6 + 1.0) + rng.normal(0, 1.0, FRAMES)
    exposure = 1.0 + 0.12 * np.sin(2 * np.pi * t / 1.3)  # auto exposure hunting
    lamp = 1.0 + 0.25 * (rng.random(FRAMES) < 0.2)  # a lamp that flickers brighter on some frames
    frames = []
    for i in range(FRAMES):
        box = (left[i], top[i], left[i] + 432, top[i] + 324)
        window = np.asarray(photo.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS, box=box), np.float32)
        light = window * exposure[i]
        light += (lamp[i] - 1.0) * np.clip(window - 60.0, 0.0, None)  # the flicker shows on the lit parts
        light += rng.normal(0.0, 1.2, light.shape)  # fresh sensor noise every frame
        frames.append(np.clip(light, 0, 255).round().astype(np.uint8))
    return np.stack(frames)


def ambience(seconds: float) -> np.ndarray:
    """float32 ``[2, samples]``: a distant-traffic rumble and a soft hiss, quiet (peak about 0.1)."""
    rng = np.random.default_rng(16)
    samples = int(round(seconds * SAMPLE_RATE))
    noise = rng.normal(0.0, 1.0, (2, samples))
    rumble = np.cumsum(noise, axis=1)  # brown noise, then its slow wander removed
    rumble -= _moving_average(rumble, 2048)
    rumble /= np.abs(rumble).max()
    hiss = _moving_average(noise, 8)
    hiss /= np.abs(hiss).max()
    fade = np.minimum(1.0, np.minimum(np.arange(samples), samples - 1 - np.arange(samples)) / (0.1 * SAMPLE_RATE))
    return ((0.08 * rumble + 0.02 * hiss) * fade).astype(np.float32)


def _moving_average(signal: np.ndarray, width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.stack([np.convolve(channel, kernel, mode="same") for channel in signal])


def write_clip(path: Path) -> Path:
    frames = clip_frames()
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        container.metadata["title"] = "comfyui-lowlight sample night clip"
        video = container.add_stream("libx264", rate=FPS, options={"crf": "26", "preset": "slow"})
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.time_base = video.codec_context.time_base = Fraction(1, FPS)
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        audio.bit_rate = 64000
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        sound = av.AudioFrame.from_ndarray(ambience(FRAMES / FPS), format="fltp", layout="stereo")
        sound.sample_rate, sound.pts = SAMPLE_RATE, 0
        container.mux(audio.encode(sound))
        container.mux(audio.encode(None))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=REPO / "assets" / "night_clip.mp4")
    args = parser.parse_args()
    path = write_clip(args.output)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, {FRAMES} frames {WIDTH}x{HEIGHT} at {FPS} fps, AAC stereo")


if __name__ == "__main__":
    main()
