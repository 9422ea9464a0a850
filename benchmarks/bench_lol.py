"""LOL eval15 quality of SGZ weights under the project's standard protocol (../shared/data/README.md).

Full-resolution 600x400 outputs (no cropping to a multiple of the downscale), quantised to uint8; PSNR with
data_range 255 and scikit-image SSIM (``channel_axis=2, data_range=255``, default 7x7 window), each averaged over
the 15 pairs. Each weights file is scored as plain SGZ (the paper's model and curve) and with the pipeline's SGZ v2
defaults (automatic exposure and denoise). By default compares the official ``Epoch99.pth`` with the shipped weights
in one run:

    python benchmarks/bench_lol.py [--weights NAME=PATH ...] [--downscale 12]

Prints a markdown table.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LOL = SHARED / "data" / "lol_eval15"
OFFICIAL = SHARED / "reference" / "sgz" / "Epoch99.pth"


def lol_pairs() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, low uint8 HxWx3, high uint8 HxWx3) for the 15 pairs, sorted by name."""
    names = sorted(p.name for p in (LOL / "low").glob("*.png"))
    if len(names) != 15:
        raise FileNotFoundError(f"expected 15 LOL eval15 pairs in {LOL}, found {len(names)}")
    return [(n, np.asarray(Image.open(LOL / "low" / n).convert("RGB")),
             np.asarray(Image.open(LOL / "high" / n).convert("RGB"))) for n in names]


def score(outputs: list[np.ndarray], pairs) -> tuple[float, float]:
    psnr = [peak_signal_noise_ratio(high, out, data_range=255) for out, (_, _, high) in zip(outputs, pairs)]
    ssim = [structural_similarity(high, out, channel_axis=2, data_range=255) for out, (_, _, high) in zip(outputs, pairs)]
    return float(np.mean(psnr)), float(np.mean(ssim))


@torch.no_grad()
def enhance_u8(model, low: np.ndarray, downscale: float) -> np.ndarray:
    from comfyui_lowlight.pipelines.sgz.model import enhance, estimate_factor_lowres

    image = torch.from_numpy(low.copy()).permute(2, 0, 1)[None].float() / 255.0
    out = enhance(image, estimate_factor_lowres(model, image, downscale), out_dtype=torch.uint8)
    return out[0].permute(1, 2, 0).numpy()


def evaluate(weights: Path, pairs, downscale: float) -> tuple[float, float]:
    """Plain SGZ (the model and curve, as the paper) with ``weights``: (PSNR, SSIM)."""
    from comfyui_lowlight.pipelines.sgz.model import load_sgz_weights

    model = load_sgz_weights(weights)
    return score([enhance_u8(model, low, downscale) for _, low, _ in pairs], pairs)


def evaluate_v2(weights: Path, pairs, downscale: float) -> tuple[float, float]:
    """The pipeline with its SGZ v2 defaults (automatic exposure, denoise) and ``weights``: (PSNR, SSIM)."""
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    pipe = SGZPipeline.from_pretrained(weights)
    return score([pipe(low, downscale=round(downscale)) for _, low, _ in pairs], pairs)


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH",
                        help="extra weights to measure (default rows: official and shipped)")
    parser.add_argument("--no-defaults", action="store_true", help="measure only --weights")


def weights_to_measure(parser: argparse.ArgumentParser, args, defaults: list) -> list[tuple[str, Path]]:
    """The default (name, path) rows unless ``--no-defaults``, then each ``--weights NAME=PATH``."""
    runs = [] if args.no_defaults else list(defaults)
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--weights: expected NAME=PATH, got {item!r}")
        runs.append((name, Path(path)))
    return runs


def main(argv=None) -> int:
    from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_weights_arguments(p)
    p.add_argument("--downscale", type=float, default=12)
    args = p.parse_args(argv)

    defaults = [("SGZ official `Epoch99.pth`", OFFICIAL), ("ours, shipped `sgz_lowlight.safetensors`", SHIPPED_WEIGHTS)]
    runs = weights_to_measure(p, args, defaults)

    pairs = lol_pairs()
    print(f"LOL eval15 ({len(pairs)} pairs, 600x400, uint8 outputs), downscale {args.downscale:g}\n")
    print("| weights | plain PSNR dB | plain SSIM | v2 defaults PSNR dB | v2 defaults SSIM |")
    print("|---|---|---|---|---|")
    psnr, ssim = score([low for _, low, _ in pairs], pairs)
    print(f"| input (no enhancement) | {psnr:.2f} | {ssim:.3f} | | |")
    for name, path in runs:
        if not path.is_file():
            print(f"| {name} | missing: {path} | | | |")
            continue
        psnr, ssim = evaluate(path, pairs, args.downscale)
        cells = f"{psnr:.2f} | {ssim:.3f}"
        if float(args.downscale).is_integer():  # the pipeline takes integer downscales
            psnr, ssim = evaluate_v2(path, pairs, args.downscale)
            cells += f" | {psnr:.2f} | {ssim:.3f}"
        else:
            cells += " | | "
        print(f"| {name} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
