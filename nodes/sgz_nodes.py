"""SGZ Enhance node: zero-shot low-light enhancement of an image or a batch of video frames.

Thin adapter over :class:`~comfyui_lowlight.pipelines.sgz.pipeline.SGZPipeline`; ComfyUI's ``comfy`` modules are
imported when the node runs, so the node classes can be tested with stand-ins (tests/comfy_stubs.py).
"""

from pathlib import Path

import torch
from comfy_api.latest import io

from ..pipelines.parameters import Option
from ..pipelines.sgz.model import SHIPPED_WEIGHTS
from ..pipelines.sgz.options import SGZ_OPTIONS
from .comfy_tensors import bchw_to_image, image_to_bchw
from .model_folders import SGZ_FOLDER, file_stamp, resolve_weights, weight_choices

CATEGORY = "image/lowlight"

# One loaded pipeline, reused while the weights file (same path and content stamp) and the device stay the same.
_PIPELINE_CACHE: dict = {}


def load_cached_pipeline(path: Path, device: torch.device):
    """The :class:`SGZPipeline` for ``path`` on ``device``, loaded once and kept until another file is chosen."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(device))
    if _PIPELINE_CACHE.get("key") != key:
        from ..pipelines.sgz.pipeline import SGZPipeline

        _PIPELINE_CACHE.clear()  # drop the old model before loading the new one
        _PIPELINE_CACHE["pipe"] = SGZPipeline.from_pretrained(path, device=device)
        _PIPELINE_CACHE["key"] = key
    return _PIPELINE_CACHE["pipe"]


def option_input(option: Option, **extra):
    """A ComfyUI INT/FLOAT widget with the table's default, bounds, step and help (the widget enforces the bounds).

    Optional: an API graph saved before an option joined the table still validates and runs, the option then takes
    the pipeline's default (the UI shows every widget all the same, and fills a missing one with its default)."""
    kind = io.Int if option.type is int else io.Float
    return kind.Input(option.name, default=option.default, min=option.min, max=option.max, step=option.step,
                      tooltip=option.help, optional=True, **extra)


def sgz_weights_input():
    """The SGZ weights dropdown: the pack's shipped weights, or a file in ComfyUI's models/sgz folder."""
    return io.Combo.Input(
        "weights",
        options=weight_choices(SGZ_FOLDER, "sgz*.safetensors", SHIPPED_WEIGHTS.name),
        tooltip="SGZ weights: the pack's shipped weights (lora_weights/), or a file in ComfyUI's models/sgz folder "
        "(our .safetensors or the official Epoch99.pth).",
    )


def weights_fingerprint(folder_name: str, choice: str):
    """What ComfyUI's cache compares for a weights choice: the file's path and stamp, so that a file replaced on disk
    under the same name runs the node again (a missing file fingerprints as such, and fails when run)."""
    try:
        return (choice, file_stamp(resolve_weights(folder_name, choice)))
    except (FileNotFoundError, ValueError):
        return (choice, "missing")


class SGZEnhance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LowLightSGZEnhance",
            display_name="SGZ Enhance",
            category=CATEGORY,
            description=(
                "Brightens a low-light image or a batch of video frames with SGZ (semantic-guided zero-shot "
                "enhancement): a tiny network estimates a per-pixel enhancement factor at low resolution, then a "
                "curve is applied several times at full resolution. Real-time, no prompt, no diffusion. Outputs the "
                "enhanced image and the enhancement factor (mid gray = unchanged, darker = lifted more)."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Low-light image, or a batch of frames of one video in order."),
                sgz_weights_input(),
                # Built from the parameter table, in its order (saved workflows list widget values by position).
                *(option_input(option) for option in SGZ_OPTIONS.values()),
            ],
            outputs=[
                io.Image.Output("image", tooltip="The enhanced image or frames, same size as the input."),
                io.Image.Output(
                    "factor",
                    tooltip="The enhancement factor mapped to 0..1 for preview (0.5 = unchanged, lower = brightened).",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, weights, **_):
        return weights_fingerprint(SGZ_FOLDER, weights)

    @classmethod
    def execute(cls, image, weights, **options) -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        frames = image_to_bchw(image)  # first: an empty batch says so before any weights load
        pipe = load_cached_pipeline(resolve_weights(SGZ_FOLDER, weights), comfy.model_management.get_torch_device())
        video_state = pipe.new_video_state()
        progress = comfy.utils.ProgressBar(frames.shape[0])
        enhanced, factors = [], []
        for index in range(frames.shape[0]):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out, factor = pipe(frames[index : index + 1], return_factor=True, video_state=video_state, **options)
            enhanced.append(bchw_to_image(out.clamp(0.0, 1.0)))
            factors.append(bchw_to_image((factor + 1.0) / 2.0))  # -1..1 -> 0..1 for display
            progress.update(1)
        return io.NodeOutput(torch.cat(enhanced), torch.cat(factors))
