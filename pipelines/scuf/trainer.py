"""Fine-tune SCUF LoRAs on your own unpaired low-light and normal-light photos (paper sec. 3-4, appendix A).

    lowlight train scuf --pretrained stabilityai/sd-turbo \
        --image_encoder openai/clip-vit-base-patch32 --low DIR --normal DIR --output DIR \
        [--captions captions.json] [--retinex_weights decomp.pth] [--resume latest]
    lowlight train scuf caption --low DIR --normal DIR --output captions.json
    accelerate launch [--num_processes N] -m comfyui_lowlight train scuf ...   # several GPUs / processes

Trainable: both directions' VAE LoRA + skip convs, the image-prompt projector, the cycle-attention adapters, the
reflectance decoder and the two discriminator heads. Frozen: UNet, text encoder, CLIP, captioner, Retinex.
The math and the order of the updates live in ``pipelines/scuf/training.py``; this file is data, accelerate, the
loop, checkpoints and logging.

Output folder:
* ``checkpoint-<step>/``: ``scuf_weights.safetensors`` (lighten, our format: ``SCUFPipeline.load_scuf_weights``
  and the ComfyUI loader read it), ``scuf_weights_b2a.safetensors`` (darken), ``accelerator.save_state``'s files
  (``model.safetensors``: every trained tensor; ``optimizer.bin``, ``optimizer_1.bin``,
  ``random_states_<rank>.pkl``, ``scaler.pt`` under fp16), ``training_state.json`` (last); written into a temporary
  folder and renamed, so a checkpoint folder is always complete;
* ``scuf_weights.safetensors`` (+ ``_b2a``) at the end; ``validation/step-<N>/`` images; ``train_log.jsonl``
  (one line per step: every loss term, averaged over processes, and the step's wall time in ``seconds``);
  TensorBoard events when tensorboard is installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

LOG_NAME = "train_log.jsonl"
B2A_WEIGHTS_NAME = "scuf_weights_b2a.safetensors"
MODEL_NAME = "model.safetensors"  # accelerate's name for the prepared module's weights
STATE_NAME = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DataError(ValueError):
    """Training data that cannot be used (missing/empty folder, no readable image, mismatching captions)."""


# ------------------------------------------------------------------------------------------------ arguments
# (the parsers are in cli/train.py: ``lowlight train scuf [caption] --help`` needs no torch)


def _check_args(args) -> None:
    for name in ("resolution", "resize", "max_train_steps", "checkpointing_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.resize < args.resolution:
        raise SystemExit(f"--resize ({args.resize}) must be >= --resolution ({args.resolution})")
    if args.resolution % 8:
        raise SystemExit(f"--resolution must be a multiple of 8 (VAE), got {args.resolution}")
    if args.validation_steps < 0:
        raise SystemExit("--validation_steps must be >= 0")


# ----------------------------------------------------------------------------------------------------- data


def find_images(folder, flag: str) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted). Raises :class:`DataError` if missing or empty."""
    from ..media.image_io import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--{flag}: folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"--{flag}: no images (extensions {sorted(IMAGE_EXTENSIONS)}) in {root}; put the training "
                        "images there (any subfolders) or point --{flag} at the folder that holds them")
    return files


def readable_images(files: list[Path], flag: str, log) -> list[Path]:
    """Decode every file once; unreadable ones are skipped with a count. Raises if none is readable."""
    from ..media.image_io import ImageFileError, read_image

    good, bad = [], []
    for path in files:
        try:
            read_image(path)
            good.append(path)
        except ImageFileError as exc:
            bad.append(str(exc))
    if bad:
        log(f"--{flag}: skipped {len(bad)} unreadable file(s) of {len(files)}: " + "; ".join(bad[:5])
            + (" ..." if len(bad) > 5 else ""))
    if not good:
        raise DataError(f"--{flag}: none of the {len(files)} image files could be read (e.g. {bad[0]}); replace "
                        "them with readable images")
    return good


