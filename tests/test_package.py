import subprocess
import sys

import pytest


def test_import_and_node_listing_stay_cheap():
    """ComfyUI imports every pack at start, calls its entrypoint and asks each node for its schema: none of that may
    pull in diffusers. There is no NODE_CLASS_MAPPINGS, or ComfyUI would take the V1 path instead of the entrypoint."""
    from pathlib import Path

    code = (
        "import asyncio, sys; sys.path.insert(0, sys.argv[1]);"
        "import comfyui_lowlight as p;"
        "assert not hasattr(p, 'NODE_CLASS_MAPPINGS');"
        "assert 'torch' not in sys.modules, 'importing the pack imported torch';"
        "from comfy_stubs import install_comfy_api; install_comfy_api();"
        "nodes = asyncio.run(asyncio.run(p.comfy_entrypoint()).get_node_list());"
        "assert nodes, 'no nodes listed';"
        "[cls.define_schema() for cls in nodes];"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], check=True)


@pytest.mark.parametrize("command", [[], ["enhance"], ["train"], ["train", "sgz"], ["train", "scuf"],
                                     ["train", "scuf", "caption"], ["convert-scuf"]], ids=" ".join)
def test_command_line_help_does_not_import_torch(command):
    """``lowlight [SUBCOMMAND] --help`` must answer at once: nothing heavy is imported before a subcommand runs."""
    code = (
        f"import sys, runpy; sys.argv = ['lowlight', *{command!r}, '--help'];\n"
        "try:\n    runpy.run_module('comfyui_lowlight', run_name='__main__')\n"
        "except SystemExit as done:\n    assert done.code == 0, done.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: lowlight {' '.join(command)}".rstrip())


def test_pack_init_imports_outside_its_package(tmp_path):
    """pytest imports the repository's ``__init__.py`` under the clone's folder name (``comfyui-lowlight``, not a
    valid package name) while collecting; it must not fail there, or every test of a fresh clone errors."""
    import importlib.util
    from pathlib import Path

    init = Path(__file__).resolve().parents[1] / "__init__.py"
    spec = importlib.util.spec_from_file_location("comfyui-lowlight", init)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert getattr(module, "setup_module", None) is None
