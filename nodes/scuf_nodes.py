"""SCUF nodes: load SD-Turbo, attach the cycle-attention adapter (SCUF weights), lighten in one diffusion step.

Thin adapters over :class:`~comfyui_lowlight.pipelines.scuf.pipeline.SCUFPipeline`. The three nodes pass one typed
value, ``SCUF_PIPE`` (a :class:`SCUFModel`): the loader makes it (base model only), the adapter loader returns a
copy that also carries SCUF weights and the adapter scale, and the lighten node activates those weights on the base
model and runs it.

Memory, the ComfyUI way: one base pipeline is kept (on ComfyUI's offload device, the CPU unless the GPU has room
for everything), keyed by its files and dtype. ``SCUF_PIPE`` values name that base instead of holding it, so
ComfyUI's output cache never keeps a second copy alive, and loading the same base twice returns the same object.
Before a run the node asks ``comfy.model_management`` to free room on the compute device, moves the pipeline
there, and moves it back to the offload device afterwards so that other nodes get the GPU back.

SCUF weights are read once on the CPU (converted from the official checkpoint when needed) and copied into the
modules attached to the base when a run uses them and another file was active. Changing the file or the adapter
scale therefore never reloads the base model.
"""

from __future__ import annotations

import gc
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from comfy_api.latest import io

from .comfy_tensors import bchw_to_image, image_to_bchw
from .model_folders import (
    DEFAULT_BASE,
    DEFAULT_CLIP,
    DEFAULT_SCUF_WEIGHTS,
    SCUF_FOLDER,
    SHIPPED_DIR,
    base_choices,
    base_missing,
    check_scuf_parts,
    clip_choices,
    clip_missing,
    file_stamp,
    folder_dirs,
    resolve_base,
    resolve_clip,
    resolve_weights,
    scuf_weight_choices,
    scuf_weights_missing,
)
from ..pipelines.scuf.options import (
    ADAPTER_SCALE,
    DEFAULT_PROMPT,
    DTYPE_HELP,
    DTYPES as DTYPE_NAMES,
    PROMPT_HELP,
    SAMPLE_LATENT,
    SAMPLE_LATENT_HELP,
    SEED,
)
from ..pipelines.weights_files import WeightsFileError

CATEGORY = "image/lowlight"
# The typed value the three nodes pass along (a SCUFModel); the io type name is saved in workflows' links.
SCUFPipe = io.Custom("SCUF_PIPE")

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


# ------------------------------------------------------------------------------------- the SCUF_PIPE value


@dataclass(frozen=True)
class SCUFBaseSpec:
    """What the base pipeline is loaded from; equal specs share one loaded pipeline."""

    model: str  # dropdown value, for messages
    model_path: str  # a diffusers folder or a single-file checkpoint
    clip_path: Optional[str]  # None: the base folder's image_encoder/
    dtype: str  # "float32" | "bfloat16" | "float16" (auto already resolved)
    stamp: tuple


@dataclass(frozen=True)
class SCUFWeights:
    """SCUF weights read once from a file (``file``: a ``SCUFWeightsFile`` on the CPU) for one base model."""

    name: str
    file: object = field(repr=False)  # SCUFWeightsFile
    token: str  # identifies this loaded content on the pipeline it was copied into


@dataclass(frozen=True)
class SCUFModel:
    """The ``SCUF_PIPE`` value: a base model reference, plus SCUF weights and adapter scale once attached."""

    base: SCUFBaseSpec
    weights: Optional[SCUFWeights] = None
    adapter_scale: float = ADAPTER_SCALE.default


# One loaded base: {"spec": SCUFBaseSpec, "pipe": SCUFPipeline, "active": token of the SCUF weights copied in}.
_BASE_CACHE: dict = {}
# The last SCUF weights file read: {"key": (file stamp, base spec), "weights": SCUFWeights}.
_WEIGHTS_CACHE: dict = {}


def release_base() -> None:
    """Drop the cached base pipeline (before loading another one, so that two never coexist)."""
    _BASE_CACHE.clear()
    _WEIGHTS_CACHE.clear()
    gc.collect()


