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


# ------------------------------------------------------------------------------------ comfy_api.latest stand-in


def _pruned(values: dict) -> dict:
    return {key: value for key, value in values.items() if value is not None}


class _StubInput:
    """``io.<Type>.Input``: the id, where it goes (required/optional), and the widget options as ``as_dict`` gives
    them in ComfyUI (``tooltip``, ``default``, ``min``, ``max``, ``step``, ``options``, ``multiline``, ...)."""

    io_type = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, options=None, **widget):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.options = list(options) if options is not None else None
        self.widget = widget

    def as_dict(self) -> dict:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip, "options": self.options,
                        **self.widget})

    def get_io_type(self) -> str:
        return self.io_type


class _StubOutput:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name or id, tooltip, is_output_list

    def get_io_type(self) -> str:
        return self.io_type


def _stub_type(io_type: str) -> type:
    """``io.Image``, ``io.Int``, ``io.Custom("X")``...: a class with ``io_type`` and its ``Input``/``Output``."""
    input_class = type("Input", (_StubInput,), {"io_type": io_type})
    output_class = type("Output", (_StubOutput,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": input_class, "Output": output_class})


def _make_comfy_api_stub() -> types.ModuleType:
    """A stand-in for ComfyUI's ``comfy_api.latest`` with the parts the pack's nodes use (same names, signatures
    and V1 views), so the node classes import and run outside ComfyUI. The real server tests use the real one."""
    import abc
    import dataclasses

    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in (("Image", "IMAGE"), ("Mask", "MASK"), ("Int", "INT"), ("Float", "FLOAT"),
                          ("String", "STRING"), ("Boolean", "BOOLEAN"), ("Combo", "COMBO"), ("Video", "VIDEO"),
                          ("Audio", "AUDIO"), ("Latent", "LATENT")):
        setattr(io, name, _stub_type(io_type))
    io.Custom = _stub_type

    @dataclasses.dataclass
    class Schema:
        node_id: str
        display_name: str = None
        category: str = "sd"
        inputs: list = dataclasses.field(default_factory=list)
        outputs: list = dataclasses.field(default_factory=list)
        hidden: list = dataclasses.field(default_factory=list)
        description: str = ""
        search_aliases: list = dataclasses.field(default_factory=list)
        is_output_node: bool = False
        is_experimental: bool = False
        is_deprecated: bool = False
        not_idempotent: bool = False

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    class ComfyNode:
        @classmethod
        def define_schema(cls):
            raise NotImplementedError

        @classmethod
        def execute(cls, **kwargs):
            raise NotImplementedError

        @classmethod
        def fingerprint_inputs(cls, **kwargs):
            raise NotImplementedError

        @classmethod
        def INPUT_TYPES(cls) -> dict:  # noqa: N802  (ComfyUI's V1 view of the schema)
            sections: dict = {}
            for item in cls.define_schema().inputs:
                sections.setdefault("optional" if item.optional else "required", {})[item.id] = (
                    item.get_io_type(), item.as_dict())
            return sections

    class ComfyExtension(abc.ABC):
        async def on_load(self) -> None:
            pass

        @abc.abstractmethod
        async def get_node_list(self) -> list:
            ...

    io.Schema, io.NodeOutput, io.ComfyNode, io.ComfyExtension = Schema, NodeOutput, ComfyNode, ComfyExtension
    class VideoFromFile:  # comfy_api.latest.InputImpl.VideoFromFile: a VIDEO backed by a file
        def __init__(self, file):
            self.file = file

        def get_stream_source(self):
            return self.file

    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    latest.InputImpl = types.SimpleNamespace(VideoFromFile=VideoFromFile)
    latest.__comfyui_lowlight_stub__ = True
    return latest


def install_comfy_api() -> bool:
    """Make ``comfy_api.latest`` importable for the node classes: ComfyUI's own when it is on the path, else the
    stand-in above. Returns True when the stand-in was installed."""
    try:
        import comfy_api.latest  # noqa: F401
        return False
    except ImportError:
        pass
    latest = _make_comfy_api_stub()
    package = types.ModuleType("comfy_api")
    package.__path__ = []
    package.latest = latest
    sys.modules["comfy_api"], sys.modules["comfy_api.latest"] = package, latest
    return True


def node_outputs(result) -> tuple:
    """A node's ``execute`` result (``io.NodeOutput``) as the tuple of its outputs."""
    return tuple(result.args)


def schema_inputs(node_class) -> dict:
    """``{input id: Input}`` of a V3 node class, in schema order."""
    return {item.id: item for item in node_class.define_schema().inputs}
