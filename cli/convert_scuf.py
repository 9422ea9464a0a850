"""``lowlight convert-scuf OFFICIAL.pkl OUT.safetensors``: the official GEFU checkpoint -> our SCUF weights file."""

from __future__ import annotations

import argparse
import functools

# The directions of the official checkpoint (``scuf_weights.OFFICIAL_VAE_PREFIX``; kept here so --help needs no torch).
DIRECTIONS = ("a2b", "b2a")


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert-scuf", help="official SCUF checkpoint (.pkl) -> our .safetensors",
        description="Convert a checkpoint written by the official SCUF src/train.py (torch.save dict, read with "
                    "weights_only=True) into our SCUF weights file (.safetensors).",
    )
    convert.add_argument("official", help="checkpoint written by the official src/train.py (torch.save dict)")
    convert.add_argument("output", help="output .safetensors path")
    convert.add_argument("--direction", default="a2b", choices=DIRECTIONS,
                         help="a2b = lighten (default, what official inference uses), b2a = darken")
    convert.add_argument("--unet-config", default=None,
                         help="UNet config.json (or folder) of the base model; default: SD-Turbo's")
    convert.set_defaults(run=functools.partial(run, parser=convert))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.output.endswith(".safetensors"):
        parser.error("output must end with .safetensors")
    from ..pipelines.scuf.weights import convert_official_file

    print(convert_official_file(args.official, args.output, args.direction, args.unet_config))
    return 0
