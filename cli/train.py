"""``lowlight train sgz|scuf``: the trainers' command lines (``pipelines/sgz/trainer.py``, ``pipelines/scuf/trainer.py`` are the cores).

    lowlight train sgz --data DIR [DIR ...] --output runs/sgz [--minutes 55] [--resume]
    lowlight train scuf caption --low DIR --normal DIR --output captions.json
    lowlight train scuf --low DIR --normal DIR --output DIR [--captions captions.json] [--resume latest]
    accelerate launch [--num_processes N] -m comfyui_lowlight train scuf ...   # several GPUs / processes

The parsers live here, not beside the cores, so that ``--help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys

from ..pipelines.scuf.captions import DEFAULT_CAPTIONER
from ..pipelines.sgz.options import DOWNSCALE

SCUF_CAPTION = "caption"
_DISPATCH_KEYS = ("command", "trainer", "run")


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train SGZ weights or fine-tune SCUF LoRAs on your own photos",
                                description="Train SGZ weights (zero-shot) or fine-tune SCUF LoRAs (unpaired).")
    methods = train.add_subparsers(dest="trainer", required=True, metavar="{sgz,scuf}")
    sgz = methods.add_parser(
        "sgz", help="zero-shot SGZ training on any folders of (low-light) images",
        description="Zero-shot training of the SGZ enhancement factor estimator on any folders of (low-light) "
                    "images: no labels, no reference images; checkpoints are loadable by SGZPipeline.from_pretrained "
                    "and --weights.",
    )
    _add_sgz_arguments(sgz)
    sgz.set_defaults(run=functools.partial(run_sgz, parser=sgz))
    scuf = methods.add_parser(
        "scuf", help="SCUF LoRA fine-tuning on unpaired low-light and normal-light photos",
        description="SCUF unsupervised fine-tuning (cycle generation with caption and reflectance consistency). "
                    f"`lowlight train scuf {SCUF_CAPTION}` writes the captions file first (see its --help).",
    )
    _add_scuf_arguments(scuf)
    scuf.set_defaults(run=run_scuf)


def scuf_caption_parser() -> argparse.ArgumentParser:
    """``lowlight train scuf caption``: its options follow the word ``caption``, so it has a parser of its own."""
    p = argparse.ArgumentParser(prog=f"lowlight train scuf {SCUF_CAPTION}",
                                description="Caption every training image once with BLIP (transformers).")
    p.set_defaults(run=run_scuf_caption)
    p.add_argument("--low", required=True)
    p.add_argument("--normal", required=True)
    p.add_argument("--output", required=True, help="captions file to write (.json)")
    p.add_argument("--captioner", default=DEFAULT_CAPTIONER, help="BLIP hub id or folder (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--keep_night_words", action="store_true",
                   help="keep 'night', 'dark', ... (default: mapped to day words as the official script)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


# ------------------------------------------------------------------------------------------------------ SGZ


def _add_sgz_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", required=True, help="folders of training images (recursive)")
    p.add_argument("--output", default="sgz_runs", help="checkpoint folder (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--minutes", type=float, help="stop after this many minutes of this invocation")
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--crop-min", type=int, default=256)
    p.add_argument("--crop-max", type=int, default=512)
    p.add_argument("--max-side", type=int, default=1024, help="larger images are downscaled once on load")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="constant lr (the paper) or cosine decay to --lr-min over the step/time budget")
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=0.1, help="max gradient norm")
    p.add_argument("--train-downscale", type=float, default=DOWNSCALE.default,
                   help=f"resolution of the EFE while training: {DOWNSCALE.default} = the inference downscale "
                        "(default), 1 = full resolution as the official code; losses always use the full-resolution "
                        "output")
    p.add_argument("--backbone", default="efficientnet-lite0", choices=["efficientnet-lite0", "resnet50"],
                   help="frozen segmentation backbone for L_sem")
    p.add_argument("--backbone-weights", help="backbone weights file (default: packaged lite0 / HF cache resnet-50)")
    p.add_argument("--no-semantic", dest="semantic", action="store_false", help="train without L_sem")
    p.add_argument("--semantic-every", type=int, default=1, metavar="N",
                   help="evaluate L_sem only every N-th step (it costs most of a step on CPU)")
    p.add_argument("--exposure", type=float, default=0.6, help="target exposure E of L_bri")
    p.add_argument("--brightness-region", type=int, default=16, metavar="PX",
                   help="side of the square cells whose means L_bri pulls to E (default: %(default)s, the official "
                        "code); larger = more global exposure, dark regions are brightened less")
    p.add_argument("--brightness-weight", type=float, default=1.0, help="weight of L_bri (default: %(default)s)")
    p.add_argument("--tv-weight", type=float, default=1.0,
                   help="weight of L_tv on the factor x_r (default: %(default)s, the paper); larger = smoother factor")
    p.add_argument("--spatial-weight", type=float, default=1.0, help="weight of L_spa (default: %(default)s)")
    p.add_argument("--rgb-weight", type=float, default=1.0, help="weight of L_rgb (default: %(default)s)")
    p.add_argument("--padding-mode", choices=["zeros", "replicate"], default="zeros",
                   help="border handling of the EFE convs: zeros (default, the official network and the shipped "
                        "weights) or replicate (no bright band along the image edges); with --init-weights the "
                        "file's own mode is kept")
    p.add_argument("--darken", type=float, default=0.0, metavar="P",
                   help="probability of scaling a crop by a random exposure factor in --darken-min..1")
    p.add_argument("--darken-min", type=float, default=0.1)
    p.add_argument("--auto-exposure", type=float, default=0.0, metavar="A",
                   help="train through SGZ v2's automatic exposure (the pipeline's auto_exposure amount A, 0..1): "
                        "the factor is fitted per crop and faded on highlights before the curve, and the losses "
                        "except L_bri judge that output (default 0: plain SGZ training)")
    p.add_argument("--init-weights", help="start from these EFE weights (fresh optimizer) instead of N(0, 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.safetensors + last_state.pt")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def sgz_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The :class:`~comfyui_lowlight.pipelines.sgz.trainer.TrainConfig` of parsed ``lowlight train sgz`` arguments."""
    from ..pipelines.sgz.trainer import TrainConfig

    if args.max_steps is None and args.minutes is None:
        parser.error("give a budget: --max-steps and/or --minutes")
    names = [f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)]
    return TrainConfig(**{name: getattr(args, name) for name in names})


