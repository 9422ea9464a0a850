"""``lowlight`` command line: enhance images, folders and videos with SGZ.

    python -m comfyui_lowlight enhance INPUT... -o OUT [options]

Folders are searched recursively and their relative layout is recreated under OUT; each output keeps its
input's format (16-bit PNG stays 16-bit, alpha is kept, grey stays grey). Failures are reported per file and
the run goes on; the exit code is 1 when any file failed, 2 for unusable arguments or weights.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .pipelines.image_io import IMAGE_EXTENSIONS
from .pipelines.sgz_options import DOWNSCALE, RECURRENCES, SGZ_OPTIONS, STRENGTH, TEMPORAL_SMOOTHING, VIDEO_TEMPORAL_SMOOTHING
from .pipelines.video_io import VIDEO_EXTENSIONS


@dataclass
class Job:
    """One input file and where its result goes."""

    source: Path
    destination: Path
    is_video: bool


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def plan_jobs(inputs: list[Path], output: Path) -> Plan:
    """Map every input to its destination.

    Files go to ``output/<name>``; a folder's images and videos go to ``output/<path relative to the folder>``
    (hidden files, e.g. leftovers of an interrupted run, and anything inside ``output`` are skipped). With a
    single input file, ``output`` may name the output file itself (when it has an image/video extension).
    A destination that is one of the inputs or collides with another input's destination is a failure.
    """
    plan = Plan()
    media = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    single_file_output = len(inputs) == 1 and inputs[0].is_file() and output.suffix.lower() in media
    candidates: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                relative = path.relative_to(item)
                if path.is_file() and path.suffix.lower() in media and not _is_hidden(relative):
                    # Earlier results in an output folder nested inside the input folder are not inputs.
                    if output.resolve() == item.resolve() or not _is_within(path, output):
                        candidates.append((path, output / relative))
        elif item.is_file():
            candidates.append((item, output if single_file_output else output / item.name))
        else:
            plan.failures.append((item, "no such file or folder"))
    sources = {source.resolve() for source, _ in candidates}
    claimed: dict[Path, Path] = {}
    for source, destination in candidates:
        if destination.suffix.lower() not in media:
            # An explicitly named file with an unusual extension: try it as an image, write PNG.
            destination = destination.with_suffix(".png")
        resolved = destination.resolve()
        if resolved in sources:
            plan.failures.append((source, f"refusing to overwrite the input {destination} (choose another -o)"))
        elif resolved in claimed:
            plan.failures.append((source, f"output {destination} is also the output of {claimed[resolved]}"))
        else:
            claimed[resolved] = source
            is_video = source.suffix.lower() in VIDEO_EXTENSIONS
            plan.jobs.append(Job(source, destination, is_video))
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowlight", description="Low-light enhancement (SGZ) for images, folders and videos.")
    commands = parser.add_subparsers(dest="command", required=True)
    enhance = commands.add_parser(
        "enhance",
        help="enhance images, folders (recursively) and videos",
        description="Enhance images, folders (recursively, relative paths kept) and videos (mp4/mov/avi/mkv).",
    )
    enhance.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image or video files, or folders")
    enhance.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                         help="output folder (or the output file name for a single input file)")
    enhance.add_argument("--weights", type=Path, default=None,
                         help="SGZ weights: our .safetensors or the official .pth (default: the shipped weights)")
    for option in (DOWNSCALE, RECURRENCES, STRENGTH):
        enhance.add_argument(option.flag, type=option.type, default=option.default,
                             help=f"{option.help} {option.min:g}..{option.max:g} (default {option.default:g})")
    enhance.add_argument("--device", default="auto", help="torch device: auto (default: cuda, then mps, then cpu), cpu, cuda:0, ...")
    enhance.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    smoothing = enhance.add_mutually_exclusive_group()
    smoothing.add_argument(TEMPORAL_SMOOTHING.flag, type=float, default=VIDEO_TEMPORAL_SMOOTHING, metavar="S",
                           help=f"video deflicker. {TEMPORAL_SMOOTHING.help} {TEMPORAL_SMOOTHING.min:g}.."
                                f"{TEMPORAL_SMOOTHING.max:g} (default {VIDEO_TEMPORAL_SMOOTHING:g} for videos)")
    smoothing.add_argument("--no-temporal-smoothing", dest="temporal_smoothing", action="store_const", const=0.0,
                           help="video: enhance every frame independently")
    enhance.add_argument("--max-frames", type=int, default=None, help="video: only the first N frames (audio cut to match)")
    enhance.add_argument("--chunk-size", type=int, default=8, help="video: frames processed at once (memory vs speed; default 8)")
    enhance.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    enhance.add_argument("--crf", type=int, default=18, help="H.264 quality, lower is better (default 18)")
    return parser


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
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

    def __init__(self, pipe, args: argparse.Namespace):
        self.pipe = pipe
        self.args = args
        self.settings = dict(downscale=args.downscale, recurrences=args.recurrences, strength=args.strength)

    def image(self, job: Job) -> None:
        from .pipelines.image_io import read_image, write_image

        loaded = read_image(job.source)
        # uint8 in -> uint8 out, uint16 (16-bit PNG) in -> uint16 out: the pipeline keeps the dtype.
        enhanced = self.pipe(loaded.pixels, **self.settings)
        write_image(job.destination, enhanced, loaded.alpha, grayscale=loaded.grayscale,
                    icc_profile=loaded.icc_profile, quality=self.args.quality)

    def video(self, job: Job, progress_position: int) -> None:
        from tqdm import tqdm

        from .pipelines.video_io import VideoChunk, VideoReader, VideoWriter

        smoothing = self.args.temporal_smoothing
        with VideoReader(job.source) as reader, VideoWriter(job.destination, reader, crf=self.args.crf) as writer:
            total = reader.frame_count
            if self.args.max_frames is not None:
                total = min(total or self.args.max_frames, self.args.max_frames)
            state = self.pipe.new_video_state() if smoothing > 0 else None
            with tqdm(total=total, desc=job.source.name, unit="frame", position=progress_position, leave=False) as bar:
                for chunk in reader.chunks(self.args.chunk_size, self.args.max_frames):
                    # uint8 [N, H, W, 3] in and out: the pipeline's fused pass converts tile by tile.
                    enhanced = self.pipe(chunk.frames, temporal_smoothing=smoothing, video_state=state, **self.settings)
                    writer.write(VideoChunk(enhanced, chunk.pts))
                    bar.update(len(chunk.pts))
            writer.close(complete=self.args.max_frames is None)


def _report_failure(source: Path, error: BaseException | str) -> None:
    from tqdm import tqdm

    message = str(error)
    if str(source) not in message:
        message = f"{source}: {message}"
    tqdm.write(f"lowlight: failed: {message}", file=sys.stderr)


def run_enhance(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipelines.sgz_pipeline import SGZPipeline

    plan = plan_jobs(args.inputs, args.output)
    for source, reason in plan.failures:
        _report_failure(source, reason)
    if not plan.jobs and not plan.failures:
        print(f"lowlight: no images or videos found in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    try:
        pipe = SGZPipeline.from_pretrained(args.weights, device=_resolve_device(args.device))
    except (OSError, ValueError, RuntimeError) as error:
        print(f"lowlight: cannot load the weights: {error}", file=sys.stderr)
        return 2
    enhancer = _Enhancer(pipe, args)
    written = skipped = 0
    failed = len(plan.failures)
    with tqdm(plan.jobs, desc="lowlight", unit="file") as bar:
        for job in bar:
            if job.destination.exists() and not args.overwrite:
                skipped += 1
                continue
            try:
                job.destination.parent.mkdir(parents=True, exist_ok=True)
                if job.is_video:
                    enhancer.video(job, progress_position=1)
                else:
                    enhancer.image(job)
                written += 1
            except KeyboardInterrupt:
                raise
            except Exception as error:  # one bad file must not stop the batch; it is reported and counted
                failed += 1
                _report_failure(job.source, error)
    hint = " (outputs already exist; --overwrite replaces them)" if skipped else ""
    print(f"lowlight: {written} written, {skipped} skipped{hint}, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(args, parser)
    if args.command == "enhance":
        return run_enhance(args)
    parser.error(f"unknown command {args.command!r}")
    return 2
