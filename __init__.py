"""comfyui-lowlight: low-light enhancement for ComfyUI and diffusers.

The repository root is both a ComfyUI custom-node pack (ComfyUI reads ``NODE_CLASS_MAPPINGS`` from here)
and the Python package ``comfyui_lowlight``. Importing it must stay cheap: heavy libraries (diffusers,
transformers) are imported lazily inside the functions that need them.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