class UnpairedImages:
    """Random unpaired (low, normal) crops, a pure function of ``(seed, sample index)`` (exact resume).

    Sample ``k``: the low image is ``k``-th of an epoch-wise permutation of the low set; the normal image is drawn
    at random (official: random pairing); each is resized (shorter side ``resize``), randomly cropped to
    ``resolution`` and randomly flipped. Returns ``[3, r, r]`` float32 in -1..1.
    """

    def __init__(self, low: list[Path], normal: list[Path], resolution: int, resize: int, seed: int):
        self.low, self.normal = low, normal
        self.resolution, self.resize, self.seed = resolution, resize, seed

    def _load(self, path: Path, gen: torch.Generator) -> torch.Tensor:
        import torch.nn.functional as F

        from ..media.image_io import read_image

        x = torch.from_numpy(read_image(path).to_float()).permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top = int(torch.randint(0, size[0] - self.resolution + 1, (1,), generator=gen))
        left = int(torch.randint(0, size[1] - self.resolution + 1, (1,), generator=gen))
        x = x[0, :, top:top + self.resolution, left:left + self.resolution]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(-1)
        return x * 2 - 1

    def sample(self, k: int) -> tuple[int, torch.Tensor, int, torch.Tensor]:
        """``(low index, low crop, normal index, normal crop)`` of sample ``k``."""
        n = len(self.low)
        epoch_gen = torch.Generator().manual_seed(self.seed * 7919 + k // n)
        low_index = int(torch.randperm(n, generator=epoch_gen)[k % n])
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * k + 1)
        normal_index = int(torch.randint(0, len(self.normal), (1,), generator=gen))
        return low_index, self._load(self.low[low_index], gen), normal_index, self._load(self.normal[normal_index], gen)


def prepare_data(args, log):
    """Everything about the data, checked before any model is loaded: files, readability, captions."""
    low = readable_images(find_images(args.low, "low"), "low", log)
    normal = readable_images(find_images(args.normal, "normal"), "normal", log)
    captions = None
    if args.captions:
        from .captions import load_captions, match_captions, relative_key

        data = load_captions(args.captions)
        captions = {
            "low": match_captions(data, "low", [relative_key(p, args.low) for p in low], args.captions),
            "normal": match_captions(data, "normal", [relative_key(p, args.normal) for p in normal], args.captions),
        }
    log(f"data: {len(low)} low-light and {len(normal)} normal-light images")
    return UnpairedImages(low, normal, args.resolution, args.resize, args.seed), captions


# ---------------------------------------------------------------------------------------------------- models


def load_lpips(kind: str, device, log):
    """``lpips.LPIPS`` when the package and its backbone weights are available offline, else None (logged)."""
    if kind == "off":
        log("LPIPS: off (--lpips off); cycle and identity losses use L1 only")
        return None
    try:
        import lpips
    except ImportError:
        log("LPIPS: off (the `lpips` package is not installed); cycle and identity losses use L1 only")
        return None
    # lpips ships its linear heads; the backbone comes from torchvision's download cache.
    backbone = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}[kind]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / backbone
    if not cached.is_file():
        log(f"LPIPS: off ({cached} not found locally; nothing is downloaded during training); L1 only")
        return None
    net = lpips.LPIPS(net=kind, verbose=False).to(device)
    net.requires_grad_(False).eval()
    log(f"LPIPS: on ({kind})")
    return net


def load_pipeline(args):
    from .pipeline import SCUFPipeline

    return SCUFPipeline.from_path(args.pretrained, image_encoder=args.image_encoder)


