"""SGZ video through the command line's path: frames per second of each stage and end to end, sequential vs
overlapped (``video_io.run_overlapped``: decoding and encoding on their own threads).

A 1920x1080 clip (the bundled night photo panning, H.264 crf 18) is written to a temporary folder, then read,
enhanced (temporal smoothing 0.8, as the command line does for videos) and written as ``lowlight enhance`` does.
Stages alone: decode only, enhance only (frames already in memory), encode only (libx264 medium, crf 18, the
writer's settings). End to end: the plain loop, then the overlapped one (with the busy time of each stage).

    python benchmarks/bench_sgz_video.py [--frames 48] [--size 1920x1080] [--threads 1 2] [--chunk-size 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_clip(path: Path, frames: int, width: int, height: int) -> None:
    photo = Image.open(REPO / "assets" / "sample_night.jpg").convert("RGB").resize((width + frames, height))
    scene = np.asarray(photo)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30), options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, i : i + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def main() -> None:
    from comfyui_lowlight.pipelines.media.video_io import VideoChunk, VideoReader, VideoWriter, run_overlapped
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--chunk-size", type=int, default=8)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    pipe = SGZPipeline.from_pretrained()
    print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; {args.frames} frames {width}x{height}, chunks of "
          f"{args.chunk_size}; load average (1 min) at start {os.getloadavg()[0]:.2f}\n")
    print("| torch threads | decode fps | enhance fps | encode fps | plain loop fps | overlapped fps "
          "| overlapped busy s (decode / enhance / encode) | load |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "clip.mp4"
        write_clip(source, args.frames, width, height)
        for threads in args.threads:
            torch.set_num_threads(threads)
            state = pipe.new_video_state()

            def enhance(chunk):
                return VideoChunk(pipe(chunk.frames, temporal_smoothing=0.8, video_state=state), chunk.pts)

            with VideoReader(source) as reader:
                enhance(next(reader.chunks(1)))  # warm-up (kernel compilation or cache load)

            start = time.perf_counter()
            with VideoReader(source) as reader:
                chunks = list(reader.chunks(args.chunk_size))
            decode_fps = args.frames / (time.perf_counter() - start)

            start = time.perf_counter()
            enhanced = [enhance(chunk) for chunk in chunks]
            enhance_fps = args.frames / (time.perf_counter() - start)

            with VideoReader(source) as reader, VideoWriter(Path(folder) / "encode.mp4", reader) as writer:
                start = time.perf_counter()
                for chunk in enhanced:
                    writer.write(chunk)
                writer.close()
                encode_fps = args.frames / (time.perf_counter() - start)
            del chunks, enhanced

            start = time.perf_counter()
            with VideoReader(source) as reader, VideoWriter(Path(folder) / "plain.mp4", reader) as writer:
                for chunk in reader.chunks(args.chunk_size):
                    writer.write(enhance(chunk))
                writer.close()
            plain_fps = args.frames / (time.perf_counter() - start)

            busy = {}
            start = time.perf_counter()
            with VideoReader(source) as reader, VideoWriter(Path(folder) / "overlapped.mp4", reader) as writer:
                for _ in run_overlapped(reader.chunks(args.chunk_size), enhance, writer.write, stage_seconds=busy):
                    pass
                writer.close()
            overlapped_fps = args.frames / (time.perf_counter() - start)
            print(f"| {threads} | {decode_fps:.1f} | {enhance_fps:.1f} | {encode_fps:.1f} | {plain_fps:.1f} "
                  f"| {overlapped_fps:.1f} | {busy['decode']:.1f} / {busy['enhance']:.1f} / {busy['encode']:.1f} "
                  f"| {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
