"""The two methods' cores, shared by every face (ComfyUI nodes, the ``lowlight`` command, Python users).

- ``sgz/``: SGZ (model, losses, segmentation net, pipeline, parameter table, trainer);
- ``scuf/``: SCUF (modules, weights, pipeline, tiling, training losses and trainer, CLIP image encoder, captions,
  RetinexNet, prompts, folder batch, shipped SD-Turbo configs);
- ``media/``: what both use (image and video files, in-memory conversions, atomic writes, illumination maps);
- ``parameters.py``: the ``Option`` type of both methods' parameter tables (``sgz/options.py``, ``scuf/options.py``);
- ``weights_files.py``: the checks every weights loader shares (refused pickles, invalid safetensors, NaN/integer tensors).

Layers: ``media``, ``parameters`` and ``weights_files`` import nothing of ours; ``sgz`` and ``scuf`` import them, never each other;
faces import these.

Public names are resolved lazily so that ``import comfyui_lowlight`` never pulls in diffusers or transformers.
"""

import importlib

_LAZY = {
    "SGZPipeline": ".sgz.pipeline",
    "SCUFPipeline": ".scuf.pipeline",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
