"""comfyui-lowlight: low-light enhancement for ComfyUI and diffusers.

The repository root is both a ComfyUI custom-node pack and the Python package ``comfyui_lowlight``. ComfyUI (0.3.x
with ``comfy_api.latest``) calls :func:`comfy_entrypoint` and serves :data:`WEB_DIRECTORY` (the nodes' help pages)
under ``/extensions/<pack folder>/``. Importing this file must stay cheap and work outside ComfyUI: the node classes
(and with them torch and ComfyUI's ``comfy_api``) load only when ComfyUI calls the entrypoint, so
``python -m comfyui_lowlight --help`` and ``from comfyui_lowlight.pipelines import ...`` never pay for the ComfyUI
face. There is deliberately no ``NODE_CLASS_MAPPINGS`` here: ComfyUI would take that (V1) path instead of the
entrypoint.
"""

__version__ = "0.1.0"
__all__ = ["WEB_DIRECTORY", "comfy_entrypoint", "__version__"]

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """The pack's :class:`~comfy_api.latest.ComfyExtension` (ComfyUI awaits this when it loads custom nodes)."""
    from .nodes import LowLightExtension

    return LowLightExtension()