def run_sgz(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..pipelines.sgz.trainer import CheckpointMismatchError, train
    from ..pipelines.weights_files import WeightsFileError

    try:
        summary = train(sgz_config(args, parser))
    # an earlier run in --output, a missing --data/--resume/weights file, no readable --data image, a torn
    # checkpoint, an unusable weights file (TrainingDataError is a FileNotFoundError)
    except (FileExistsError, FileNotFoundError, CheckpointMismatchError, WeightsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------------- SCUF


def _add_scuf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--low", required=True, help="folder of low-light images (png/jpg/webp/..., any size, recursive)")
    p.add_argument("--normal", required=True, help="folder of normal-light images (unpaired)")
    p.add_argument("--output", required=True, help="output folder (checkpoints, weights, logs, validation images)")
    p.add_argument("--pretrained", default="stabilityai/sd-turbo",
                   help="SD-Turbo: hub id, diffusers folder, or single .safetensors file (default: %(default)s)")
    p.add_argument("--image_encoder", default="openai/clip-vit-base-patch32",
                   help="CLIP ViT-B/32 image tower: hub id, transformers folder or OpenAI state-dict file")
    p.add_argument("--captions", default=None,
                   help="captions file from the `caption` subcommand (without it caption consistency is off)")
    p.add_argument("--retinex_weights", default=None,
                   help="RetinexNet decomp.pth for the reflectance targets (default: classical decomposition)")
    p.add_argument("--no_reflectance", action="store_true", help="turn reflectance consistency off")
    p.add_argument("--init_weights", default=None,
                   help="start from existing SCUF weights (ours .safetensors or the official .pkl) instead of the "
                        "official fresh initialisation (an official .pkl also initialises the darken VAE)")
    p.add_argument("--resolution", type=int, default=256, help="random crop size (default: %(default)s)")
    p.add_argument("--resize", type=int, default=384, help="shorter side before cropping (default: %(default)s)")
    p.add_argument("--max_train_steps", type=int, default=25000, help="iterations (paper: 25k)")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--validation_steps", type=int, default=500, help="0 = no validation images")
    p.add_argument("--num_validation_images", type=int, default=4)
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint in --output) or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--max_grad_norm", type=float, default=10.0)
    p.add_argument("--train_batch_size", type=int, default=1, help="per process (paper: 1)")
    p.add_argument("--lambda_idt", type=float, default=0.5)
    p.add_argument("--lambda_gan", type=float, default=1.0)
    p.add_argument("--lambda_cycle_lpips", type=float, default=10.0)
    p.add_argument("--lambda_idt_lpips", type=float, default=1.0)
    p.add_argument("--lpips", default="vgg", choices=["vgg", "alex", "off"],
                   help="LPIPS backbone when its weights are available locally (default: %(default)s)")
    p.add_argument("--disc_levels", type=int, default=3, help="CLIP layers the discriminators look at")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                   help="default: float32 (fp16 is reported to collapse this method)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="UNet gradient checkpointing")
    p.add_argument("--cpu", action="store_true",
                   help="run on CPU even if a GPU is present; several CPU processes: `accelerate launch --multi_gpu "
                        "--num_processes N -m comfyui_lowlight train scuf ... --cpu` (gloo)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")


def run_scuf(args: argparse.Namespace) -> int:
    from ..pipelines.scuf.trainer import train

    return _run_scuf_core(train, args)


def run_scuf_caption(args: argparse.Namespace) -> int:
    from ..pipelines.scuf.trainer import caption

    return _run_scuf_core(caption, args)


def _run_scuf_core(core, args: argparse.Namespace) -> int:
    """``core(args)`` without the command's dispatch keys (the trainer records its arguments in its checkpoints);
    unusable data or captions, or an earlier run in --output without --resume, end the run with exit code 2 and one line on stderr, not a traceback."""
    from ..pipelines.scuf.captions import CaptionsError
    from ..pipelines.scuf.trainer import DataError

    try:
        core(argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in _DISPATCH_KEYS}))
    except (DataError, CaptionsError, FileExistsError) as exc:  # FileExistsError: an earlier run in --output
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
