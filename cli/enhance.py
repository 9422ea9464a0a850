"""``lowlight enhance``: images, folders (recursively, relative layout kept) and videos, with SGZ or SCUF.

    lowlight enhance INPUT... -o OUT [--method sgz] [SGZ options]
    lowlight enhance INPUT... -o OUT --method scuf --base SD_TURBO [SCUF options]
    accelerate launch --multi_gpu --num_processes N -m comfyui_lowlight enhance [--method sgz|scuf] ...

Each output keeps its input's format (16-bit PNG stays 16-bit, alpha is kept, grey stays grey) and is written
atomically. Failures are reported per file and the run goes on; the exit code is 1 when any file failed, 2 for
unusable arguments, weights or device. ``--method scuf`` enhances images only (videos are reported as failures).
Animated GIF/PNG/WebP files come out as animations of their format: with SGZ their frames go through the video path
(temporal smoothing, chunks, ``--max-frames``), with SCUF each frame is enhanced on its own.
Ctrl-C and SIGTERM (``docker stop``, systemd) stop the batch alike: the file in progress leaves no temporary file,
the summary line is printed, and the exit code is 128 + the signal's number (130, 143).

Under ``accelerate launch`` (both methods) every process plans the same sorted job list, takes its share
(``PartialState.split_between_processes``; ``--multi_gpu`` also on a CPU-only machine: it is what makes accelerate
start N processes, with ``--cpu`` it starts one), reports failures and a summary line tagged [process i/N] and exits 1
if a file of its share failed. On the CPU the N processes of a machine divide its cores: each uses at most
cores/N torch threads (fewer when OMP_NUM_THREADS says so; accelerate sets it to 1 unless you set it).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ..pipelines.scuf.options import (
    DEFAULT_DTYPE,
    DTYPE_HELP,
    DTYPES,
    PROMPT_HELP,
    TILE_OVERLAP,
    TILE_SIZE,
    tiling_problem,
)
from ..pipelines.sgz.options import SGZ_OPTIONS, TEMPORAL_SMOOTHING, VIDEO_TEMPORAL_SMOOTHING
from .plan import (
    Job,
    Processes,
    interruption_exit_code,
    interruption_name,
    plan_jobs,
    run_share,
    sigterm_as_interrupt,
)

METHODS = ("sgz", "scuf")
# Each method's own options: the other method refuses them instead of silently ignoring them.
METHOD_OPTIONS = {
    "sgz": ("weights", *SGZ_OPTIONS, "max_frames", "chunk_size", "quality", "crf"),
    "scuf": ("base", "image_encoder", "scuf_weights", "dtype", "tile_size", "tile_overlap", "prompt"),
}


def add_parser(commands) -> None:
    enhance = commands.add_parser(
        "enhance",
        help="enhance images, folders (recursively) and videos with SGZ (default) or SCUF",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    enhance.set_defaults(run=functools.partial(run, parser=enhance))
    enhance.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or video files, or folders")
    enhance.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                         help="output folder (or the output file name for a single input file)")
    enhance.add_argument("--method", choices=METHODS, default="sgz",
                         help="sgz: real-time zero-shot (default); scuf: one-step SD-Turbo (images only)")
    enhance.add_argument("--device", default="auto",
                         help="torch device: auto (default: cuda, then mps, then cpu), cpu, cuda:0, ...; with "
                              "--method scuf only auto (accelerate gives each process its device) or cpu")
    enhance.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")

    sgz = enhance.add_argument_group("SGZ options (--method sgz)")
    sgz.add_argument("--weights", type=Path, default=None,
                     help="SGZ weights: our .safetensors or the official .pth, or the name of a shipped file "
                          "(default: the shipped sgz_lowlight.safetensors, trained for v2; "
                          "sgz_lowlight_v1.safetensors: the first weights, trained for plain SGZ)")
    for option in SGZ_OPTIONS.values():
        if option is not TEMPORAL_SMOOTHING:
            sgz.add_argument(option.flag, type=option.type, default=option.default,
                             help=f"{option.help} {option.min:g}..{option.max:g} (default {option.default:g})")
    smoothing = sgz.add_mutually_exclusive_group()
    smoothing.add_argument(TEMPORAL_SMOOTHING.flag, type=float, default=VIDEO_TEMPORAL_SMOOTHING, metavar="S",
                           help=f"{TEMPORAL_SMOOTHING.help} {TEMPORAL_SMOOTHING.min:g}..{TEMPORAL_SMOOTHING.max:g} "
                                f"(default {VIDEO_TEMPORAL_SMOOTHING:g} for videos)")
    smoothing.add_argument("--no-temporal-smoothing", dest="temporal_smoothing", action="store_const", const=0.0,
                           help="video: enhance every frame independently")
    sgz.add_argument("--max-frames", type=int, default=None,
                     help="video or animated GIF/PNG/WebP: only the first N frames (audio cut to match)")
    sgz.add_argument("--chunk-size", type=int, default=8,
                     help="video: frames processed at once (memory vs speed; default 8)")
    sgz.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    sgz.add_argument("--crf", type=int, default=18, help="H.264 quality, lower is better (default 18)")

    scuf = enhance.add_argument_group("SCUF options (--method scuf)")
    scuf.add_argument("--base", type=Path, default=None,
                      help="SD-Turbo (required): a diffusers folder (or one written by SCUFPipeline.save_pretrained) "
                           "or the single file sd_turbo.safetensors")
    scuf.add_argument("--image-encoder", default=None,
                      help="CLIP ViT-B/32: OpenAI state-dict file, transformers folder or hub id (not needed if "
                           "--base has an image_encoder folder)")
    scuf.add_argument("--scuf-weights", type=Path, default=None,
                      help="SCUF weights (ours .safetensors or the official .pkl); not needed if --base has them")
    scuf.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE, help=f"{DTYPE_HELP} (default {DEFAULT_DTYPE})")
    scuf.add_argument(TILE_SIZE.flag, type=TILE_SIZE.type, default=None,
                      help=f"{TILE_SIZE.help} {TILE_SIZE.min}..{TILE_SIZE.max}, multiple of {TILE_SIZE.multiple} "
                           f"(default: no tiling; {TILE_SIZE.default} is SD-Turbo's native size)")
    scuf.add_argument(TILE_OVERLAP.flag, type=TILE_OVERLAP.type, default=TILE_OVERLAP.default,
                      help=f"{TILE_OVERLAP.help} {TILE_OVERLAP.min}..{TILE_OVERLAP.max}, multiple of "
                           f"{TILE_OVERLAP.multiple} (default {TILE_OVERLAP.default})")
    scuf.add_argument("--prompt", default=None, help=PROMPT_HELP)


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for method, names in METHOD_OPTIONS.items():
        for name in names:
            if method != args.method and getattr(args, name) != parser.get_default(name):
                parser.error(f"--{name.replace('_', '-')} is an option of --method {method}, not {args.method}")
    if args.method == "scuf":
        if args.base is None:
            parser.error("--method scuf needs --base (SD-Turbo: a diffusers folder or sd_turbo.safetensors)")
        if args.device not in ("auto", "cpu"):
            parser.error(f"--device: --method scuf takes auto or cpu, got {args.device!r}")
        problem = tiling_problem(args.tile_size, args.tile_overlap)
        if problem is not None:
            option, detail = problem
            parser.error(f"{option.flag}: {detail}")
        return
    for option in SGZ_OPTIONS.values():
        problem = option.problem(getattr(args, option.name))
        if problem is not None:
            parser.error(f"{option.flag}: {problem}")
    if args.max_frames is not None and args.max_frames < 1:
        parser.error(f"--max-frames: expected >= 1, got {args.max_frames}")
    if args.chunk_size < 1:
        parser.error(f"--chunk-size: expected >= 1, got {args.chunk_size}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality: expected 1..100, got {args.quality}")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _validate(args, parser)
    # SIGTERM (docker stop, systemd) ends the batch as Ctrl-C does: temporary files removed, summary printed
    with sigterm_as_interrupt():
        try:
            return run_scuf(args) if args.method == "scuf" else run_sgz(args)
        except KeyboardInterrupt as stop:  # before the batch started (while loading the model): nothing written
            print(f"lowlight: interrupted by {interruption_name(stop)} before any file was written", file=sys.stderr)
            return interruption_exit_code(interruption_name(stop))


def _exit_code(counts) -> int:
    if counts.interrupted:
        return interruption_exit_code(counts.interrupted)
    return 1 if counts.failed else 0


# ------------------------------------------------------------------------------------------------------ SGZ


def _unavailable_device(name: str) -> str | None:
    """Why ``--device name`` cannot be used here (a CUDA or MPS device this machine lacks), or None."""
    import torch

    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: no CUDA device is available (torch sees no GPU); use --device cpu or auto"
    if kind == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        return f"--device {name}: no MPS device is available; use --device cpu or auto"
    return None


def _resolve_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class _Enhancer:
    """Runs the pipeline on decoded pixels with the command-line settings."""

    def __init__(self, pipe, args: argparse.Namespace, show_progress: bool = True):
        self.pipe = pipe
        self.args = args
        self.show_progress = show_progress
        # Every option of the table but the smoothing, which applies to videos only.
        self.settings = {name: getattr(args, name) for name in SGZ_OPTIONS if name != TEMPORAL_SMOOTHING.name}

    def image(self, job: Job) -> None:
        from ..pipelines.media.image_io import read_image, write_image

        loaded = read_image(job.source)
        # uint8 in -> uint8 out, uint16 (16-bit PNG) in -> uint16 out: the pipeline keeps the dtype.
        enhanced = self.pipe(loaded.pixels, **self.settings)
        write_image(job.destination, enhanced, loaded.alpha, grayscale=loaded.grayscale,
                    icc_profile=loaded.icc_profile, quality=self.args.quality, exif=loaded.exif)

    def animation(self, job: Job, progress_position: int) -> None:
        """An animated GIF/PNG/WebP: its frames go through the pipeline as a video's do (temporal smoothing, chunks,
        --max-frames) and come back as an animated file of the output's format."""
        from tqdm import tqdm

        from ..pipelines.media.animated_io import AnimationReader, enhance_animation

        smoothing = self.args.temporal_smoothing
        with AnimationReader(job.source) as reader:
            total = reader.frame_count if self.args.max_frames is None else min(reader.frame_count,
                                                                                 self.args.max_frames)
            state = self.pipe.new_video_state() if smoothing > 0 else None
            with tqdm(total=total, desc=job.source.name, unit="frame", position=progress_position, leave=False,
                      disable=not self.show_progress) as bar:
                enhance_animation(
                    reader, job.destination,
                    lambda frames: self.pipe(frames, temporal_smoothing=smoothing, video_state=state, **self.settings),
                    chunk_size=self.args.chunk_size, max_frames=self.args.max_frames, quality=self.args.quality,
                    on_frames=bar.update)

    def video(self, job: Job, progress_position: int) -> None:
        from tqdm import tqdm

        from ..pipelines.media.video_io import VideoChunk, VideoReader, VideoWriter, run_overlapped

        smoothing = self.args.temporal_smoothing
        with VideoReader(job.source) as reader, VideoWriter(job.destination, reader, crf=self.args.crf) as writer:
            total = reader.frame_count
            if self.args.max_frames is not None:
                total = min(total or self.args.max_frames, self.args.max_frames)
            state = self.pipe.new_video_state() if smoothing > 0 else None
            with tqdm(total=total, desc=job.source.name, unit="frame", position=progress_position, leave=False,
                      disable=not self.show_progress) as bar:
                def enhance(chunk: VideoChunk) -> VideoChunk:
                    # uint8 [N, H, W, 3] in and out: the pipeline's fused pass converts on the fly.
                    frames = self.pipe(chunk.frames, temporal_smoothing=smoothing, video_state=state, **self.settings)
                    return VideoChunk(frames, chunk.pts)

                # Decoding and encoding run on their own threads, overlapping the enhancement.
                for count in run_overlapped(reader.chunks(self.args.chunk_size, self.args.max_frames), enhance,
                                            writer.write):
                    bar.update(count)
            writer.close(complete=self.args.max_frames is None)


