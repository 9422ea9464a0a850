"""Plain-torch cores shared by the nodes, the CLI and the training scripts.

Public names are resolved lazily so that ``import comfyui_lowlight`` never pulls in diffusers or transformers.
"""

import importlib

_LAZY = {
    "SGZPipeline": ".sgz_pipeline",
    "SCUFPipeline": ".scuf_pipeline",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
