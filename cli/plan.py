"""Batch planning shared by ``lowlight enhance``'s methods: which input file goes to which output path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..pipelines.media.image_io import IMAGE_EXTENSIONS
from ..pipelines.media.video_io import VIDEO_EXTENSIONS


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
