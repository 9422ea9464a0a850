"""SCUF fine-tuning smoke benchmark on the tiny fixture (CPU): steps/s and the loss curve, as markdown.

    python benchmarks/bench_scuf_train.py [--steps 40] [--threads 1] [--resolution 32] [--lr 1e-5] [--output DIR]

Trains the tiny randomly initialised SD-Turbo-shaped fixture (``../shared/reference/scuf``) on synthetic unpaired
images (dark and bright versions of random colour fields) with every loss on: captions (a fixed file), RetinexNet
reflectance targets (``../shared/reference/retinex/decomp.pth``), GAN, identity. The numbers describe the training
loop's overhead on a CPU, not SD-Turbo speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def make_data(root: Path, count: int = 6) -> None:
    from comfyui_lowlight.pipelines.scuf.captions import save_captions

    rng = np.random.default_rng(0)
    captions = {"low": {}, "normal": {}}
    for domain, gamma, gain in (("low", 2.0, 0.3), ("normal", 0.5, 1.0)):
        (root / domain).mkdir(parents=True)
        for i in range(count):
            base = Image.fromarray((rng.random((5, 6, 3)) * 255).astype(np.uint8)).resize((64, 48), Image.BICUBIC)
            array = np.clip((np.asarray(base, dtype=np.float32) / 255) ** gamma * gain, 0, 1)
            Image.fromarray((array * 255).astype(np.uint8)).save(root / domain / f"{i}.png")
            captions[domain][f"{i}.png"] = f"a photo of a {'street' if i % 2 else 'room'} with {i} objects"
    save_captions(root / "captions.json", captions, "synthetic")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate (paper: 1e-5)")
    parser.add_argument("--output", default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from comfyui_lowlight.cli import main as lowlight

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data")
        output = Path(args.output) if args.output else root / "out"
        scuf = SHARED / "reference" / "scuf"
        argv = ["train", "scuf", "--pretrained", str(scuf / "base"), "--image_encoder", str(scuf / "clip_tiny.pt"),
                "--low", str(root / "data" / "low"), "--normal", str(root / "data" / "normal"),
                "--output", str(output), "--captions", str(root / "data" / "captions.json"),
                "--retinex_weights", str(SHARED / "reference" / "retinex" / "decomp.pth"),
                "--resolution", str(args.resolution), "--resize", str(args.resolution + args.resolution // 4),
                "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps),
                "--validation_steps", "0", "--learning_rate", str(args.lr), "--no_progress"]
        if lowlight(argv) != 0:
            return 1
        log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    seconds = [e["seconds"] for e in log[1:]]  # the first step includes one-off allocations
    print(f"\n### SCUF fine-tuning, tiny fixture, CPU, {args.threads} thread(s), {args.resolution}px crops, "
          f"{args.steps} steps, lr {args.lr:g}\n")
    print("| steps/s (median step) | s/step median | s/step min |")
    print("|---|---|---|")
    print(f"| {1 / statistics.median(seconds):.3f} | {statistics.median(seconds):.3f} | {min(seconds):.3f} |")
    window = max(1, min(5, len(log) // 4))
    keys = [k for k in log[0] if k not in ("step", "seconds")]
    print(f"\nLoss terms, mean of the first and last {window} steps:\n")
    print("| loss | first | last |")
    print("|---|---|---|")
    for key in keys:
        first = statistics.fmean(e[key] for e in log[:window])
        last = statistics.fmean(e[key] for e in log[-window:])
        print(f"| {key} | {first:.4f} | {last:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
