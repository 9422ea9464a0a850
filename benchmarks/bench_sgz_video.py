"""SGZ video through the command line's path: fps and CPU time per frame of each stage alone and end to end.

A clip is written to a temporary folder: by default the bundled night photo panning at 1920x1080, darkened, with
fresh sensor noise on every frame (what the enhancement amplifies and the encoder then has to code), H.264;
``--source`` takes any video instead (resized to ``--size``). Then, in interleaved rounds (medians):

- decode only (``VideoReader.chunks``), enhance only (the decoded chunks from memory, the command line's settings:
  SGZ defaults with temporal smoothing 0.8), encode only (the enhanced chunks from memory through ``VideoWriter``:
  libx264 medium, crf 18, the writer's settings);
- end to end as ``lowlight enhance`` runs a video (``video_io.run_overlapped``: decoding and encoding on their own
  threads, enhancement on the caller's) and, with ``--plain-loop``, the same stages one after the other.

libx264 (preset medium) holds about 40 frames in its lookahead and encodes them when the writer closes, after the
last enhancement: that tail cannot overlap, so short clips understate the steady state (the table shows the
flush time); use ``--frames`` well above 40 (default 144).

CPU ms per frame is the process's CPU time (all threads: FFmpeg's, torch's, the kernel's) per frame. The encoder
bound is what the encoder alone would reach on the cores it got when alone, less those the other stages need
per frame: ``cores = encode CPU per frame x encode-only fps``, ``bound fps = cores / (decode + enhance + encode CPU
per frame)``. End to end at that bound means the overlap loses nothing: the encoder limits the speed.

    python benchmarks/bench_sgz_video.py [--frames 144] [--size 1920x1080] [--threads 1 2] [--rounds 3]
        [--chunk-size 8] [--source VIDEO] [--plain-loop]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_clip(path: Path, frames: int, width: int, height: int, source: Path | None) -> None:
    """``frames`` frames of ``width x height`` at 30 fps, H.264 crf 18 veryfast: the panning night photo (darkened
    to a night video's level, sensor noise of sigma 2 levels) or ``source``'s first frames resized."""
    rng = np.random.default_rng(17)
    if source is None:
        photo = Image.open(REPO / "assets" / "sample_night.jpg").convert("RGB").resize((width + frames, height))
        scene = np.asarray(photo).astype(np.float32) * 0.35

        def frame(i):
            noisy = scene[:, i : i + width] + rng.normal(0.0, 2.0, (height, width, 3)).astype(np.float32)
            return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    else:
        with av.open(str(source)) as container:
            pictures = [f.to_image().resize((width, height), Image.BICUBIC)
                        for f, _ in zip(container.decode(video=0), range(frames))]

        def frame(i):
            return np.asarray(pictures[i % len(pictures)])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(30), options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame(i)), format="rgb24")))
        container.mux(stream.encode(None))


def timed(run) -> tuple[float, float]:
    """Wall and process CPU seconds of ``run()``."""
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    from comfyui_lowlight.pipelines.media.video_io import VideoChunk, VideoReader, VideoWriter, run_overlapped
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=144)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--source", type=Path, help="a video to use instead of the synthetic clip")
    parser.add_argument("--plain-loop", action="store_true", help="also time the stages one after the other")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    pipe = SGZPipeline.from_pretrained()
    default_threads = torch.get_num_threads()
    print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; PyAV {av.__version__}; {args.frames} frames "
          f"{width}x{height} ({args.source or 'synthetic night pan with sensor noise'}), chunks of "
          f"{args.chunk_size}; {args.rounds} interleaved rounds, median; load average (1 min) at start "
          f"{os.getloadavg()[0]:.2f}\n")
    stages = ["decode", "enhance", "encode", "end to end"] + (["plain loop"] if args.plain_loop else [])
    results = {(t, s): [] for t in args.threads for s in stages}
    busy = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "clip.mp4"
        write_clip(source, args.frames, width, height, args.source)
        with VideoReader(source) as reader:
            chunks = list(reader.chunks(args.chunk_size))
        state = {}

        def enhance(chunk):
            frames = pipe(chunk.frames, temporal_smoothing=0.8, video_state=state["video"])
            return VideoChunk(frames, chunk.pts)

        state["video"] = pipe.new_video_state()
        enhanced = [enhance(chunk) for chunk in chunks]  # warm-up (kernel compilation or cache load)

        def decode_only():
            with VideoReader(source) as reader:
                for _ in reader.chunks(args.chunk_size):
                    pass

        def enhance_only():
            state["video"] = pipe.new_video_state()
            for chunk in chunks:
                enhance(chunk)

        def encode_only():
            with VideoReader(source) as reader, VideoWriter(Path(folder) / "encode.mp4", reader) as writer:
                for chunk in enhanced:
                    writer.write(chunk)

        def end_to_end(seconds):
            state["video"] = pipe.new_video_state()
            with VideoReader(source) as reader, VideoWriter(Path(folder) / "overlapped.mp4", reader) as writer:
                for _ in run_overlapped(reader.chunks(args.chunk_size), enhance, writer.write,
                                        stage_seconds=seconds):
                    pass
                start = time.perf_counter()
                writer.close()  # the encoder's delayed frames (x264's lookahead), after the last enhancement
                seconds["flush"] = time.perf_counter() - start

        def plain_loop():
            state["video"] = pipe.new_video_state()
            with VideoReader(source) as reader, VideoWriter(Path(folder) / "plain.mp4", reader) as writer:
                for chunk in reader.chunks(args.chunk_size):
                    writer.write(enhance(chunk))

        try:
            for _ in range(args.rounds):
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    seconds = {}
                    runs = {"decode": decode_only, "enhance": enhance_only, "encode": encode_only,
                            "end to end": lambda: end_to_end(seconds), "plain loop": plain_loop}
                    for stage in stages:
                        results[threads, stage].append(timed(runs[stage]))
                    busy[threads].append(seconds)
        finally:
            torch.set_num_threads(default_threads)
    print(f"load average (1 min) at the end {os.getloadavg()[0]:.2f}\n")
    print("| torch threads | stage | fps | wall ms / frame | CPU ms / frame | cores used |")
    print("|---|---|---|---|---|---|")
    summary = []
    for threads in args.threads:
        median = {}
        for stage in stages:
            wall = statistics.median(w for w, _ in results[threads, stage]) / args.frames
            cpu = statistics.median(c for _, c in results[threads, stage]) / args.frames
            median[stage] = (wall, cpu)
            print(f"| {threads} | {stage} | {1 / wall:.1f} | {1000 * wall:.0f} | {1000 * cpu:.0f} | {cpu / wall:.2f} |")
        encode_wall, encode_cpu = median["encode"]
        cores = encode_cpu / encode_wall
        bound = cores / sum(median[stage][1] for stage in ("decode", "enhance", "encode"))
        e2e = 1 / median["end to end"][0]
        stage_busy = {k: statistics.median(b[k] for b in busy[threads]) for k in ("decode", "enhance", "encode")}
        busy_ms = " / ".join(f"{1000 * stage_busy[k] / args.frames:.0f}" for k in ("decode", "enhance", "encode"))
        flush = statistics.median(b["flush"] for b in busy[threads])
        summary.append(f"| {threads} | {e2e:.1f} | {1 / encode_wall:.1f} | {e2e * encode_wall:.2f} | {bound:.1f} "
                       f"| {e2e / bound:.2f} | {median['enhance'][1] / encode_cpu:.2f} | {busy_ms} | {flush:.1f} |")
    print("\nEnd to end vs the encoder (bound: the encoder's cores when alone, shared with the other stages' CPU):\n")
    print("| torch threads | end to end fps | encode-only fps | end to end / encode only | encoder bound fps "
          "| end to end / bound | enhance CPU / encode CPU | busy ms / frame in end to end (decode / enhance / encode) "
          "| encoder flush s after the last frame |")
    print("|---|---|---|---|---|---|---|---|---|")
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