def _failure_reporter(prefix: str):
    def report(source: Path, error: BaseException | str) -> None:
        from tqdm import tqdm

        message = str(error)
        if str(source) not in message:
            message = f"{source}: {message}"
        tqdm.write(f"{prefix}: failed: {message}", file=sys.stderr)

    return report


def run_sgz(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..pipelines.sgz.pipeline import SGZPipeline

    processes = Processes.launched(args.device)
    prefix = "lowlight" if processes.count == 1 else f"lowlight {processes.tag}"
    problem = _unavailable_device(args.device)
    if problem:
        print(f"{prefix}: {problem}", file=sys.stderr)
        return 2
    plan = plan_jobs(args.inputs, args.output)
    if not plan.jobs and not plan.failures:
        print(f"{prefix}: no images or videos found in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    # under accelerate launch, --device auto is the device accelerate gives this process
    device = _resolve_device(args.device) if processes.state is None or args.device != "auto" else processes.state.device
    if device.type == "cpu":
        processes.divide_cpu_threads()
    try:
        pipe = SGZPipeline.from_pretrained(args.weights, device=device)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"{prefix}: cannot load the weights: {error}", file=sys.stderr)
        return 2
    enhancer = _Enhancer(pipe, args, show_progress=processes.is_main)

    def enhance(job: Job) -> None:
        from ..pipelines.media.animated_io import is_animated_image

        if job.is_video:
            enhancer.video(job, progress_position=1)
        elif is_animated_image(job.source):
            enhancer.animation(job, progress_position=1)
        else:
            enhancer.image(job)

    counts = run_share(plan, processes, enhance, _failure_reporter(prefix), overwrite=args.overwrite,
                       progress=lambda share: tqdm(share, desc=prefix, unit="file", disable=not processes.is_main))
    hint = " (outputs already exist; --overwrite replaces them)" if counts.skipped else ""
    print(f"{prefix}: {counts.written} written, {counts.skipped} skipped{hint}, {counts.failed} failed"
          f"{counts.interruption_note()}", flush=True)
    if not counts.interrupted:  # the other processes were signalled too: no barrier to wait at
        processes.wait()
    return _exit_code(counts)


# ----------------------------------------------------------------------------------------------------- SCUF


def run_scuf(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..pipelines.scuf.batch import enhance_file, load_pipeline

    processes = Processes.launched(args.device, always=True)
    tag = processes.tag
    plan = plan_jobs(args.inputs, args.output)
    if not plan.jobs and not plan.failures:
        print(f"{tag} no images found in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    if processes.state.device.type == "cpu":
        processes.divide_cpu_threads()
    try:
        pipe = load_pipeline(args, processes.state.device)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"{tag} could not load the SCUF model: {exc}", file=sys.stderr)
        return 2

    def report_failure(source: Path, error: BaseException | str) -> None:
        why = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
        tqdm.write(f"{tag} failed: {source}: {why}", file=sys.stderr)

    counts = run_share(
        plan, processes, lambda job: enhance_file(pipe, job.source, job.destination, args.prompt,
                                                  show_progress=processes.is_main), report_failure,
        overwrite=args.overwrite,
        refuse=lambda job: "videos are not supported by --method scuf (images only)" if job.is_video else None,
        progress=lambda share: tqdm(share, desc=f"SCUF {tag}", disable=not processes.is_main),
    )
    print(f"{tag} enhanced {counts.written} of {counts.share} images, {counts.failed} failed"
          + (f"; skipped {counts.skipped} existing outputs" if counts.skipped else "") + counts.interruption_note(),
          file=sys.stderr, flush=True)
    if not counts.interrupted:
        processes.wait()
    return _exit_code(counts)