def build_training(args, accelerator, log):
    """Pipeline + SCUF modules + the extra training networks; returns (model, gen params, disc params, named)."""
    import copy

    from .retinex import build_decomposer
    from .prompts import DARKEN_PROMPT, DEFAULT_PROMPT
    from .training import (
        CLIPDiscriminatorHeads,
        LossWeights,
        SCUFCycleModel,
        clip_levels,
        load_vae_weights,
        make_reflectance_decoder,
        plain_unet_twin,
        reflectance_decoder_parameters,
    )
    from .weights import scuf_parameters

    device = accelerator.device
    pipe = load_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.unet, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False)
    # Same seed on every process before the random initialisation: identical replicas.
    torch.manual_seed(args.seed)
    pipe.init_scuf_modules(init="official")
    pipe.to(device)
    vae_b2a = copy.deepcopy(pipe.vae)
    if args.init_weights:
        pipe.load_scuf_weights(args.init_weights)
        if str(args.init_weights).endswith(".safetensors"):
            log(f"initialised the lighten direction from {args.init_weights}; the darken VAE starts fresh")
        else:  # an official checkpoint holds both directions
            load_vae_weights(pipe, vae_b2a, args.init_weights, "b2a")
            log(f"initialised both directions from {args.init_weights}")
    ref_vae = decomposer = None
    if args.no_reflectance:
        log("reflectance consistency: off (--no_reflectance)")
    else:
        ref_vae = make_reflectance_decoder(pipe.vae)
        decomposer = build_decomposer(args.retinex_weights, device)
        log("reflectance consistency: on, targets from "
            + (f"RetinexNet DecomNet ({args.retinex_weights})" if args.retinex_weights
               else "the classical decomposition (no --retinex_weights given)"))
    caption_unet = None
    if args.captions:
        caption_unet = plain_unet_twin(pipe.unet)
        log("caption consistency: on")
    else:
        log("caption consistency: off (no --captions file; write one with the `caption` subcommand)")
    if args.gradient_checkpointing:
        for unet in (pipe.unet, caption_unet):
            if unet is not None:
                unet.enable_gradient_checkpointing()
    lpips_net = load_lpips(args.lpips, device, log)

    vision_config = pipe.image_encoder.config
    levels = clip_levels(vision_config.num_hidden_layers, args.disc_levels)
    disc_l = CLIPDiscriminatorHeads(len(levels), 2 * vision_config.hidden_size).to(device)
    disc_d = CLIPDiscriminatorHeads(len(levels), 2 * vision_config.hidden_size).to(device)

    with torch.no_grad():
        prompt_a2b = pipe.encode_prompt(DEFAULT_PROMPT, device)
        prompt_b2a = pipe.encode_prompt(DARKEN_PROMPT, device)
    weights = LossWeights(lambda_idt=args.lambda_idt, lambda_gan=args.lambda_gan,
                          lambda_cycle_lpips=args.lambda_cycle_lpips, lambda_idt_lpips=args.lambda_idt_lpips)
    model = SCUFCycleModel(pipe, vae_b2a, ref_vae, decomposer, caption_unet, lpips_net, levels, disc_l, disc_d,
                           prompt_a2b, prompt_b2a, weights)

    named = {}  # every trained tensor by a stable name (optimizer order, checkpoint keys)
    named.update({f"a2b.{k}": v for k, v in pipe.scuf_parameters().items()})
    named.update({f"b2a.{k}": v for k, v in scuf_parameters(vae_b2a, None, pipe.unet).items() if k.startswith("vae.")})
    if ref_vae is not None:
        named.update({f"ref.{k}": v for k, v in reflectance_decoder_parameters(ref_vae).items()})
    gen_params = list(named.values())
    for param in gen_params:
        param.requires_grad_(True)
    disc_named = {f"disc_lighten.{k}": v for k, v in disc_l.named_parameters()}
    disc_named.update({f"disc_darken.{k}": v for k, v in disc_d.named_parameters()})
    return model, gen_params, list(disc_named.values()), {**named, **disc_named}


# ----------------------------------------------------------------------------------------------- checkpoints


class TrainedParameters(torch.nn.Module):
    """Every trained tensor under its stable name, as the one module accelerate prepares, saves and restores.

    The tensors stay owned by their networks (registered here, not copied). The forward is the identity on a loss
    already computed by ``training_iteration``: under DDP it lets the reducer find, from that loss's graph, which
    parameters the update touches (``find_unused_parameters``: each of the six updates uses a subset), so each
    backward averages exactly those gradients over processes.
    """

    def __init__(self, named: dict):
        super().__init__()
        for name, param in named.items():
            if not isinstance(param, torch.nn.Parameter):
                raise TypeError(f"{name}: a trained tensor must be an nn.Parameter of its network (shared, not copied)")
            self.register_parameter(name.replace(".", "/"), param)  # module attribute names cannot hold dots

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def refuse_earlier_run(output: Path) -> None:
    """Raise :class:`FileExistsError` if ``output`` holds an earlier run (only ``--resume`` may continue it)."""
    if not output.is_dir():
        return
    found = sorted(p.name for p in output.iterdir()
                   if _CHECKPOINT.match(p.name) or p.name in ("scuf_weights.safetensors", B2A_WEIGHTS_NAME, LOG_NAME))
    if found:
        raise FileExistsError(f"--output {output} already holds an earlier run ({', '.join(found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}); continue it with --resume latest or choose a "
                              "new folder")


