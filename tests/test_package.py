import subprocess
import sys


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
