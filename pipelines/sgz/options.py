"""The SGZ inference parameters, once: type, default, bounds and help text.

Read by :class:`~.pipeline.SGZPipeline`'s input checks, the ComfyUI node's inputs (``nodes/sgz_nodes.py``) and
the ``lowlight enhance`` parser, so the three faces cannot disagree. Bounds are inclusive. Plain Python (no torch):
the command line's ``--help`` reads it.
"""

from __future__ import annotations

from ..parameters import Option

DOWNSCALE = Option(
    "downscale", int, 12, 1, 64, 1,
    "The enhancement factor is estimated on the image shrunk by this much (12 in the paper); larger is faster and "
    "smoother, 1 estimates at full resolution.",
)
RECURRENCES = Option(
    "recurrences", int, 8, 0, 16, 1,
    "How many times the enhancement curve is applied (8 in the paper); more = brighter, 0 = unchanged.",
)
STRENGTH = Option(
    "strength", float, 1.0, 0.0, 4.0, 0.05,
    "Exposure control: scales the enhancement factor. 0 leaves the image unchanged, 1 is the model as trained, "
    "above 1 is brighter.",
)
TEMPORAL_SMOOTHING = Option(
    "temporal_smoothing", float, 0.0, 0.0, 0.99, 0.01,
    "For video frames (in order): deflicker strength. Steadies the enhancement factor and the output brightness "
    "across frames; scene cuts restart it. 0 treats frames independently, 0.8 is a good video setting; higher is "
    "steadier but slower to follow real changes.",
)

DENOISE = Option(
    "denoise", float, 1.0, 0.0, 4.0, 0.05,
    "Noise control (SGZ v2): smooths the noise the curve amplified, as strongly as it amplified it (dark regions "
    "lifted far get the most). 0 = off (plain SGZ), 1 = default, higher = smoother.",
)
AUTO_EXPOSURE = Option(
    "auto_exposure", float, 1.0, 0.0, 1.0, 0.05,
    "Automatic exposure (SGZ v2): fits the brightening to the whole photo (very dark photos lifted far, mid-dark "
    "ones little) and keeps bright regions from clipping. 1 = on, 0 = off (plain SGZ), between = partly. "
    "strength still scales the result.",
)

# In the ComfyUI node's widget order (saved workflows list widget values by position): new options go at the end.
SGZ_OPTIONS = {
    option.name: option
    for option in (RECURRENCES, DOWNSCALE, STRENGTH, TEMPORAL_SMOOTHING, DENOISE, AUTO_EXPOSURE)
}

# The settings that give plain SGZ (the model and curve of the paper, as before v2).
PLAIN_SGZ = {DENOISE.name: 0.0, AUTO_EXPOSURE.name: 0.0}

# What the command line uses for videos (images are unaffected by it).
VIDEO_TEMPORAL_SMOOTHING = 0.8


def check_sgz_options(**values) -> None:
    """Check keyword values against :data:`SGZ_OPTIONS` (``ValueError`` naming the first bad one)."""
    for name, value in values.items():
        SGZ_OPTIONS[name].check(value)
