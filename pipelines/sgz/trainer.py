"""Zero-shot training of the SGZ enhancement factor estimator on any folders of (low-light) images.

    lowlight train sgz --data DIR [DIR ...] --output runs/sgz [--minutes 55] [--resume]

No labels and no reference images: the EFE learns from the five non-reference losses of the paper (eq. 2-7,
``pipelines/sgz/losses.py``), L_sem coming from a frozen segmentation net (``pipelines/sgz/segmentation.py``).
Every ``--save-every`` steps and at the end, ``OUTPUT/sgz_stepNNNNNN.safetensors`` (weights, loadable by
``SGZPipeline.from_pretrained``), ``OUTPUT/last.safetensors`` and ``OUTPUT/last_state.pt`` (optimizer, step and
sampler state for ``--resume``) are written atomically. ``last.safetensors`` and ``last_state.pt`` both record the
step: ``--resume`` uses them only as a pair of the same step (after a kill between the two writes, the weights of
the state's step, ``sgz_stepNNNNNN.safetensors``, complete the pair; without them it refuses). A run never starts
over an earlier one in ``OUTPUT`` without ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..media.atomic_files import atomic_output
from ..weights_files import torch_load_weights


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults: the paper's optimisation settings)."""

    data: list[str]
    output: str = "sgz_runs"
    max_steps: int | None = None
    minutes: float | None = None
    batch_size: int = 6
    crop_min: int = 256
    crop_max: int = 512
    max_side: int = 1024
    lr: float = 1e-4
    lr_schedule: str = "constant"
    lr_min: float = 1e-5
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    train_downscale: float = 12
    recurrences: int = 8
    backbone: str = "efficientnet-lite0"
    backbone_weights: str | None = None
    semantic: bool = True
    semantic_every: int = 1
    exposure: float = 0.6
    brightness_region: int = 16
    brightness_weight: float = 1.0
    tv_weight: float = 1.0
    spatial_weight: float = 1.0
    rgb_weight: float = 1.0
    padding_mode: str = "zeros"
    darken: float = 0.0
    darken_min: float = 0.1
    auto_exposure: float = 0.0
    init_weights: str | None = None
    seed: int = 0
    save_every: int = 200
    resume: bool = False
    threads: int | None = None
    progress: bool = True
    extra_metadata: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# Data


class TrainingDataError(FileNotFoundError):
    """``--data`` cannot be trained on: a folder missing, or no readable image in it (the message says what to do)."""


def find_images(dirs: list[str]) -> list[Path]:
    """All files with an image suffix under ``dirs`` (recursive), sorted for reproducibility."""
    from ..media.image_io import IMAGE_EXTENSIONS

    files = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise TrainingDataError(f"--data: not a folder: {root} (give folders of training images)")
        files += [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def load_images(files: list[Path], max_side: int) -> tuple[list[torch.Tensor], list[tuple[Path, str]]]:
    """Decode every file once into memory as uint8 ``[3, H, W]``, large ones downscaled to ``max_side``.

    Returns (images, failures) where failures lists (path, reason) of unreadable files, which are skipped.
    """
    import numpy as np
    from PIL import Image

    from ..media.image_io import read_image

    images, failures = [], []
    for path in files:
        try:
            pixels = read_image(path).pixels  # upright RGB, the same reader as every other face
            if pixels.dtype != np.uint8:  # 16-bit PNG: round to 8 bits
                pixels = np.clip(pixels / 257.0 + 0.5, 0, 255).astype(np.uint8)
            im = Image.fromarray(pixels)
            scale = max_side / max(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous())
        except Exception as error:  # any decoding problem: skip the file, report it
            failures.append((path, f"{type(error).__name__}: {error}"))
    return images, failures


class CropSampler:
    """Random square crops (one side per batch, ``crop_min..crop_max`` in steps of 32) with random flips.

    Images smaller than the crop are upscaled (bilinear) just enough. ``sample() -> [B, 3, s, s]`` float 0..1.
    All randomness comes from ``self.generator`` so a resumed run continues the same sequence.
    """

    def __init__(self, images: list[torch.Tensor], batch_size: int, crop_min: int, crop_max: int, seed: int,
                 darken: float = 0.0, darken_min: float = 0.1):
        if not images:
            raise ValueError("no training images")
        if not 32 <= crop_min <= crop_max:
            raise ValueError(f"crop sizes: expected 32 <= crop_min <= crop_max, got {crop_min}, {crop_max}")
        self.images = images
        self.batch_size = batch_size
        self.sizes = list(range(math.ceil(crop_min / 32) * 32, crop_max + 1, 32)) or [crop_min]
        self.generator = torch.Generator().manual_seed(seed)
        self.darken, self.darken_min = darken, darken_min

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self) -> torch.Tensor:
        side = self.sizes[self._randint(len(self.sizes))]
        crops = []
        for _ in range(self.batch_size):
            image = self.images[self._randint(len(self.images))]
            h, w = image.shape[-2:]
            if min(h, w) < side:
                scale = side / min(h, w)
                size = (max(side, math.ceil(h * scale)), max(side, math.ceil(w * scale)))
                image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear",
                                                        align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
                h, w = size
            top, left = self._randint(h - side + 1), self._randint(w - side + 1)
            crop = image[:, top : top + side, left : left + side]
            if self._randint(2):
                crop = crop.flip(-1)
            if self._randint(2):
                crop = crop.flip(-2)
            crops.append(crop)
        batch = torch.stack(crops).float() / 255.0
        if self.darken > 0:
            # Exposure augmentation: scale a random subset of crops by a log-uniform factor in darken_min..1, so
            # the EFE also sees much darker scenes than the folders contain (the paper trains on a
            # multi-exposure set that includes very under-exposed shots).
            picked = torch.rand(len(crops), generator=self.generator) < self.darken
            log_min = math.log(self.darken_min)
            scale = torch.exp(log_min * torch.rand(len(crops), generator=self.generator))
            batch = batch * torch.where(picked, scale, torch.ones_like(scale)).view(-1, 1, 1, 1)
        return batch


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_output(path) as temporary:
        torch.save(obj, temporary)


