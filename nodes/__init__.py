"""ComfyUI node adapters. Thin: the math lives in ``pipelines``.

Each node module contributes its classes here; the keys are the node type names saved in workflows, so they
never change once released (``LowLight`` prefix: node type names are global across all installed packs).
"""

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
