"""Batch planning shared by ``lowlight enhance``'s methods: which input file goes to which output path, and which
process of an ``accelerate launch`` run enhances it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..pipelines.media.animated_io import ANIMATION_EXTENSIONS
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
    media = IMAGE_EXTENSIONS | ANIMATION_EXTENSIONS | VIDEO_EXTENSIONS
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


def launched_process_count() -> int:
    """How many processes ``accelerate launch`` (or torchrun) started; 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Processes:
    """The processes of one ``lowlight enhance`` run: a plain run alone, or those of ``accelerate launch``.

    Every process plans the same sorted job list and :meth:`share` hands it its part
    (``PartialState.split_between_processes``); ``state`` is None for a plain run, which never imports accelerate.
    """

    def __init__(self, state=None):
        self.state = state
        self.index = 0 if state is None else state.process_index
        self.count = 1 if state is None else state.num_processes
        self.tag = f"[process {self.index + 1}/{self.count}]"

    @classmethod
    def launched(cls, device: str, *, always: bool = False) -> Processes:
        """Join the processes of ``accelerate launch`` when there are several (``always``: also a plain run, for
        accelerate's device choice); otherwise stay alone without importing accelerate."""
        if launched_process_count() == 1 and not always:
            return cls()
        import torch
        from accelerate import PartialState

        # without an accelerator, accelerate only forms a multi-process (gloo) group when asked for CPU explicitly
        return cls(PartialState(cpu=device == "cpu" or not torch.accelerator.is_available()))

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @contextmanager
    def share(self, jobs: list[Job]) -> Iterator[list[Job]]:
        if self.state is None:
            yield list(jobs)
        else:
            with self.state.split_between_processes(list(jobs)) as part:
                yield part

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def divide_cpu_threads(self) -> None:
        """On the CPU, give each of the processes on this machine its part of the cores as torch threads (never
        more than ``OMP_NUM_THREADS`` allows), instead of every process starting one thread per core."""
        if self.count == 1:
            return
        import torch

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.count))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // local_processes)))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, systemd) raised as the interrupt Ctrl-C raises, so the same cleanup runs: the
    writers remove their hidden ``.part`` files and the batch ends with its summary."""


def interruption_name(stop: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(stop, Terminated) else "SIGINT"


def interruption_exit_code(stop_name: str) -> int:
    """The shell's convention for a run ended by a signal: 128 + its number."""
    return 128 + signal.Signals[stop_name].value


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (in the main thread; elsewhere it is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class BatchCounts:
    """What one process did with its share (planning failures are counted by the main process only);
    ``interrupted``: the signal that ended the run early ("SIGINT", "SIGTERM"), or None."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    share: int = 0
    interrupted: str | None = None

    def interruption_note(self) -> str:
        return f"; interrupted by {self.interrupted}, the file in progress was not written" if self.interrupted else ""


def run_share(
    plan: Plan,
    processes: Processes,
    enhance: Callable[[Job], None],
    report_failure: Callable[[Path, BaseException | str], None],
    *,
    overwrite: bool,
    refuse: Callable[[Job], str | None] = lambda job: None,
    progress: Callable[[list[Job]], object] = iter,
) -> BatchCounts:
    """Enhance this process's share of ``plan``: existing outputs are skipped unless ``overwrite``, a job that
    ``refuse`` gives a reason for fails with it, and a file that raises fails alone (reported, the run goes on).
    Ctrl-C or SIGTERM (within :func:`sigterm_as_interrupt`) stops the batch: the counts so far are returned with
    ``interrupted`` set (the file in progress removed its temporary file on the way out)."""
    counts = BatchCounts()
    if processes.is_main:
        for source, reason in plan.failures:
            report_failure(source, reason)
        counts.failed = len(plan.failures)
    with processes.share(plan.jobs) as share:
        counts.share = len(share)
        try:
            for job in progress(share):
                reason = refuse(job)
                if reason is not None:
                    counts.failed += 1
                    report_failure(job.source, reason)
                elif job.destination.exists() and not overwrite:
                    counts.skipped += 1
                else:
                    try:
                        job.destination.parent.mkdir(parents=True, exist_ok=True)
                        enhance(job)
                        counts.written += 1
                    except Exception as error:  # one bad file must not stop the batch; it is reported and counted
                        counts.failed += 1
                        report_failure(job.source, error)
        except KeyboardInterrupt as stop:
            counts.interrupted = interruption_name(stop)
    return counts
