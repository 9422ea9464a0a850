import subprocess
import sys

import pytest


def test_import_and_node_listing_stay_cheap():
    """ComfyUI imports every pack at start and asks each node for its inputs: neither may pull in diffusers."""
    code = (
        "import sys, comfyui_lowlight as p;"
        "assert p.NODE_CLASS_MAPPINGS, 'no nodes exported';"
        "[cls.INPUT_TYPES() for cls in p.NODE_CLASS_MAPPINGS.values()];"
        "heavy = [m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
