"""The ``lowlight`` command (also ``python -m comfyui_lowlight``): one face over the SGZ and SCUF cores.

    lowlight enhance INPUT... -o OUT [--method sgz|scuf] ...    images, folders, videos (enhance.py)
    lowlight train sgz --data DIR ... --output DIR ...          zero-shot SGZ training (train.py)
    lowlight train scuf [caption] --low DIR --normal DIR ...    SCUF LoRA fine-tuning (train.py)
    lowlight convert-scuf OFFICIAL.pkl OUT.safetensors          official SCUF checkpoint -> ours (convert_scuf.py)

Each subcommand maps its arguments onto a core and imports it (and torch) only when it runs, so ``--help`` answers
at once. Exit codes: 0 done, 1 some files failed (the others were written), 2 unusable arguments, weights or data.
"""

from __future__ import annotations

import argparse
import sys

from . import convert_scuf, enhance, train
from .plan import Job, Plan, plan_jobs

__all__ = ["Job", "Plan", "build_parser", "main", "plan_jobs"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowlight", description="Low-light enhancement (SGZ, SCUF) of images, folders and videos; training.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    enhance.add_parser(commands)
    train.add_parser(commands)
    convert_scuf.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:3] == ["train", "scuf", train.SCUF_CAPTION]:
        args = train.scuf_caption_parser().parse_args(argv[3:])
    else:
        args = build_parser().parse_args(argv)
    return args.run(args)
