"""SGZ speed: the shipped pipeline (fused full-resolution pass) vs a straightforward unfused implementation.

Both take a uint8 HxWx3 frame and return a uint8 HxWx3 frame (conversion included), with the same weights and the
same torch thread count, measured in the same run with interleaved repetitions (median ms of wall time, and of
process CPU time, which is far less sensitive to other processes sharing the CPU). Memory: each
(implementation, size) runs in a fresh subprocess that resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``) after a warm-up on a tiny frame and reports ``VmHWM - VmRSS-before``, i.e. the peak extra resident memory
of one call (outputs included; torch allocations are invisible to tracemalloc, RSS sees them).

    python benchmarks/bench_sgz_speed.py [--repeats 30] [--threads 2 1] [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SIZES = [(1200, 900), (1920, 1080)]  # (width, height)
DOWNSCALE, RECURRENCES = 12, 8


def _import_package():
    from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS  # the package is installed (pip install -e .)
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    return SGZPipeline, SHIPPED_WEIGHTS


def default_weights() -> Path:
    _, shipped = _import_package()
    return shipped if shipped.is_file() else SHARED / "reference" / "sgz" / "Epoch99.pth"


def make_frame(width: int, height: int) -> np.ndarray:
    """A real LOL low-light image resized to the benchmark size, uint8 HxWx3."""
    low = Image.open(SHARED / "data" / "lol_eval15" / "low" / "1.png").convert("RGB")
    return np.asarray(low.resize((width, height), Image.BICUBIC)).copy()


def unfused(model, frame: np.ndarray, float_output: bool = False):
    """The equations as written, one full-frame pass per operation (what the official test code does)."""
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    x_down = F.interpolate(x, scale_factor=1 / DOWNSCALE, mode="bilinear")
    x_r = model(x_down)
    x_r = F.interpolate(x_r, size=x.shape[-2:], mode="bilinear", align_corners=True)
    for _ in range(RECURRENCES):
        x = x + x_r * (torch.pow(x, 2) - x)
    if float_output:
        return x
    return np.ascontiguousarray((x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def _memory_child(kind: str, width: int, height: int, weights: str, threads: int) -> None:
    torch.set_num_threads(threads)
    SGZPipeline, _ = _import_package()
    pipe = SGZPipeline.from_pretrained(weights)
    frame = make_frame(width, height)
    tiny = make_frame(96, 72)
    run = (lambda x: pipe(x)) if kind == "shipped" else (lambda x: unfused(pipe.model, x))
    with torch.no_grad():
        run(tiny)  # warm-up on a tiny frame (lazy initialisation) so no full-size buffer is cached in the heap
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        status = Path("/proc/self/status").read_text()
        before = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
        out = run(frame)
        status = Path("/proc/self/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    del out
    print(json.dumps({"peak_extra_mb": (peak - before) / 1024}))


def peak_extra_mb(kind: str, width: int, height: int, weights: Path, threads: int) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", kind, str(width), str(height), str(weights), str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads(), 1])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, width, height, weights, threads = args.memory_child
        _memory_child(kind, int(width), int(height), weights, int(threads))
        return

    SGZPipeline, shipped_path = _import_package()
    weights = args.weights or default_weights()
    pipe = SGZPipeline.from_pretrained(weights)
    load_before = os.getloadavg()
    print(f"weights: {weights.name}{'' if weights == shipped_path else ' (shipped weights not used)'}; "
          f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; repeats {args.repeats} (interleaved, median)\n")
    print("| size | implementation | torch threads | ms/frame (wall) | FPS | speed-up (wall) | CPU ms/frame "
          "| speed-up (CPU) | peak extra MB | max abs diff (float) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for width, height in SIZES:
            frame = make_frame(width, height)
            image = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
            with torch.no_grad():
                diff = (pipe(image) - unfused(pipe.model, frame, float_output=True)).abs().max().item()
                u8_diff = np.abs(pipe(frame).astype(int) - unfused(pipe.model, frame).astype(int)).max()
                runs = {"shipped (fused)": lambda: pipe(frame), "unfused": lambda: unfused(pipe.model, frame)}
                times = {name: [] for name in runs}
                cpu_times = {name: [] for name in runs}
                for name, run in runs.items():
                    run()
                for _ in range(args.repeats):
                    for name, run in runs.items():
                        start, cpu_start = time.perf_counter(), time.process_time()
                        run()
                        times[name].append((time.perf_counter() - start) * 1000)
                        cpu_times[name].append((time.process_time() - cpu_start) * 1000)
            medians = {name: float(np.median(t)) for name, t in times.items()}
            cpu = {name: float(np.median(t)) for name, t in cpu_times.items()}
            for name, kind in (("shipped (fused)", "shipped"), ("unfused", "unfused")):
                ms = medians[name]
                memory = peak_extra_mb(kind, width, height, weights, threads)
                diff_text = f"{diff:.1e} (uint8: {u8_diff})" if kind == "shipped" else "reference"
                print(f"| {width}x{height} | {name} | {threads} | {ms:.1f} | {1000 / ms:.1f} "
                      f"| {medians['unfused'] / ms:.1f}x | {cpu[name]:.1f} | {cpu['unfused'] / cpu[name]:.1f}x "
                      f"| {memory:.0f} | {diff_text} |")
    load_after = os.getloadavg()
    print(f"\nload average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
          "(other processes share the CPU; multi-threaded torch ops suffer most under load)")


if __name__ == "__main__":
    main()
