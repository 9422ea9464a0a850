"""comfyui-lowlight: low-light enhancement for ComfyUI and diffusers.

The repository root is both a ComfyUI custom-node pack (ComfyUI reads ``NODE_CLASS_MAPPINGS`` from here)
and the Python package ``comfyui_lowlight``. Importing it must stay cheap: the node classes (and with them torch)
load on first access to the mappings, so ``python -m comfyui_lowlight --help`` and ``from comfyui_lowlight.pipelines
import ...`` never pay for the ComfyUI face. A module ``__getattr__`` also keeps this file importable on its own
(pytest imports a package's ``__init__.py`` while collecting, under the clone's folder name).
"""

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
