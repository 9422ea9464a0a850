import subprocess
import sys


def test_import_is_cheap_and_exports_node_mappings():
    code = (
        "import sys, comfyui_lowlight as p;"
        "assert isinstance(p.NODE_CLASS_MAPPINGS, dict);"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
