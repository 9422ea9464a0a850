"""Video flicker with and without SGZ temporal smoothing (the deflicker), and what it costs.

Flicker = mean over consecutive frame pairs of |mean brightness(t) - mean brightness(t-1)|, brightness in 0..255
(mean of R, G, B over the frame). The enhanced frames are measured as the pipeline returns them (uint8), before
any video encoding, so codec noise does not enter the numbers. The input's own flicker (camera and scene changes)
is printed for reference: an enhancement multiplies brightness changes that are really in the footage.
Two synthetic clips follow: a still frame with fresh sensor noise per frame (flicker from the factor estimate
jittering with the noise) and a still frame with a random global exposure gain per frame (flicker that is in the
footage itself, e.g. a flickering light or auto exposure hunting). Last, the cost: ms per 1200x900 frame with
smoothing off and on (interleaved repetitions, median wall and process CPU time).

The video is decoded once, chunk by chunk, and every setting enhances the same chunk before the next is read.

    python benchmarks/bench_flicker.py [--video ../shared/data/video/night_street.mp4] [--weights PATH]
        [--max-frames N] [--smoothing 0.5 0.8 0.9] [--speed-repeats 20]

Prints markdown tables. Default: the whole video, shipped weights (the official Epoch99.pth if none are shipped).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from comfyui_lowlight.pipelines.sgz.options import VIDEO_TEMPORAL_SMOOTHING
from comfyui_lowlight.pipelines import SGZPipeline
from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS
from comfyui_lowlight.pipelines.media.video_io import VideoReader

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def flicker(brightness: np.ndarray) -> tuple[float, float]:
    """(mean, max) absolute change of per-frame mean brightness between consecutive frames."""
    steps = np.abs(np.diff(brightness))
    return float(steps.mean()), float(steps.max())


def measure(pipe, chunks: Iterable[np.ndarray], settings: list[float]) -> dict[str, list[float]]:
    """Per-frame mean brightness (0..255) of the input and of each smoothing setting's output."""
    states = {s: pipe.new_video_state() for s in settings}
    series = {"input": []} | {str(s): [] for s in settings}
    for frames in chunks:
        count = len(frames)
        series["input"].extend(frames.reshape(count, -1).mean(axis=1).tolist())
        for s in settings:
            out = pipe(frames, temporal_smoothing=s, video_state=states[s])
            series[str(s)].extend(out.reshape(count, -1).mean(axis=1).tolist())
    return series


def print_table(series: dict[str, list[float]]) -> None:
    print("| temporal smoothing | mean brightness (0-255) | flicker: mean abs change / frame | max abs change "
          "| flicker vs off |")
    print("|---|---|---|---|---|")
    off = flicker(np.array(series["0.0"]))[0]
    for key, values in series.items():
        brightness = np.array(values)
        mean_step, max_step = flicker(brightness)
        if key == "input":
            label, ratio = "input (not enhanced)", "-"
        else:
            s = float(key)
            label = "off (`--no-temporal-smoothing`)" if s == 0 else f"{s:g}"
            label += " (CLI default)" if s == VIDEO_TEMPORAL_SMOOTHING else ""
            ratio = f"{mean_step / off:.2f}x"
        print(f"| {label} | {brightness.mean():.2f} | {mean_step:.3f} | {max_step:.2f} | {ratio} |")


def speed_table(pipe, settings: list[float], repeats: int, threads: list[int], size=(1200, 900)) -> None:
    """ms per frame (one uint8 frame per call, as in bench_sgz_speed.py) with each smoothing setting."""
    from PIL import Image

    low = Image.open(SHARED / "data" / "lol_eval15" / "low" / "1.png").convert("RGB")
    frame = np.asarray(low.resize(size, Image.BICUBIC)).copy()
    print(f"### Cost: {size[0]}x{size[1]} uint8 frames, one per call, {repeats} interleaved repetitions (median)")
    print()
    print("| torch threads | temporal smoothing | ms/frame (wall) | CPU ms/frame | CPU vs off |")
    print("|---|---|---|---|---|")
    for count in threads:
        torch.set_num_threads(count)
        states = {s: pipe.new_video_state() for s in settings}
        wall = {s: [] for s in settings}
        cpu = {s: [] for s in settings}
        for s in settings:
            pipe(frame, temporal_smoothing=s, video_state=states[s])  # warm-up
        for _ in range(repeats):
            for s in settings:
                start, cpu_start = time.perf_counter(), time.process_time()
                pipe(frame, temporal_smoothing=s, video_state=states[s])
                wall[s].append((time.perf_counter() - start) * 1000)
                cpu[s].append((time.process_time() - cpu_start) * 1000)
        off = float(np.median(cpu[0.0]))
        for s in settings:
            label = "off" if s == 0 else f"{s:g}"
            print(f"| {count} | {label} | {np.median(wall[s]):.1f} | {np.median(cpu[s]):.1f} "
                  f"| {np.median(cpu[s]) / off:.3f}x |")


