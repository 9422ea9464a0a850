"""Batch SCUF enhancement of a folder, split across processes (or GPUs) with accelerate.

    python -m comfyui_lowlight.scuf_batch --base DIR_OR_FILE --image-encoder X --scuf-weights F --input DIR --output DIR
    accelerate launch --num_processes 2 [--cpu] -m comfyui_lowlight.scuf_batch --base ... (same arguments)

Every process builds the same sorted job list (images under ``--input``, recursively, relative layout kept under
``--output``; existing outputs are skipped unless ``--overwrite``) and takes its share with accelerate's
``PartialState.split_between_processes``. Each output is written atomically, in its input's format (16-bit PNG
stays 16-bit, alpha and grey are kept). A file that fails is reported on stderr and the run goes on; the exit
code is 1 when any file failed, 2 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import plan_jobs
from .pipelines.image_io import read_image, to_integer_pixels, write_image

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_lowlight.scuf_batch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", required=True, type=Path,
                        help="SD-Turbo: a diffusers folder (or one written by SCUFPipeline.save_pretrained) or the "
                             "single file sd_turbo.safetensors")
    parser.add_argument("--image-encoder", default=None,
                        help="CLIP ViT-B/32: OpenAI state-dict file, transformers folder or hub id (not needed if "
                             "--base has an image_encoder folder)")
    parser.add_argument("--scuf-weights", type=Path, default=None,
                        help="SCUF weights (ours .safetensors or the official .pkl); not needed if --base has them")
    parser.add_argument("--input", required=True, type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute precision (bfloat16: fast on recent CPUs; float16 keeps the VAE in float32)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="process images larger than this many pixels in tiles (multiple of 8, e.g. 512)")
    parser.add_argument("--tile-overlap", type=int, default=64, help="tile overlap in pixels (default 64)")
    parser.add_argument("--prompt", default=None, help="text prompt (default: the paper's lighten prompt)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: skip them)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    return parser


def load_pipeline(args: argparse.Namespace, device):
    """The SCUF pipeline described by the command-line arguments, on ``device`` in ``args.dtype``."""
    import torch

    from .pipelines.scuf_pipeline import SCUFPipeline

    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if args.image_encoder is not None:
        kwargs["image_encoder"] = args.image_encoder
    if args.base.is_file():
        pipe = SCUFPipeline.from_single_file(args.base, scuf_weights=args.scuf_weights, **kwargs)
    else:
        pipe = SCUFPipeline.from_pretrained(args.base, scuf_weights=args.scuf_weights, **kwargs)
    if pipe.scuf_config is None:
        raise ValueError(f"no SCUF weights: pass --scuf-weights (the base model {args.base} has none)")
    pipe.to(device)
    pipe.image_encoder.to(dtype)
    if dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)  # the SD 2.x VAE overflows in float16
    if args.tile_size is not None:
        pipe.enable_vae_tiling(args.tile_size, args.tile_overlap)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enhance_file(pipe, source: Path, destination: Path, prompt: str | None) -> None:
    """Enhance one image file into ``destination`` (atomic), keeping bit depth, alpha, grey and ICC profile."""
    loaded = read_image(source)
    # uint8 pixels take the pipeline's exact official resize path; 16-bit goes in as float
    image = loaded.pixels if loaded.bit_depth == 8 else loaded.to_float()
    enhanced = pipe(image, prompt=prompt, output_type="np").images[0]
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_image(destination, to_integer_pixels(enhanced, loaded.bit_depth), loaded.alpha,
                grayscale=loaded.grayscale, icc_profile=loaded.icc_profile)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # without an accelerator, accelerate only forms a multi-process (gloo) group when asked for CPU explicitly
    state = PartialState(cpu=args.cpu or not torch.accelerator.is_available())
    tag = f"[process {state.process_index + 1}/{state.num_processes}]"
    if not args.input.is_dir():
        print(f"{tag} --input: not a folder: {args.input}", file=sys.stderr)
        return 2
    plan = plan_jobs([args.input], args.output)
    failures = [(src, why) for src, why in plan.failures]
    jobs, skipped = [], 0
    for job in plan.jobs:
        if job.is_video:
            failures.append((job.source, "videos are not supported by scuf_batch (images only)"))
        elif job.destination.exists() and not args.overwrite:
            skipped += 1
        else:
            jobs.append(job)
    if state.is_main_process:
        for source, why in failures:
            print(f"{tag} failed: {source}: {why}", file=sys.stderr, flush=True)
    else:
        failures = []  # planning failures are reported once, by the main process
    try:
        pipe = load_pipeline(args, state.device)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"{tag} could not load the SCUF model: {exc}", file=sys.stderr)
        return 2
    done = 0
    with state.split_between_processes(jobs) as shard:
        for job in tqdm(shard, desc=f"SCUF {tag}", disable=not state.is_main_process):
            try:
                enhance_file(pipe, job.source, job.destination, args.prompt)
                done += 1
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
                failures.append((job.source, f"{type(exc).__name__}: {exc}"))
                tqdm.write(f"{tag} failed: {job.source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"{tag} enhanced {done} of {len(shard)} images, {len(failures)} failed"
              + (f"; skipped {skipped} existing outputs" if state.is_main_process and skipped else ""),
              file=sys.stderr, flush=True)
    state.wait_for_everyone()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
