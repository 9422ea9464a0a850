"""``python -m comfyui_lowlight ...``: the ``lowlight`` command line (see ``cli.py``)."""

import sys

from .cli import main

sys.exit(main())