def video_chunks(reader: VideoReader, chunk_size: int, max_frames: int | None) -> Iterator[np.ndarray]:
    for chunk in reader.chunks(chunk_size, max_frames):
        yield chunk.frames


def noisy_static_chunks(frame: np.ndarray, frames: int, sigma: float, chunk_size: int, seed: int = 0):
    """One still frame repeated with fresh Gaussian sensor noise each frame: any output flicker is the model's."""
    rng = np.random.default_rng(seed)
    for start in range(0, frames, chunk_size):
        count = min(chunk_size, frames - start)
        noise = rng.normal(0.0, sigma, size=(count, *frame.shape))
        yield np.clip(frame[None].astype(np.float32) + noise, 0, 255).round().astype(np.uint8)


def exposure_jitter_chunks(frame: np.ndarray, frames: int, jitter: float, chunk_size: int, seed: int = 0):
    """One still frame whose global exposure jitters by a random gain ``1 + jitter * N(0, 1)`` each frame
    (a flickering light source, auto-exposure hunting): flicker that is really in the footage."""
    rng = np.random.default_rng(seed)
    for start in range(0, frames, chunk_size):
        count = min(chunk_size, frames - start)
        gain = 1.0 + jitter * rng.standard_normal(count)
        yield np.clip(frame[None].astype(np.float32) * gain[:, None, None, None], 0, 255).round().astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=SHARED / "data" / "video" / "night_street.mp4")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--smoothing", type=float, nargs="+", default=sorted({0.5, VIDEO_TEMPORAL_SMOOTHING, 0.9}))
    parser.add_argument("--noise-frames", type=int, default=120, help="length of the synthetic noisy still clip")
    parser.add_argument("--noise-sigma", type=float, default=3.0, help="its sensor noise, in 0..255 units")
    parser.add_argument("--exposure-jitter", type=float, default=0.1, help="relative gain jitter of the third clip")
    parser.add_argument("--speed-repeats", type=int, default=20, help="repetitions of the cost table (0: skip it)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    weights = args.weights or (SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else SHARED / "reference" / "sgz" / "Epoch99.pth")
    pipe = SGZPipeline.from_pretrained(weights, device="cpu")
    settings = [0.0] + [s for s in args.smoothing if s > 0]
    start = time.perf_counter()
    with VideoReader(args.video) as reader:
        series = measure(pipe, video_chunks(reader, args.chunk_size, args.max_frames), settings)
        size, fps = f"{reader.width}x{reader.height}", float(reader.fps)
    frames = len(series["input"])
    print(f"### Real video: `{args.video.name}`, {'all ' if args.max_frames is None else 'first '}{frames} frames, "
          f"{size}, {fps:.1f} fps")
    shipped = "" if weights == SHIPPED_WEIGHTS else " (not the shipped weights)"
    print(f"Weights `{weights.name}`{shipped}, downscale 12, 8 recurrences, strength 1; brightness measured on the "
          "uint8 frames before encoding.")
    print()
    print_table(series)
    print()

    with VideoReader(args.video) as reader:
        first = next(reader.chunks(1)).frames[0]
    series = measure(pipe, noisy_static_chunks(first, args.noise_frames, args.noise_sigma, args.chunk_size), settings)
    print(f"### Synthetic: the video's first frame repeated {args.noise_frames} times with fresh Gaussian noise "
          f"(sigma {args.noise_sigma:g}/255) per frame")
    print()
    print_table(series)
    print()

    series = measure(pipe, exposure_jitter_chunks(first, args.noise_frames, args.exposure_jitter, args.chunk_size), settings)
    print(f"### Synthetic: the video's first frame repeated {args.noise_frames} times with a random exposure gain "
          f"1 + {args.exposure_jitter:g} * N(0, 1) per frame")
    print()
    print_table(series)
    print()
    print(f"({time.perf_counter() - start:.0f} s for the flicker tables on CPU, 2 threads; "
          f"load average {os.getloadavg()[0]:.1f})")
    if args.speed_repeats > 0:
        print()
        speed_table(pipe, [0.0, VIDEO_TEMPORAL_SMOOTHING], args.speed_repeats, threads=[2, 1])


if __name__ == "__main__":
    main()
