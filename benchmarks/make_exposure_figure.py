"""Draw docs/images/sgz_exposure.png: the effect of SGZ's exposure controls on a LOL low-light image.

Row 1: ``strength`` (scales the enhancement factor x_r); row 2: ``recurrences`` (curve applications) at strength 1;
each tile is labelled with its setting and the mean brightness of the result (0-255).

    python benchmarks/make_exposure_figure.py [--image ../shared/data/lol_eval15/low/1.png] [--weights PATH]

Uses the shipped weights when ``lora_weights/sgz_lowlight.safetensors`` exists, else the official Epoch99.pth
(the figure's caption says which).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)
RECURRENCES = (2, 4, 8, 12, 16)
TILE_WIDTH = 240
LABEL_HEIGHT = 22


def _label(tile: Image.Image, text: str) -> Image.Image:
    canvas = Image.new("RGB", (tile.width, tile.height + LABEL_HEIGHT), "white")
    canvas.paste(tile, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 5), text, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=SHARED / "data" / "lol_eval15" / "low" / "1.png")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "sgz_exposure.png")
    args = parser.parse_args()

    from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    weights = args.weights or (SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else
                               SHARED / "reference" / "sgz" / "Epoch99.pth")
    pipe = SGZPipeline.from_pretrained(weights)
    image = Image.open(args.image).convert("RGB")
    image = image.resize((TILE_WIDTH, round(image.height * TILE_WIDTH / image.width)), Image.BICUBIC)
    low = np.asarray(image)

    rows = []
    for name, values in (("strength", STRENGTHS), ("recurrences", RECURRENCES)):
        tiles = []
        for value in values:
            options = {name: value}
            out = pipe(low, **options)
            label = f"{name}={value}  mean {out.mean():.0f}"
            if name == "strength" and value == 0.0:
                label = f"input (strength=0)  mean {out.mean():.0f}"
            tiles.append(_label(Image.fromarray(out), label))
        row = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
        for i, tile in enumerate(tiles):
            row.paste(tile, (i * tiles[0].width, 0))
        rows.append(row)
    caption = f"SGZ exposure controls, weights: {weights.name}; image: LOL eval15 low/{args.image.name}"
    figure = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + LABEL_HEIGHT), "white")
    ImageDraw.Draw(figure).text((4, 5), caption, fill="black")
    y = LABEL_HEIGHT
    for row in rows:
        figure.paste(row, (0, y))
        y += row.height

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=args.out.parent)
    os.close(fd)
    try:
        figure.save(tmp, optimize=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {args.out} ({figure.width}x{figure.height}) with weights {weights}")


if __name__ == "__main__":
    main()
