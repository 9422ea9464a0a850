"""Before/after pictures for the README, written to docs/images/*.jpg (each kept under 300 KB).

    python benchmarks/make_readme_figures.py [--weights PATH]

- ``sgz_lol_pair.jpg``: a LOL eval15 pair: low input | plain SGZ | SGZ v2 | ground truth (600x400 each).
- ``sgz_vv_photo.jpg``: a large VV photo (enhanced at full 2304x1728, shown downscaled): input | plain | v2.
- ``sgz_video_frame.jpg``: a frame of ``night_street.mp4`` enhanced as the CLI does (temporal smoothing on,
  frames streamed from the start): input | SGZ v2.
- ``sgz_noise_crop.jpg``: a dark corner of the LOL pair, 3x enlarged (nearest neighbour): plain SGZ | SGZ v2 |
  ground truth, so that the noise (colour speckle) difference shows.
(The exposure-control figure is made by ``make_exposure_figure.py``.)

Default weights: v2 with the shipped default ``sgz_lowlight.safetensors``, plain SGZ with the first shipped weights
``sgz_lowlight_v1.safetensors`` (what plain SGZ gave before v2); ``--weights PATH`` uses one file for both; the
official Epoch99.pth when nothing is shipped (the labels say which).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ, VIDEO_TEMPORAL_SMOOTHING
from comfyui_lowlight.pipelines import SGZPipeline
from comfyui_lowlight.pipelines.media.atomic_files import atomic_output
from comfyui_lowlight.pipelines.media.image_io import read_image
from comfyui_lowlight.pipelines.sgz.model import SHIPPED_WEIGHTS, V1_WEIGHTS
from comfyui_lowlight.pipelines.media.video_io import VideoReader

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
OUTPUT = REPO_ROOT / "docs" / "images"
MAX_BYTES = 300_000
LABEL_HEIGHT = 28

LOL_IMAGE = "493.png"
VV_IMAGE = "P1010676.jpg"
VIDEO_FRAME = 30
# (left, top, right, bottom) of the zoomed crop in LOL_IMAGE: a dark shelf, where the noise grows most.
NOISE_CROP = (20, 230, 220, 363)


def labelled(image: Image.Image, text: str) -> Image.Image:
    """The image with a black caption strip on top."""
    canvas = Image.new("RGB", (image.width, image.height + LABEL_HEIGHT), "black")
    canvas.paste(image, (0, LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((8, 4), text, fill="white", font=ImageFont.load_default(size=18))
    return canvas


def side_by_side(panels: list[tuple[Image.Image, str]], height: int) -> Image.Image:
    """Panels scaled to a common height, captioned, with a 4 px gap."""
    scaled = [labelled(p.resize((round(p.width * height / p.height), height), Image.LANCZOS), t) for p, t in panels]
    width = sum(p.width for p in scaled) + 4 * (len(scaled) - 1)
    figure = Image.new("RGB", (width, scaled[0].height), "white")
    x = 0
    for panel in scaled:
        figure.paste(panel, (x, 0))
        x += panel.width + 4
    return figure


def save_jpeg(figure: Image.Image, name: str) -> Path:
    """Write atomically with the highest JPEG quality (from 92 down) that stays under MAX_BYTES."""
    for quality in range(92, 40, -4):
        buffer = io.BytesIO()
        figure.save(buffer, format="JPEG", quality=quality, optimize=True)
        if buffer.tell() <= MAX_BYTES:
            break
    path = OUTPUT / name
    with atomic_output(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
    print(f"{path.relative_to(REPO_ROOT)}: {figure.width}x{figure.height}, {buffer.tell() / 1000:.0f} KB, quality {quality}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args()
    plain_weights, plain_label = None, "plain SGZ"
    if args.weights is not None:
        weights, label = args.weights, f"SGZ ({args.weights.name})"
    elif SHIPPED_WEIGHTS.is_file():
        weights, label = SHIPPED_WEIGHTS, "SGZ v2 (shipped weights)"
        if V1_WEIGHTS.is_file():
            plain_weights, plain_label = V1_WEIGHTS, "plain SGZ (v1 weights)"
    else:
        weights, label = SHARED / "reference" / "sgz" / "Epoch99.pth", "SGZ (official weights)"
    print(f"weights: {weights}; plain SGZ: {plain_weights or weights}")
    pipe = SGZPipeline.from_pretrained(weights, device="cpu")
    plain_pipe = SGZPipeline.from_pretrained(plain_weights, device="cpu") if plain_weights else pipe
    OUTPUT.mkdir(parents=True, exist_ok=True)

    low = read_image(SHARED / "data" / "lol_eval15" / "low" / LOL_IMAGE).pixels
    high = read_image(SHARED / "data" / "lol_eval15" / "high" / LOL_IMAGE).pixels
    plain, v2 = Image.fromarray(plain_pipe(low, **PLAIN_SGZ)), Image.fromarray(pipe(low))
    panels = [(Image.fromarray(low), "LOL input"), (plain, plain_label), (v2, label), (Image.fromarray(high), "ground truth")]
    save_jpeg(side_by_side(panels, 400), "sgz_lol_pair.jpg")
    crops = [(image.crop(NOISE_CROP), text) for image, text in ((plain, "plain SGZ"), (v2, "SGZ v2"),
                                                                 (Image.fromarray(high), "ground truth"))]
    zoomed = [(crop.resize((crop.width * 3, crop.height * 3), Image.NEAREST), text) for crop, text in crops]
    save_jpeg(side_by_side(zoomed, zoomed[0][0].height), "sgz_noise_crop.jpg")

    photo = read_image(SHARED / "data" / "unpaired" / "VV" / VV_IMAGE).pixels
    panels = [(Image.fromarray(photo), "VV photo (2304x1728)"),
              (Image.fromarray(plain_pipe(photo, **PLAIN_SGZ)), plain_label), (Image.fromarray(pipe(photo)), label)]
    save_jpeg(side_by_side(panels, 540), "sgz_vv_photo.jpg")

    state = pipe.new_video_state()
    with VideoReader(SHARED / "data" / "video" / "night_street.mp4") as reader:
        for chunk in reader.chunks(16, max_frames=VIDEO_FRAME + 1):  # the last frame read is VIDEO_FRAME
            enhanced = pipe(chunk.frames, temporal_smoothing=VIDEO_TEMPORAL_SMOOTHING, video_state=state)
    panels = [(Image.fromarray(chunk.frames[-1]), f"video frame {VIDEO_FRAME}"), (Image.fromarray(enhanced[-1]), label)]
    save_jpeg(side_by_side(panels, 640), "sgz_video_frame.jpg")


if __name__ == "__main__":
    main()
