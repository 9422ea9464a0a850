"""How strongly SGZ weights brighten images of different exposure, and how much their factor varies in an image.

A zero-shot enhancer should brighten dark scenes a lot and well-exposed ones little; a factor that is one constant
everywhere is a fixed tone curve. For each image set (resized to 600x400) this prints the mean input and output
brightness (0-255, strength 1, downscale 12) and the standard deviation of the factor x_r over the image within
each channel, averaged:

- LOL eval15 low (very dark) and high (the well-exposed ground truth),
- LIME (all) and the first 15 DICM images of ``../shared/data/unpaired`` (moderately dark; training images of the
  shipped weights).

    python benchmarks/bench_exposure_response.py [--weights NAME=PATH ...] [--no-defaults]

Default rows: the official Epoch99.pth and the shipped weights. Prints a markdown table.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_lol import LOL, OFFICIAL, SHARED, add_weights_arguments, weights_to_measure

UNPAIRED = SHARED / "data" / "unpaired"
IMAGE_SETS = {
    "LOL low": lambda: sorted((LOL / "low").glob("*.png")),
    "LIME": lambda: sorted((UNPAIRED / "LIME").iterdir()),
    "DICM (first 15)": lambda: sorted((UNPAIRED / "DICM").iterdir())[:15],
    "LOL high": lambda: sorted((LOL / "high").glob("*.png")),
}


def load_600x400(path: Path) -> torch.Tensor:
    """``[1, 3, 400, 600]`` float in 0..1."""
    image = Image.open(path).convert("RGB").resize((600, 400), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


@torch.no_grad()
def response(model, images: list[torch.Tensor]) -> tuple[float, float]:
    """(mean output brightness 0-255, mean per-channel spatial std of the factor) over ``images``."""
    from comfyui_lowlight.pipelines.sgz.model import enhance, estimate_factor_lowres

    outputs, spreads = [], []
    for image in images:
        factor = estimate_factor_lowres(model, image, 12)
        outputs.append(float(enhance(image, factor).mean()) * 255)
        spreads.append(float(factor.flatten(2).std(dim=-1).mean()))
    return float(np.mean(outputs)), float(np.mean(spreads))


def main(argv=None) -> int:
    from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS, load_sgz_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_weights_arguments(p)
    args = p.parse_args(argv)
    runs = weights_to_measure(p, args, [("official `Epoch99.pth`", OFFICIAL), ("ours, shipped", SHIPPED_WEIGHTS)])

    sets = {name: [load_600x400(path) for path in files()] for name, files in IMAGE_SETS.items()}
    header = [f"{name} ({len(images)}, in {np.mean([float(i.mean()) for i in images]) * 255:.0f})"
              for name, images in sets.items()]
    print("Mean output brightness (0-255) / factor spatial std, strength 1, downscale 12, 600x400\n")
    print("| weights | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name, path in runs:
        model = load_sgz_weights(path)
        cells = []
        for images in sets.values():
            out, spread = response(model, images)
            cells.append(f"{out:.0f} / {spread:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