def _load_base(spec: SCUFBaseSpec):
    from ..pipelines.scuf.pipeline import SCUFPipeline

    try:
        pipe = SCUFPipeline.from_path(spec.model_path, dtype=DTYPES[spec.dtype], image_encoder=spec.clip_path,
                                      local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RuntimeError(
            f"could not load the SD-Turbo base model {spec.model!r} ({spec.model_path}) with CLIP image encoder "
            f"{spec.clip_path or 'image_encoder/'}: {exc}"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_pipeline(spec: SCUFBaseSpec, fresh: bool = False):
    """The loaded base pipeline for ``spec``: the cached one, or loaded now (replacing any other base)."""
    if fresh or _BASE_CACHE.get("spec") != spec:
        release_base()
        _BASE_CACHE.update(spec=spec, pipe=_load_base(spec), active=None)
    return _BASE_CACHE["pipe"]


def read_scuf_weights(spec: SCUFBaseSpec, name: str, path: Path) -> SCUFWeights:
    """SCUF weights from ``path`` for the base ``spec`` (cached while the file and the base stay the same)."""
    key = (file_stamp(path), spec)
    if _WEIGHTS_CACHE.get("key") != key:
        file = base_pipeline(spec).read_scuf_weights(path, "a2b")
        _WEIGHTS_CACHE.clear()
        _WEIGHTS_CACHE.update(key=key, weights=SCUFWeights(name, file, uuid.uuid4().hex))
    return _WEIGHTS_CACHE["weights"]


def activate(model: SCUFModel):
    """The base pipeline of ``model`` with its SCUF weights in the attached modules (copied only if needed)."""
    if model.weights is None:
        raise ValueError(
            "scuf_pipe has no SCUF weights: connect SCUF Load SD-Turbo -> Cycle-Attention Adapter Loader -> this node"
        )
    weights = model.weights
    pipe = base_pipeline(model.base)
    if _BASE_CACHE.get("active") == weights.token:
        return pipe
    if pipe.scuf_config is not None and pipe.scuf_config != weights.file.config:
        pipe = base_pipeline(model.base, fresh=True)  # other LoRA rank/targets: modules cannot be re-shaped
    _BASE_CACHE["active"] = None  # a failed copy leaves no weights marked active
    pipe.load_scuf_weights(weights.file)
    _BASE_CACHE["active"] = weights.token
    return pipe


def _resolve_auto_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if device.type == "cpu":
        return "float32"
    if mm.should_use_bf16(device):
        return "bfloat16"
    return "float16" if mm.should_use_fp16(device) else "float32"


def _module_bytes(pipe) -> int:
    return sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
               for p in m.parameters())


# --------------------------------------------------------------------------------------------------- nodes


def _not_there_yet(default: str, missing: Optional[str]) -> str:
    """Tooltip sentence marking a default dropdown name whose file is not downloaded yet."""
    if missing is None:
        return ""
    return (f" Not downloaded yet: '{default}' (the default name, listed so that graphs open; running the graph "
            "lists every missing file with where it goes and where to download it).")


def _option_input(option, **extra):
    """A ComfyUI INT/FLOAT widget read from the SCUF parameter table (pipelines/scuf/options.py)."""
    kind = io.Int if option.type is int else io.Float
    return kind.Input(option.name, default=option.default, min=option.min, max=option.max, step=option.step,
                      tooltip=option.help, **extra)


class SCUFLoadSDTurbo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LowLightSCUFLoadSDTurbo",
            display_name="SCUF Load SD-Turbo",
            category=CATEGORY,
            description=(
                "Loads the SD-Turbo base model and the CLIP ViT-B/32 image encoder that SCUF builds on, from "
                "ComfyUI's model folders: a diffusers folder in models/diffusers or a single-file checkpoint in "
                "models/checkpoints, and the CLIP encoder from models/clip_vision. Connect it to a Cycle-Attention "
                "Adapter Loader. Before loading it checks all three parts SCUF needs (base, CLIP, SCUF weights) and "
                "names every missing one with where it goes, its size and its download. The model is loaded once "
                "and reused; it stays on the offload device between runs."
            ),
            inputs=[
                io.Combo.Input(
                    "model", options=base_choices(),
                    tooltip="SD-Turbo: 'diffusers/<folder>' = a folder with model_index.json in models/diffusers; "
                    "'checkpoints/<file>' = the single-file sd_turbo.safetensors in models/checkpoints (its "
                    "tokenizer comes from ComfyUI's bundled CLIP tokenizer)."
                    + _not_there_yet(DEFAULT_BASE, base_missing(DEFAULT_BASE)),
                ),
                io.Combo.Input(
                    "clip", options=clip_choices(),
                    tooltip="CLIP ViT-B/32 image encoder that embeds the illumination prompt: a folder "
                    "(openai/clip-vit-base-patch32, transformers layout) or an OpenAI state-dict file in "
                    "models/clip_vision, or the image_encoder/ folder saved inside a diffusers base folder."
                    + _not_there_yet(DEFAULT_CLIP, clip_missing(DEFAULT_CLIP, DEFAULT_BASE)),
                ),
                io.Combo.Input(
                    "dtype", options=["auto", *DTYPE_NAMES], default="auto",
                    tooltip=f"{DTYPE_HELP} auto: float32 on the CPU; on a GPU bfloat16 where supported, else "
                    "float16.",
                ),
            ],
            outputs=[SCUFPipe.Output("scuf_pipe", tooltip="SD-Turbo + CLIP image encoder, without SCUF weights yet.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model, clip, dtype, **_):
        # A folder downloaded (or replaced) under the same name runs the node again instead of reusing the cache.
        try:
            model_path = resolve_base(model)
            return (model, clip, dtype, file_stamp(model_path), file_stamp(resolve_clip(clip, model_path)))
        except (FileNotFoundError, ValueError):
            return (model, clip, dtype, "missing")

    @classmethod
    def execute(cls, model, clip, dtype) -> io.NodeOutput:
        check_scuf_parts(model, clip)
        model_path = resolve_base(model)
        clip_path = resolve_clip(clip, model_path)
        spec = SCUFBaseSpec(
            model=model, model_path=str(model_path), clip_path=None if clip_path is None else str(clip_path),
            dtype=_resolve_auto_dtype(dtype), stamp=(file_stamp(model_path), file_stamp(clip_path)),
        )
        base_pipeline(spec)
        return io.NodeOutput(SCUFModel(spec))


class SCUFAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LowLightSCUFAdapterLoader",
            display_name="Cycle-Attention Adapter Loader",
            category=CATEGORY,
            description=(
                "Attaches SCUF weights to the SD-Turbo pipeline: the VAE skip connections and LoRA, the image-prompt "
                "projector and the cycle-attention adapter of SCUF (ICCV 2025). Reads this project's .safetensors or "
                "the official GEFU checkpoint (.pkl). Changing the file or the scale does not reload the base model."
            ),
            inputs=[
                SCUFPipe.Input("scuf_pipe", tooltip="From SCUF Load SD-Turbo."),
                io.Combo.Input(
                    "scuf_weights", options=scuf_weight_choices(),
                    tooltip="SCUF weights in ComfyUI's models/scuf folder (or shipped in lora_weights/): this "
                    "project's .safetensors (from lowlight train scuf or lowlight convert-scuf) or the official "
                    "checkpoint .pkl (its lighten direction is used)."
                    + _not_there_yet(DEFAULT_SCUF_WEIGHTS, scuf_weights_missing(DEFAULT_SCUF_WEIGHTS)),
                ),
                _option_input(ADAPTER_SCALE),
            ],
            outputs=[SCUFPipe.Output(
                "scuf_pipe",
                tooltip="The pipeline with the SCUF weights and adapter scale, ready for SCUF One-Step Lighten.",
            )],
        )

    @classmethod
    def fingerprint_inputs(cls, scuf_weights, adapter_scale, **_):
        try:
            return (scuf_weights, adapter_scale, file_stamp(resolve_weights(SCUF_FOLDER, scuf_weights)))
        except (FileNotFoundError, ValueError):
            return (scuf_weights, adapter_scale, "missing")

    @classmethod
    def execute(cls, scuf_pipe, scuf_weights, adapter_scale) -> io.NodeOutput:
        ADAPTER_SCALE.check(adapter_scale)  # before any loading: the same bounds the widget and the pipeline use
        missing = scuf_weights_missing(scuf_weights)
        if missing:
            raise FileNotFoundError(missing)
        path = resolve_weights(SCUF_FOLDER, scuf_weights)
        base_pipeline(scuf_pipe.base)  # a failing base load is not the weights file's fault: let it through as is
        try:
            weights = read_scuf_weights(scuf_pipe.base, scuf_weights, path)
            model = replace(scuf_pipe, weights=weights, adapter_scale=float(adapter_scale))
            activate(model)  # fail here, on this node, if the file does not fit the base model
        except Exception as exc:  # unreadable, unsafe, truncated or mismatched: all say which file and where
            places = ", ".join([str(SHIPPED_DIR)] + folder_dirs(SCUF_FOLDER))
            if isinstance(exc, WeightsFileError):  # not valid, code inside, integer or NaN/inf: whatever the base
                raise ValueError(
                    f"SCUF weights {scuf_weights!r} cannot be loaded: {exc}\nPut SCUF weights (this project's "
                    f".safetensors or the official checkpoint) in one of: {places}"
                ) from exc
            raise ValueError(
                f"SCUF weights {scuf_weights!r} ({path}) cannot be used with the base model "
                f"{scuf_pipe.base.model!r}: {exc}\nPut SCUF weights trained for this base model (SD-Turbo) in "
                f"one of: {places}"
            ) from exc
        return io.NodeOutput(model)


class SCUFLighten(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LowLightSCUFLighten",
            display_name="SCUF One-Step Lighten",
            category=CATEGORY,
            description=(
                "Brightens a low-light image or batch with SCUF in one SD-Turbo step: the VAE encodes the image, one "
                "UNet step guided by the text prompt and the illumination prompt (1 - V, bright where the image is "
                "dark) removes the darkness, the VAE decodes with skip connections that keep the details. Any image "
                "size; the output has the input's size."
            ),
            inputs=[
                SCUFPipe.Input("scuf_pipe", tooltip="From Cycle-Attention Adapter Loader (SD-Turbo + SCUF weights)."),
                io.Image.Input("image", tooltip="Low-light image or batch (RGB; an alpha channel is ignored)."),
                io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True, tooltip=PROMPT_HELP),
                _option_input(SEED),
                io.Boolean.Input("sample_latent", default=SAMPLE_LATENT, label_on="sampled (official)",
                                 label_off="mean", tooltip=SAMPLE_LATENT_HELP),
                io.Mask.Input(
                    "illumination_mask", optional=True,
                    tooltip="Illumination prompt as a MASK (e.g. inverse_mask of Illumination Prompt, or edited with "
                    "mask nodes), same size as the image, one per image or one for all. Absent: 1 - V of the image.",
                ),
                io.Image.Input(
                    "illumination_image", optional=True,
                    tooltip="Illumination prompt as an IMAGE (e.g. inverse_image of Illumination Prompt); its "
                    "channel mean is used. Connect this or illumination_mask, not both.",
                ),
            ],
            outputs=[io.Image.Output("image", tooltip="The lightened image or batch, same size as the input.")],
        )

    @classmethod
    def execute(cls, scuf_pipe, image, prompt, seed, sample_latent, illumination_mask=None,
                illumination_image=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        frames = image_to_bchw(image)
        maps = illumination_maps(frames, illumination_mask, illumination_image)
        pipe = activate(scuf_pipe)
        device = mm.get_torch_device()
        # Room for the weights plus the full-resolution VAE activations (a rough 4 KiB per pixel).
        mm.free_memory(_module_bytes(pipe) + 4096 * frames.shape[-2] * frames.shape[-1], device)
        generator = torch.Generator("cpu").manual_seed(seed)  # one stream over the batch, as the pipeline's own
        progress = comfy.utils.ProgressBar(frames.shape[0])
        lightened = []
        try:
            pipe.to(device)
            for index in range(frames.shape[0]):
                mm.throw_exception_if_processing_interrupted()
                illumination = None if maps is None else [maps[index if maps.shape[0] > 1 else 0]]
                out = pipe(
                    frames[index : index + 1], prompt=prompt, illumination=illumination,
                    adapter_scale=scuf_pipe.adapter_scale, generator=generator, sample_latent=sample_latent,
                    output_type="pt",
                ).images
                lightened.append(bchw_to_image(out))
                progress.update(1)
        finally:
            pipe.to(mm.unet_offload_device())
            mm.soft_empty_cache()
        return io.NodeOutput(torch.cat(lightened))


def illumination_maps(frames: torch.Tensor, mask=None, image=None) -> Optional[torch.Tensor]:
    """The optional illumination inputs as ``[1 or B, H, W]`` float32 maps in 0..1 (``None`` = computed per image).

    ``frames`` is the ``[B, 3, H, W]`` batch to lighten; a MASK is ``[B, H, W]`` (or ``[H, W]``), an IMAGE
    ``[B, H, W, C]`` whose channel mean is used.
    """
    if mask is not None and image is not None:
        raise ValueError("illumination: connect either illumination_mask or illumination_image, not both")
    if mask is None and image is None:
        return None
    if image is not None:
        maps = image_to_bchw(image, "illumination_image").mean(dim=1)
        what = "illumination_image"
    else:
        maps = mask.float()
        maps = maps[None] if maps.ndim == 2 else maps
        what = "illumination_mask"
    batch, height, width = frames.shape[0], frames.shape[-2], frames.shape[-1]
    if maps.ndim != 3 or tuple(maps.shape[-2:]) != (height, width) or maps.shape[0] not in (1, batch):
        raise ValueError(
            f"{what}: expected {batch} or 1 map(s) of the image size {height}x{width}, got shape "
            f"{tuple(maps.shape)}; resize or crop the map to the image first"
        )
    return maps.clamp(0.0, 1.0)
