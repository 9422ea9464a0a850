"""``python -m comfyui_lowlight ...``: the ``lowlight`` command line (see ``cli/__init__.py``)."""

import sys

from .cli import main

sys.exit(main())