def find_checkpoint(output: Path, resume: str) -> Path | None:
    """The checkpoint folder ``--resume`` names ('latest': the newest complete ``checkpoint-<step>`` in output, or
    None). ``training_state.json`` is written last: a folder without it is not a checkpoint."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise SystemExit(f"--resume: {path} is not a checkpoint folder (no {STATE_NAME})")
        return path
    steps = [(int(m.group(1)), p) for p in output.glob("checkpoint-*") if (m := _CHECKPOINT.match(p.name))]
    steps = [(s, p) for s, p in steps if (p / STATE_NAME).is_file()]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator, output: Path, step: int, model, trained, args) -> Path:
    """Write ``checkpoint-<step>`` atomically: ``accelerator.save_state`` (trained parameters, optimizers, scaler,
    every process's RNG state) into a temp folder, then our weight files and ``training_state.json``, then rename."""
    from .weights import save_scuf_file, scuf_parameters

    if accelerator.num_processes > 1:
        # the replicas must be identical (same init, DDP-averaged gradients); a divergence would be saved silently
        params = accelerator.unwrap_model(trained).parameters()
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        sums = accelerator.gather(checksum.to(accelerator.device))
        if not torch.all(sums == sums[0]):
            raise RuntimeError(f"step {step}: model replicas diverged across processes (checksums {sums.tolist()})")
    final = output / f"checkpoint-{step}"
    tmp = output / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = model.pipe
        pipe.save_scuf_weights(tmp / "scuf_weights.safetensors", direction="a2b")
        save_scuf_file(tmp / B2A_WEIGHTS_NAME, scuf_parameters(model.vaes["b2a"], pipe.image_proj, pipe.unet),
                       pipe.scuf_config, direction="b2a")
        state = {"step": step, "seed": args.seed, "num_processes": accelerator.num_processes,
                 "args": {k: v for k, v in vars(args).items() if k != "resume"}}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, trained: TrainedParameters) -> int:
    """``accelerator.load_state``: trained parameters, optimizers, scaler and RNG state; returns the step."""
    from safetensors import safe_open

    with safe_open(str(path / MODEL_NAME), "pt") as saved:
        if set(saved.keys()) != set(trained.state_dict()):
            raise SystemExit(f"--resume: {path / MODEL_NAME} does not match this configuration (reflectance or "
                             "discriminator settings changed?)")
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_NAME).read_text())["step"])


# ------------------------------------------------------------------------------------------------------ loop