def save_checkpoint(output: Path, model, optimizer, sampler: CropSampler, step: int, metadata: dict[str, str]) -> Path:
    """Write ``sgz_stepNNNNNN.safetensors``, ``last.safetensors`` and ``last_state.pt`` atomically."""
    from .model import save_sgz_weights

    output.mkdir(parents=True, exist_ok=True)
    metadata = {**metadata, "step": str(step)}
    weights = save_sgz_weights(model, output / f"sgz_step{step:06d}.safetensors", metadata)
    save_sgz_weights(model, output / "last.safetensors", metadata)
    state = {"step": step, "optimizer": optimizer.state_dict(), "sampler_rng": sampler.generator.get_state()}
    _atomic_torch_save(state, output / "last_state.pt")
    return weights


class CheckpointMismatchError(ValueError):
    """``last_state.pt`` and no weights file of its step (a run killed between the two writes)."""


def earlier_run_files(output: Path) -> list[Path]:
    """The files of an earlier run in ``output`` (checkpoints a new run would overwrite)."""
    if not output.is_dir():
        return []
    return sorted([p for p in (output / "last.safetensors", output / "last_state.pt") if p.exists()]
                  + list(output.glob("sgz_step*.safetensors")))


def refuse_earlier_run(output: Path) -> None:
    """Raise :class:`FileExistsError` if ``output`` holds an earlier run (only ``--resume`` may continue it)."""
    found = earlier_run_files(output)
    if found:
        raise FileExistsError(f"--output {output} already holds an earlier run ({found[0].name}, {len(found)} "
                              "checkpoint file(s)); continue it with --resume or choose a new folder")


