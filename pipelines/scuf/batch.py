"""The core of ``lowlight enhance --method scuf``: load the SCUF pipeline its arguments describe, enhance one file.

The command line, the job planning and the split across processes are in ``cli/enhance.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..media.image_io import read_image, to_integer_pixels, write_image


def load_pipeline(args: argparse.Namespace, device):
    """The SCUF pipeline described by the command-line arguments, on ``device`` in ``args.dtype``."""
    import torch

    from .pipeline import SCUFPipeline

    pipe = SCUFPipeline.from_path(args.base, dtype=getattr(torch, args.dtype), image_encoder=args.image_encoder,
                                  scuf_weights=args.scuf_weights)
    if pipe.scuf_config is None:
        raise ValueError(f"no SCUF weights: pass --scuf-weights (the base model {args.base} has none)")
    pipe.to(device)
    if args.tile_size is not None:
        pipe.enable_vae_tiling(args.tile_size, args.tile_overlap)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enhance_file(pipe, source: Path, destination: Path, prompt: str | None, show_progress: bool = True) -> None:
    """Enhance one image file into ``destination`` (atomic), keeping bit depth, alpha, grey, ICC profile and EXIF.
    An animated GIF/PNG/WebP is enhanced frame by frame (each independently) into an animated file."""
    from ..media.animated_io import is_animated_image

    if is_animated_image(source):
        _enhance_animation(pipe, source, destination, prompt, show_progress)
        return
    loaded = read_image(source)
    # uint8 pixels take the pipeline's exact official resize path; 16-bit goes in as float
    image = loaded.pixels if loaded.bit_depth == 8 else loaded.to_float()
    enhanced = pipe(image, prompt=prompt, output_type="np").images[0]
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_image(destination, to_integer_pixels(enhanced, loaded.bit_depth), loaded.alpha,
                grayscale=loaded.grayscale, icc_profile=loaded.icc_profile, exif=loaded.exif)


def _enhance_animation(pipe, source: Path, destination: Path, prompt: str | None, show_progress: bool) -> None:
    import numpy as np
    from tqdm.auto import tqdm

    from ..media.animated_io import AnimationReader, enhance_animation

    def enhance_frames(frames: np.ndarray) -> np.ndarray:
        return np.stack([to_integer_pixels(pipe(frame, prompt=prompt, output_type="np").images[0], 8)
                         for frame in frames])

    with AnimationReader(source) as reader:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tqdm(total=reader.frame_count, desc=source.name, unit="frame", leave=False,
                  disable=not show_progress) as bar:
            enhance_animation(reader, destination, enhance_frames, chunk_size=1, on_frames=bar.update)