def _write_validation(model, data: UnpairedImages, output: Path, step: int, count: int) -> None:
    """Lighten the first ``count`` low-light images (shorter side ``--resize``) with the current weights."""
    import numpy as np
    import torch.nn.functional as F

    from ..media.image_io import read_image, write_image

    folder = output / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in data.low[:count]:
        x = torch.from_numpy(read_image(path).to_float()).permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        scale = data.resize / min(h, w)
        x = F.interpolate(x, size=(max(8, round(h * scale)), max(8, round(w * scale))), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        out = model.pipe(x, output_type="np").images[0]
        write_image(folder / f"{path.stem}.png", (np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def train(args) -> Path:
    """Run training; returns the path of the final lighten weights."""
    from accelerate import Accelerator

    _check_args(args)
    output = Path(args.output)
    if not args.resume:
        refuse_earlier_run(output)

    def early_log(message):  # before the Accelerator exists: every process validates, rank 0 prints
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            print(f"[train_scuf] {message}", flush=True)

    data, captions = prepare_data(args, early_log)

    try:
        import tensorboard  # noqa: F401
        log_with = "tensorboard"
    except ImportError:
        log_with = None
    from accelerate import DistributedDataParallelKwargs

    # each of the six updates of an iteration touches a subset of the trained parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with, project_dir=str(output),
                              cpu=args.cpu, kwargs_handlers=[ddp])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        # e.g. torchrun/accelerate --multi_gpu on a machine without GPUs: every process would train alone and
        # overwrite the others' files
        raise SystemExit(f"{launched} processes were launched but the Accelerator sees {accelerator.num_processes}; "
                         "without GPUs pass --cpu so that they train together (gloo)")

    def log(message):
        if accelerator.is_main_process:
            print(f"[train_scuf] {message}", flush=True)

    if log_with is None:
        log("TensorBoard: not installed; losses go to train_log.jsonl only")
    output.mkdir(parents=True, exist_ok=True)
    model, gen_params, disc_params, named = build_training(args, accelerator, log)
    opt_kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
                      eps=args.adam_epsilon)
    trained, opt_gen, opt_disc = accelerator.prepare(TrainedParameters(named),
                                                     torch.optim.AdamW(gen_params, **opt_kwargs),
                                                     torch.optim.AdamW(disc_params, **opt_kwargs))
    log(f"trainable: {sum(p.numel() for p in gen_params):,} generator + {sum(p.numel() for p in disc_params):,} "
        f"discriminator parameters; {accelerator.num_processes} process(es) on {accelerator.device}")

    def update(loss, which: str) -> None:
        """backward (gradients averaged over processes by DDP) -> clip -> step -> zero_grad."""
        params, optimizer = (gen_params, opt_gen) if which == "generator" else (disc_params, opt_disc)
        accelerator.backward(trained(loss))
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = 0
    if args.resume:
        checkpoint = find_checkpoint(output, args.resume)
        if checkpoint is None:
            log(f"--resume latest: no checkpoint in {output}, starting from scratch")
        else:
            start = load_checkpoint(accelerator, checkpoint, accelerator.unwrap_model(trained))
            log(f"resumed from {checkpoint} (step {start})")
    if log_with and accelerator.is_main_process:
        accelerator.init_trackers("scuf", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    from tqdm.auto import tqdm

    from .training import training_iteration

    progress = tqdm(total=args.max_train_steps, initial=start, desc="SCUF steps",
                    disable=args.no_progress or not accelerator.is_local_main_process)
    log_file = output / LOG_NAME
    if accelerator.is_main_process and log_file.exists():
        # keep the history up to the resumed step (an interrupted run may have logged steps after it)
        kept = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_file.write_text("".join(line + "\n" for line in kept))
    device = accelerator.device
    world, rank, batch = accelerator.num_processes, accelerator.process_index, args.train_batch_size
    last_checkpoint = start
    t0 = time.perf_counter()
    for step in range(start + 1, args.max_train_steps + 1):
        samples = [data.sample(((step - 1) * world + rank) * batch + i) for i in range(batch)]
        low = torch.stack([s[1] for s in samples]).to(device)
        normal = torch.stack([s[3] for s in samples]).to(device)
        low_caption = [captions["low"][s[0]] for s in samples] if captions else None
        normal_caption = [captions["normal"][s[2]] for s in samples] if captions else None
        # Per-step generator: the posterior samples depend only on (seed, step, process), so resuming is exact.
        gen = torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 4099 + rank)
        step_start = time.perf_counter()
        logs = training_iteration(model, (low, normal, low_caption, normal_caption), gen, update, accelerator.autocast)
        if world > 1:
            keys = sorted(logs)
            values = accelerator.reduce(torch.tensor([logs[k] for k in keys], device=device), reduction="mean")
            logs = dict(zip(keys, values.tolist()))
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"step {step}: non-finite loss {logs}")
        if accelerator.is_main_process:
            entry = {"step": step, **logs, "seconds": round(time.perf_counter() - step_start, 4)}
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        accelerator.log(logs, step=step)
        progress.update(1)
        progress.set_postfix(cycle=f"{logs.get('cycle_low_cycle', 0):.3f}", gan=f"{logs.get('gan_lighten', 0):.3f}")
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            path = save_checkpoint(accelerator, output, step, model, trained, args)
            last_checkpoint = step
            log(f"saved {path}")
        if args.validation_steps and step % args.validation_steps == 0 and accelerator.is_main_process:
            _write_validation(model, data, output, step, args.num_validation_images)
    progress.close()
    steps_done = args.max_train_steps - start
    if steps_done > 0:
        log(f"{steps_done} steps in {time.perf_counter() - t0:.1f} s "
            f"({steps_done / (time.perf_counter() - t0):.3f} steps/s per process)")
    final = output / "scuf_weights.safetensors"
    if accelerator.is_main_process:
        from .weights import save_scuf_file, scuf_parameters

        pipe = model.pipe
        pipe.save_scuf_weights(final, direction="a2b")
        save_scuf_file(output / B2A_WEIGHTS_NAME, scuf_parameters(model.vaes["b2a"], pipe.image_proj, pipe.unet),
                       pipe.scuf_config, direction="b2a")
        log(f"final weights: {final} (last checkpoint: step {last_checkpoint})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


# --------------------------------------------------------------------------------------------------- caption


def caption(args) -> Path:
    """The ``caption`` subcommand: caption every readable image of both folders once, write the captions file."""
    from tqdm.auto import tqdm

    from .captions import caption_images, load_captioner, relative_key, save_captions
    from ..media.image_io import read_image

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists (use --overwrite to replace it)")

    def log(message):
        print(f"[train_scuf caption] {message}", flush=True)

    files = {d: readable_images(find_images(getattr(args, d), d), d, log) for d in ("low", "normal")}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor, net = load_captioner(args.captioner, device)
    result = {}
    with tqdm(total=sum(len(v) for v in files.values()), desc="captions") as bar:
        for domain, paths in files.items():
            images = [read_image(p).pixels for p in paths]
            images = [(im >> 8).astype("uint8") if im.dtype.name == "uint16" else im for im in images]
            texts = caption_images(images, processor, net, args.batch_size, args.max_new_tokens,
                                   day_words=not args.keep_night_words, progress=bar)
            result[domain] = {relative_key(p, getattr(args, domain)): t for p, t in zip(paths, texts)}
    save_captions(out, result, args.captioner)
    log(f"wrote {out}: {len(result['low'])} low + {len(result['normal'])} normal captions")
    return out
