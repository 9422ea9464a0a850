"""Stub ``comfy.model_management``, ``comfy.utils`` and ``folder_paths`` for testing node classes outside ComfyUI.

Fast unit tests of the nodes use these; the real server is in comfy_host.py.
"""

import sys
import types
from pathlib import Path

import torch


class StubProgressBar:
    """``comfy.utils.ProgressBar``: records ``total`` and how far ``update`` got; ``instances`` keeps every bar."""

    instances: list = []

    def __init__(self, total):
        self.total, self.current = total, 0
        StubProgressBar.instances.append(self)

    def update(self, value):
        self.current += value


def install_comfy_stubs(monkeypatch, models_dir: Path, folders=(), **model_management_extra) -> types.SimpleNamespace:
    """Put stub ComfyUI modules into ``sys.modules`` for the test (undone by ``monkeypatch``).

    ``models_dir`` becomes ``folder_paths.models_dir``; each name in ``folders`` is pre-registered as
    ``models_dir/<name>`` (created). ``model_management_extra`` adds or overrides ``comfy.model_management``
    functions. The interrupt check counts its calls in ``calls["interrupt_checks"]`` and raises
    ``RuntimeError("interrupted")`` once more than ``calls["interrupt_after"]`` checks happened (None = never).
    Returns a namespace with ``calls``, ``folder_paths``, ``model_management`` and ``models_dir``.
    """
    calls = {"interrupt_checks": 0, "interrupt_after": None}

    def throw_exception_if_processing_interrupted():
        calls["interrupt_checks"] += 1
        if calls["interrupt_after"] is not None and calls["interrupt_checks"] > calls["interrupt_after"]:
            raise RuntimeError("interrupted")

    model_management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        **model_management_extra,
    )
    utils = types.SimpleNamespace(ProgressBar=StubProgressBar)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = model_management, utils

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(models_dir)
    folder_paths.folder_names_and_paths = {}
    for name in folders:
        (Path(models_dir) / name).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[name] = ([str(Path(models_dir) / name)], set())

    def get_filename_list(name):
        return sorted(p.name for d in folder_paths.folder_names_and_paths[name][0] for p in Path(d).glob("*"))

    def get_full_path(name, filename):
        for folder in folder_paths.folder_names_and_paths[name][0]:
            if (Path(folder) / filename).is_file():
                return str(Path(folder) / filename)
        return None

    folder_paths.get_filename_list, folder_paths.get_full_path = get_filename_list, get_full_path
    for module_name, module in {"comfy": comfy, "comfy.model_management": model_management, "comfy.utils": utils,
                                "folder_paths": folder_paths}.items():
        monkeypatch.setitem(sys.modules, module_name, module)
    StubProgressBar.instances.clear()
    return types.SimpleNamespace(calls=calls, folder_paths=folder_paths, model_management=model_management,
                                 models_dir=Path(models_dir))
