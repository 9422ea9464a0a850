"""SGZ Enhance node: zero-shot low-light enhancement of an image or a batch of video frames.

Thin adapter over :class:`~comfyui_lowlight.pipelines.sgz.pipeline.SGZPipeline`; ComfyUI's ``comfy`` modules are
imported when the node runs, so the pack imports (and the node classes can be tested) outside ComfyUI.
"""

from pathlib import Path

import torch

from ..pipelines.sgz.model import SHIPPED_WEIGHTS
from ..pipelines.parameters import Option
from ..pipelines.sgz.options import AUTO_EXPOSURE, DENOISE, SGZ_OPTIONS
from .comfy_tensors import bchw_to_image, image_to_bchw
from .model_folders import SGZ_FOLDER, resolve_weights, weight_choices

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


def _number_input(option: Option) -> tuple:
    """A ComfyUI INT/FLOAT input with the table's default, bounds and help (the widget enforces the bounds)."""
    kind = "INT" if option.type is int else "FLOAT"
    return (kind, {"default": option.default, "min": option.min, "max": option.max, "step": option.step,
                   "tooltip": option.help})


class SGZEnhance:
    DESCRIPTION = (
        "Brightens a low-light image or a batch of video frames with SGZ (semantic-guided zero-shot "
        "enhancement): a tiny network estimates a per-pixel enhancement factor at low resolution, then a "
        "curve is applied several times at full resolution. Real-time, no prompt, no diffusion. Outputs the "
        "enhanced image and the enhancement factor (mid gray = unchanged, darker = lifted more)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "enhance"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "factor")
    OUTPUT_TOOLTIPS = (
        "The enhanced image or frames, same size as the input.",
        "The enhancement factor mapped to 0..1 for preview (0.5 = unchanged, lower = brightened).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        default_weights = SHIPPED_WEIGHTS.name
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Low-light image, or a batch of frames of one video in order."}),
                "weights": (
                    weight_choices(SGZ_FOLDER, "sgz*.safetensors", default_weights),
                    {
                        "tooltip": "SGZ weights: the pack's shipped weights (lora_weights/), or a file in "
                        "ComfyUI's models/sgz folder (our .safetensors or the official Epoch99.pth).",
                    },
                ),
                **{name: _number_input(option) for name, option in SGZ_OPTIONS.items()},
            }
        }

    def enhance(self, image, weights, recurrences, downscale, strength, temporal_smoothing,
                denoise=DENOISE.default, auto_exposure=AUTO_EXPOSURE.default):
        import comfy.model_management
        import comfy.utils

        pipe = load_cached_pipeline(resolve_weights(SGZ_FOLDER, weights), comfy.model_management.get_torch_device())
        frames = image_to_bchw(image)
        video_state = pipe.new_video_state()
        progress = comfy.utils.ProgressBar(frames.shape[0])
        enhanced, factors = [], []
        for index in range(frames.shape[0]):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out, factor = pipe(
                frames[index : index + 1],
                downscale=downscale,
                recurrences=recurrences,
                strength=strength,
                temporal_smoothing=temporal_smoothing,
                denoise=denoise,
                auto_exposure=auto_exposure,
                return_factor=True,
                video_state=video_state,
            )
            enhanced.append(bchw_to_image(out.clamp(0.0, 1.0)))
            factors.append(bchw_to_image((factor + 1.0) / 2.0))  # -1..1 -> 0..1 for display
            progress.update(1)
        return (torch.cat(enhanced), torch.cat(factors))
