"""SGZ speed: the shipped pipeline (compiled CPU kernel) vs the torch tile loop and the plain unfused equations.

One run prints, for 1200x900, 1920x1080 and 3840x2160 uint8 frames, 1 and 2 threads, on the machine as it is
("idle") and with a neighbour process burning one core ("loaded"):

1. end to end (uint8 HxWx3 in, uint8 HxWx3 out, same weights): ms per frame and ratios;
2. the full-resolution pass alone (``enhance``: factor upsampling + recurrences + uint8 conversion), kernel vs
   torch tiles, against its compute bound: the pass's float operations divided by the rate this core reaches on
   the same arithmetic held in L1 (measured in the same run);
3. peak extra memory of one call (fresh subprocess per case: ``VmHWM`` after ``/proc/self/clear_refs`` minus the
   RSS before the call; torch allocations are invisible to tracemalloc).

4. 2 threads vs 1, per stage, for plain SGZ and SGZ v2 (the defaults): the factor network (in bands of rows
   on the caller's threads, with v2's noise estimate beside it), v2's low-resolution steps, the full-resolution
   pass; each 2-thread run paired with the 1-thread run next to it (the order alternating), the median of the
   pairs' ratios. ``--threads-detail`` prints only this table.

Timings are medians of interleaved repetitions in one process; the thread count is ``torch.set_num_threads``
(the kernel follows it).

    python benchmarks/bench_sgz_speed.py [--repeats 7] [--sizes 1200x900 1920x1080 3840x2160] [--threads 1 2]
        [--conditions idle loaded] [--threads-detail]
"""

from __future__ import annotations

import argparse
import contextlib
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
SAMPLE = REPO / "assets" / "sample_night.jpg"
DOWNSCALE, RECURRENCES = 12, 8
# Float operations per value of the fused pass: input scale 1, factor row interpolation 2, 1 - f 1,
# 2 per recurrence (fma + mul), uint8 store 2 (fma + clamp).
FLOPS_PER_VALUE = 6 + 2 * RECURRENCES


def _package():
    from comfyui_lowlight.pipelines.sgz import kernel
    from comfyui_lowlight.pipelines.sgz.model import enhance, estimate_factor_lowres
    from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    class PlainSGZ(SGZPipeline):
        """The pipeline with plain SGZ settings (no v2 noise filter, no automatic exposure): what the unfused
        equations compute. SGZ v2's own cost is ``bench_sgz_v2.py speed``."""

        def __call__(self, images, **options):
            return super().__call__(images, **{**PLAIN_SGZ, **options})

    return PlainSGZ, kernel, enhance, estimate_factor_lowres


def make_frame(width: int, height: int) -> np.ndarray:
    """The bundled night photo resized to the benchmark size, uint8 HxWx3."""
    return np.asarray(Image.open(SAMPLE).convert("RGB").resize((width, height), Image.BICUBIC)).copy()


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


@contextlib.contextmanager
def torch_tiles(kernel):
    """Make the pipeline take its torch implementation (what ran before the kernel)."""
    supports = kernel.supports
    kernel.supports = lambda image, out_dtype: False
    try:
        yield
    finally:
        kernel.supports = supports


@contextlib.contextmanager
def neighbour(active: bool):
    """A process burning one core for the duration (ComfyUI users always have something else running)."""
    if not active:
        yield
        return
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        burner.kill()
        burner.wait()


def l1_rate() -> float:
    """Float operations per second of one thread on the recurrence held in L1 (the kernel's arithmetic, no
    memory traffic): the rate of the compute bound."""
    import numba

    @numba.njit(fastmath={"contract"})
    def recurrences(x, f, g, steps):
        for _ in range(steps):
            for k in range(x.shape[0]):
                v, fk, gk = x[k], f[k], g[k]
                v = v * (gk + fk * v)
                v = v * (gk + fk * v)
                v = v * (gk + fk * v)
                x[k] = v * (gk + fk * v)

    x = np.full(512, 0.5, np.float32)
    f = np.full(512, 0.3, np.float32)
    g = 1 - f
    recurrences(x, f, g, 1)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        recurrences(x, f, g, 20000)
        best = min(best, time.perf_counter() - start)
    return 20000 * 512 * 8 / best