def _weights_step(path: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        step = (weights.metadata() or {}).get("step")
    return int(step) if step is not None and step.isdigit() else None


def load_training_state(output: Path) -> tuple[dict, Path]:
    """The resume state of ``output`` and the weights file of the same step: ``last.safetensors``, or after a kill
    between the two writes of :func:`save_checkpoint`, ``sgz_stepNNNNNN.safetensors`` of the state's step."""
    path, last = output / "last_state.pt", output / "last.safetensors"
    if not path.is_file() or not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {output} (expected last.safetensors and last_state.pt)")
    state = torch_load_weights(path)
    step = int(state["step"])
    for weights in (last, output / f"sgz_step{step:06d}.safetensors"):
        if weights.is_file() and _weights_step(weights) == step:
            return state, weights
    raise CheckpointMismatchError(f"--resume: {path} is at step {step} but {last} is at step {_weights_step(last)} and no "
                     f"sgz_step{step:06d}.safetensors matches it (a run killed while saving); start a new folder "
                     "with --init-weights to keep these weights")


# ------------------------------------------------------------------------------------------------------------------
# Training


def exposure_fitted_output(model, batch: torch.Tensor, config: TrainConfig):
    """What SGZ v2's pipeline shows for ``batch`` (before its denoise filter), with gradients to ``model``.

    The EFE's factor is scaled per image by :func:`~.exposure.fit_exposure` (the scale computed without gradient: a
    per-image constant) and faded by :func:`~.exposure.highlight_shoulder`, both with ``config.auto_exposure``,
    then the curve runs at full resolution. Returns ``(factor_lowres, fitted_lowres, enhanced, scale [B])``.
    """
    from .exposure import fit_exposure, highlight_shoulder
    from .model import apply_recurrence, downsample_bilinear, estimate_factor_lowres, upsample_factor

    factor_lowres = estimate_factor_lowres(model, batch, config.train_downscale)
    small = downsample_bilinear(batch, tuple(factor_lowres.shape[-2:]))
    with torch.no_grad():
        _, scale = fit_exposure(small, factor_lowres.detach(), config.recurrences, config.auto_exposure)
    fitted = (factor_lowres * scale.view(-1, 1, 1, 1)).clamp(-1.0, 1.0)
    fitted = highlight_shoulder(small, fitted, config.auto_exposure)
    enhanced = apply_recurrence(batch, upsample_factor(fitted, batch.shape[-2:]), config.recurrences)
    return factor_lowres, fitted, enhanced, scale


def training_step(model, seg_net, batch: torch.Tensor, config: TrainConfig, weights) -> tuple[torch.Tensor, dict]:
    """Forward pass and losses for one batch ``[B, 3, s, s]``: the EFE runs at ``1/train_downscale``, the RIE and
    all losses on the full-resolution crop (L_tv on the factor as the EFE produced it).

    With ``config.auto_exposure`` > 0 the EFE is trained through SGZ v2's inference-time exposure
    (:func:`exposure_fitted_output`): L_spa, L_rgb, L_sem and L_tv (on the fitted factor) judge what the pipeline
    will show, i.e. the factor's shape at the brightness v2 chooses. L_bri alone stays on the unfitted output: it
    keeps the model's own level (what plain SGZ shows, and where the fit starts from), which would otherwise drift,
    since the fit undoes any change of level.
    """
    from .losses import brightness_loss, sgz_total_loss
    from .model import apply_recurrence, estimate_factor_lowres, upsample_factor

    if config.auto_exposure <= 0.0:
        factor_lowres = estimate_factor_lowres(model, batch, config.train_downscale)
        factor = upsample_factor(factor_lowres, batch.shape[-2:])
        enhanced = apply_recurrence(batch, factor, config.recurrences)
        logits = seg_net(enhanced) if seg_net is not None else None
        return sgz_total_loss(batch, enhanced, factor_lowres, logits, weights)

    factor_lowres, fitted, enhanced, scale = exposure_fitted_output(model, batch, config)
    logits = seg_net(enhanced) if seg_net is not None else None
    total, values = sgz_total_loss(batch, enhanced, fitted, logits, dataclasses.replace(weights, brightness=0.0))
    plain = apply_recurrence(batch, upsample_factor(factor_lowres, batch.shape[-2:]), config.recurrences)
    level = brightness_loss(plain, weights.exposure, weights.brightness_region)
    total = total + weights.brightness * level
    values.update(bri=float(level.detach()), total=float(total.detach()), scale=float(scale.log().mean().exp()))
    return total, values


def cosine_lr(config: TrainConfig, step: int, elapsed: float) -> float:
    """Cosine decay from ``lr`` to ``lr_min`` over the budget; progress is the larger of the step fraction
    (``max_steps``) and the time fraction of this invocation (``minutes``)."""
    progress = 0.0
    if config.max_steps:
        progress = step / config.max_steps
    if config.minutes:
        progress = max(progress, elapsed / (config.minutes * 60))
    progress = min(progress, 1.0)
    return config.lr_min + (config.lr - config.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig) -> dict:
    """Run (or resume) a training run; returns a summary dict (steps, seconds, last losses, checkpoint path)."""
    from tqdm.auto import tqdm

    from .segmentation import build_segmentation_net
    from .losses import SGZLossWeights
    from .model import EnhancementFactorEstimator, init_weights_for_training, load_sgz_weights

    if config.max_steps is None and config.minutes is None:
        raise ValueError("give a budget: --max-steps and/or --minutes")
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(config.output)
    torch.manual_seed(config.seed)
    if config.resume:
        state, resume_weights = load_training_state(output)
    else:
        refuse_earlier_run(output)
        state = None

    files = find_images(config.data)
    images, failures = load_images(files, config.max_side)
    for path, reason in failures:
        print(f"warning: skipped unreadable image {path}: {reason}", file=sys.stderr)
    if not images:
        from ..media.image_io import IMAGE_EXTENSIONS

        folders = ", ".join(str(Path(d)) for d in config.data)
        found = f"none of its {len(files)} image files could be read" if files else "it holds no image files"
        raise TrainingDataError(f"--data {folders}: {found}; put low-light photos ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                                "in it, in any subfolders")
    print(f"{len(images)} training images loaded, {len(failures)} unreadable skipped", file=sys.stderr)

    sampler = CropSampler(images, config.batch_size, config.crop_min, config.crop_max, config.seed,
                          config.darken, config.darken_min)
    if config.init_weights:
        model = load_sgz_weights(config.init_weights)
    else:
        model = EnhancementFactorEstimator(padding_mode=config.padding_mode)
        init_weights_for_training(model, torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step = 0
    if state is not None:
        model.load_state_dict(load_sgz_weights(resume_weights).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        sampler.generator.set_state(state["sampler_rng"])
        step = int(state["step"])
    model.train()
    seg_net = (
        build_segmentation_net(config.backbone, config.backbone_weights, seed=config.seed) if config.semantic else None
    )
    weights = SGZLossWeights(exposure=config.exposure, brightness=config.brightness_weight, tv=config.tv_weight,
                             spatial=config.spatial_weight, rgb=config.rgb_weight,
                             brightness_region=config.brightness_region)
    metadata = {
        "format": "sgz-efe",
        "data": ",".join(str(Path(d)) for d in config.data),
        "images": str(len(images)),
        "losses": json.dumps(asdict(weights)),
        "backbone": config.backbone if config.semantic else "none",
        "semantic_every": str(config.semantic_every),
        "train_downscale": str(config.train_downscale),
        "batch_size": str(config.batch_size),
        "crop": f"{config.crop_min}-{config.crop_max}",
        "lr": str(config.lr),
        "lr_schedule": config.lr_schedule if config.lr_schedule == "constant" else f"cosine to {config.lr_min}",
        "seed": str(config.seed),
        "darken": f"{config.darken} (min {config.darken_min})",
        "auto_exposure": str(config.auto_exposure),
        "init_weights": str(config.init_weights),
        **{k: str(v) for k, v in config.extra_metadata.items()},
    }

    deadline = time.monotonic() + config.minutes * 60 if config.minutes is not None else math.inf
    last_step = config.max_steps if config.max_steps is not None else math.inf
    start_time, start_step, values, checkpoint = time.monotonic(), step, {}, None
    bar = tqdm(total=None if math.isinf(last_step) else last_step, initial=step, disable=not config.progress,
               desc="sgz", mininterval=2.0, dynamic_ncols=True)
    while step < last_step and time.monotonic() < deadline:
        if config.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config, step, time.monotonic() - start_time)
        # L_sem is by far the most expensive term (the frozen segmentation net): --semantic-every > 1 evaluates it
        # (with the same weight) only on every N-th step.
        use_seg = seg_net if step % config.semantic_every == 0 else None
        total, step_values = training_step(model, use_seg, sampler.sample(), config, weights)
        values = {**values, **step_values}
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        if step % config.save_every == 0:
            checkpoint = save_checkpoint(output, model, optimizer, sampler, step, metadata)
    bar.close()
    if step > start_step or checkpoint is None:
        checkpoint = save_checkpoint(output, model, optimizer, sampler, step, metadata)
    return {
        "step": step,
        "steps_this_run": step - start_step,
        "seconds": time.monotonic() - start_time,
        "losses": values,
        "checkpoint": str(checkpoint),
        "images": len(images),
        "unreadable": len(failures),
    }
