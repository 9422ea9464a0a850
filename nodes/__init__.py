"""ComfyUI node adapters. Thin: the math lives in ``pipelines``.

Each node module contributes its classes here; the keys are the node type names saved in workflows, so they
never change once released (``LowLight`` prefix: node type names are global across all installed packs).
"""

import importlib.util

from .illumination_nodes import IlluminationPrompt
from .model_folders import register_model_folders
from .scuf_nodes import SCUFAdapterLoader, SCUFLighten, SCUFLoadSDTurbo
from .sgz_nodes import SGZEnhance

register_model_folders()

NODE_CLASS_MAPPINGS: dict = {
    "LowLightSGZEnhance": SGZEnhance,
    "LowLightIlluminationPrompt": IlluminationPrompt,
    "LowLightSCUFLoadSDTurbo": SCUFLoadSDTurbo,
    "LowLightSCUFAdapterLoader": SCUFAdapterLoader,
    "LowLightSCUFLighten": SCUFLighten,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    "LowLightSGZEnhance": "SGZ Enhance",
    "LowLightIlluminationPrompt": "Illumination Prompt",
    "LowLightSCUFLoadSDTurbo": "SCUF Load SD-Turbo",
    "LowLightSCUFAdapterLoader": "Cycle-Attention Adapter Loader",
    "LowLightSCUFLighten": "SCUF One-Step Lighten",
}

# The video node is V3 (comfy_api.latest), which exists only inside ComfyUI; ComfyUI also runs V3 classes listed in
# these classic mappings. (When every node is V3 they are all listed by the pack's comfy_entrypoint instead.)
if importlib.util.find_spec("comfy_api") is not None:
    from .sgz_video import NODE_ID as _VIDEO_NODE_ID
    from .sgz_video import SGZEnhanceVideo

    NODE_CLASS_MAPPINGS[_VIDEO_NODE_ID] = SGZEnhanceVideo
    NODE_DISPLAY_NAME_MAPPINGS[_VIDEO_NODE_ID] = "SGZ Enhance Video"