def _memory_child(kind: str, width: int, height: int) -> None:
    torch.set_num_threads(1)
    SGZPipeline, kernel, *_ = _package()
    pipe = SGZPipeline.from_pretrained()
    frame, tiny = make_frame(width, height), make_frame(96, 72)
    if kind == "unfused":
        run = lambda x: unfused(pipe.model, x)  # noqa: E731
    else:
        run = pipe
    with torch.no_grad(), (torch_tiles(kernel) if kind == "torch tiles" else contextlib.nullcontext()):
        run(tiny)  # warm-up (compilation, lazy initialisation) on a tiny frame
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current RSS
        status = Path("/proc/self/status").read_text()
        before = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
        out = run(frame)
        status = Path("/proc/self/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    del out
    print(json.dumps({"peak_extra_mb": (peak - before) / 1024}))


def peak_extra_mb(kind: str, width: int, height: int) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", kind, str(width), str(height)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def _median_ms(runs: dict, repeats: int, threads: dict) -> dict:
    """Median wall ms of each run, interleaved (thread counts too: ``threads[name]`` is set before each run), plus
    ``"<name> cpu"``: median process CPU ms (what the run costs the machine, far less sensitive to other
    processes than wall time). A short untimed pause before each run lets torch's OpenMP threads of the previous
    run stop spinning, so they do not slow down the next."""
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for name, run in runs.items():
        torch.set_num_threads(threads[name])
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            torch.set_num_threads(threads[name])
            time.sleep(0.02)
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append((time.perf_counter() - start) * 1000)
            cpu[name].append((time.process_time() - cpu_start) * 1000)
    return {name: (float(np.median(times[name])), float(np.median(cpu[name]))) for name in runs}


def _of_threads(medians: dict, threads: int) -> dict:
    """``{name: wall ms, "<name> cpu": CPU ms}`` of the runs keyed ``(threads, name)``."""
    result = {}
    for (count, name), (wall, cpu) in medians.items():
        if count == threads:
            result[name], result[f"{name} cpu"] = wall, cpu
    return result


# Stages of SGZPipeline.__call__ timed by the per-stage table: pipeline functions wrapped while it runs.
STAGES = {
    "factor network": ("_estimate_factors",),
    "v2 low-res steps": ("fit_exposure", "highlight_shoulder", "curve_gain", "estimate_noise_sigma"),
    "full-res pass": ("enhance", "enhance_denoised"),
}


@contextlib.contextmanager
def stage_clock(seconds: dict):
    """Adds each stage's wall seconds into ``seconds`` while the block runs."""
    from comfyui_lowlight.pipelines.sgz import pipeline

    originals = {}

    def timed(stage, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        return run

    for stage, names in STAGES.items():
        for name in names:
            originals[name] = getattr(pipeline, name)
            setattr(pipeline, name, timed(stage, originals[name]))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(pipeline, name, function)


def thread_table(pipe, sizes, conditions, repeats: int) -> None:
    """Section 4 (see the module docstring)."""
    from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline  # the defaults (v2), not _package's PlainSGZ

    variants = {"plain": PLAIN_SGZ, "v2": {}}
    default_threads = torch.get_num_threads()
    rows = []
    for condition in conditions:
        with neighbour(condition == "loaded"):
            load = os.getloadavg()[0]
            for width, height in sizes:
                frame = make_frame(width, height)
                for name, options in variants.items():
                    runs = {threads: {"wall": [], "cpu": [], **{stage: [] for stage in STAGES}} for threads in (1, 2)}
                    for threads in (1, 2):  # warm-up
                        torch.set_num_threads(threads)
                        SGZPipeline.__call__(pipe, frame, **options)
                    for repeat in range(repeats):
                        for threads in (1, 2) if repeat % 2 == 0 else (2, 1):
                            torch.set_num_threads(threads)
                            seconds = {}
                            with stage_clock(seconds):
                                start, cpu = time.perf_counter(), time.process_time()
                                SGZPipeline.__call__(pipe, frame, **options)
                                runs[threads]["wall"].append(1000 * (time.perf_counter() - start))
                                runs[threads]["cpu"].append(1000 * (time.process_time() - cpu))
                            for stage in STAGES:
                                runs[threads][stage].append(1000 * seconds.get(stage, 0.0))
                    ratio = float(np.median([b / a for a, b in zip(runs[1]["wall"], runs[2]["wall"])]))
                    rows.append((condition, load, width, height, name, runs, ratio))
                    print(f"  {condition} {width}x{height} {name}: 2 threads / 1 thread {ratio:.2f}", flush=True)
    torch.set_num_threads(default_threads)
    print("\n2 threads vs 1 thread, per stage (wall ms, medians; CPU = process CPU time; ratio = median of the "
          "paired runs' ratios, < 1: 2 threads faster):\n")
    print("| condition | size | variant | 1 thread ms (CPU) | 2 threads ms (CPU) | 2 thr / 1 thr | "
          + " | ".join(f"{stage} 1 / 2 thr" for stage in STAGES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(STAGES))
    for condition, load, width, height, name, runs, ratio in rows:
        med = {t: {k: float(np.median(v)) for k, v in runs[t].items()} for t in (1, 2)}
        print(f"| {condition} (load {load:.1f}) | {width}x{height} | {name} "
              f"| {med[1]['wall']:.1f} ({med[1]['cpu']:.1f}) | {med[2]['wall']:.1f} ({med[2]['cpu']:.1f}) "
              f"| **{ratio:.2f}** | "
              + " | ".join(f"{med[1][stage]:.1f} / {med[2][stage]:.1f}" if med[1][stage] else "-" for stage in STAGES)
              + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=["1200x900", "1920x1080", "3840x2160"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--threads-detail", action="store_true",
                        help="only the per-stage table of 2 threads vs 1 (plain SGZ and v2)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        kind, width, height = args.memory_child
        _memory_child(kind, int(width), int(height))
        return

    SGZPipeline, kernel, enhance, estimate_factor_lowres = _package()
    pipe = SGZPipeline.from_pretrained()
    default_threads = torch.get_num_threads()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    if args.threads_detail:
        print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; shipped weights; {args.repeats} paired "
              f"repetitions; load average (1 min) at start {os.getloadavg()[0]:.2f}")
        thread_table(pipe, sizes, args.conditions, args.repeats)
        return
    rate = l1_rate()
    print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}; shipped weights; {args.repeats} interleaved "
          f"repetitions, median; load average (1 min) at start {os.getloadavg()[0]:.2f}")
    print(f"compute bound: {FLOPS_PER_VALUE} float ops per value at {rate / 1e9:.1f} GFLOP/s per thread (the "
          "recurrence held in L1, measured now)\n")

    end_to_end, full_res = [], []
    diffs = {}
    for condition in args.conditions:
        with neighbour(condition == "loaded"):
            load = os.getloadavg()[0]
            for width, height in sizes:
                frame = make_frame(width, height)
                batch = torch.from_numpy(frame).permute(2, 0, 1)[None]
                with torch.no_grad():
                    torch.set_num_threads(1)
                    factor = estimate_factor_lowres(pipe.model, batch, DOWNSCALE).float()
                    if (width, height) not in diffs:
                        image = batch.float() / 255.0
                        reference = unfused(pipe.model, frame, float_output=True)
                        diffs[width, height] = (
                            (pipe(image) - reference).abs().max().item(),
                            int(np.abs(pipe(frame).astype(int) - unfused(pipe.model, frame).astype(int)).max()),
                        )

                    def tiles_pipeline():
                        with torch_tiles(kernel):
                            pipe(frame)

                    # Every variant at every thread count in one interleaved loop: the other processes' load
                    # hits them alike.
                    e2e_runs, pass_runs, run_threads = {}, {}, {}
                    reused = torch.empty_like(batch)
                    for threads in args.threads:
                        e2e_runs.update({
                            (threads, "kernel"): lambda: pipe(frame),
                            (threads, "torch tiles"): tiles_pipeline,
                            (threads, "unfused"): lambda: unfused(pipe.model, frame),
                        })
                        pass_runs.update({
                            (threads, "kernel"): lambda: enhance(batch, factor, RECURRENCES, torch.uint8),
                            (threads, "kernel, reused output"): lambda: kernel.enhance_cpu(
                                batch, factor, RECURRENCES, torch.uint8, out=reused),
                            (threads, "torch tiles"): lambda: enhance(batch, factor, RECURRENCES, torch.uint8,
                                                                      use_kernel=False),
                        })
                        run_threads.update({(threads, name): threads for name in (
                            "kernel", "torch tiles", "unfused", "kernel, reused output")})
                    e2e_all = _median_ms(e2e_runs, args.repeats, run_threads)
                    passes_all = _median_ms(pass_runs, args.repeats, run_threads)
                for threads in args.threads:
                    e2e, passes = _of_threads(e2e_all, threads), _of_threads(passes_all, threads)
                    bound = width * height * 3 * FLOPS_PER_VALUE / (rate * threads) * 1000
                    end_to_end.append((condition, load, threads, width, height, e2e))
                    full_res.append((condition, threads, width, height, passes, bound))
                    print(f"  {condition} {threads} thread(s) {width}x{height}: pipeline {e2e['kernel']:.1f} ms, "
                          f"unfused {e2e['unfused']:.1f} ms", flush=True)
    torch.set_num_threads(default_threads)

    print("\nEnd to end (uint8 frame in and out):\n")
    print("| condition | threads | size | kernel ms | FPS | kernel CPU ms | torch tiles ms | unfused ms | vs unfused "
          "| vs torch tiles | 2 threads vs 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    one_thread = {(c, w, h): e["kernel"] for c, _, t, w, h, e in end_to_end if t == 1}
    for condition, load, threads, width, height, e in end_to_end:
        ms = e["kernel"]
        versus_one = f"{one_thread[condition, width, height] / ms:.2f}x" if threads != 1 and (
            condition, width, height) in one_thread else "-"
        print(f"| {condition} (load {load:.1f}) | {threads} | {width}x{height} | {ms:.1f} | {1000 / ms:.0f} "
              f"| {e['kernel cpu']:.1f} | {e['torch tiles']:.1f} | {e['unfused']:.1f} | {e['unfused'] / ms:.1f}x | "
              f"{e['torch tiles'] / ms:.1f}x | {versus_one} |")

    print("\nFull-resolution pass alone (enhance, uint8 in and out) vs its compute bound:\n")
    print("| condition | threads | size | kernel ms | kernel CPU ms | into a reused output ms (CPU) | torch tiles ms "
          "| kernel vs torch tiles | compute bound ms | kernel / bound | reused output / bound "
          "| kernel CPU / (bound x threads) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for condition, threads, width, height, p, bound in full_res:
        reused = p["kernel, reused output"]
        print(f"| {condition} | {threads} | {width}x{height} | {p['kernel']:.1f} | {p['kernel cpu']:.1f} "
              f"| {reused:.1f} ({p['kernel, reused output cpu']:.1f}) | {p['torch tiles']:.1f} "
              f"| {p['torch tiles'] / p['kernel']:.1f}x | {bound:.1f} | {p['kernel'] / bound:.1f}x "
              f"| {reused / bound:.1f}x | {p['kernel cpu'] / (bound * threads):.1f}x |")

    print("\nAgreement with the unfused equations: " + "; ".join(
        f"{w}x{h}: float {d[0]:.1e}, uint8 {d[1]} level(s)" for (w, h), d in diffs.items()))
    thread_table(pipe, sizes, args.conditions, args.repeats)
    if args.no_memory:
        return
    print("\nPeak extra memory of one call (1 thread, fresh process; limit: 2 float32 frames):\n")
    print("| size | kernel MB | torch tiles MB | unfused MB | 2 float32 frames MB |")
    print("|---|---|---|---|---|")
    for width, height in sizes:
        memory = {kind: peak_extra_mb(kind, width, height) for kind in ("kernel", "torch tiles", "unfused")}
        print(f"| {width}x{height} | {memory['kernel']:.0f} | {memory['torch tiles']:.0f} | {memory['unfused']:.0f} "
              f"| {2 * width * height * 3 * 4 / 2 ** 20:.0f} |")


if __name__ == "__main__":
    main()
