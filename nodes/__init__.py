"""ComfyUI node adapters (V3 schema, ``comfy_api.latest``). Thin: the math lives in ``pipelines``.

:class:`LowLightExtension` is what the pack's ``comfy_entrypoint`` returns. The node ids (``Schema.node_id``) are the
node type names saved in workflows, so they never change once released (``LowLight`` prefix: node type names are
global across all installed packs). Importing this package needs ComfyUI's ``comfy_api`` (the tests provide a
stand-in, tests/comfy_stubs.py); the rest of the pack never imports it.
"""

from comfy_api.latest import ComfyExtension, io

from .example_inputs import install_example_inputs
from .illumination_nodes import IlluminationPrompt
from .model_folders import register_model_folders
from .scuf_nodes import SCUFAdapterLoader, SCUFLighten, SCUFLoadSDTurbo
from .sgz_nodes import SGZEnhance
from .sgz_video import SGZEnhanceVideo


def node_classes() -> list:
    """Every node of the pack, SGZ first."""
    return [SGZEnhance, SGZEnhanceVideo, IlluminationPrompt, SCUFLoadSDTurbo, SCUFAdapterLoader, SCUFLighten]


class LowLightExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()
        install_example_inputs()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
