"""The SGZ inference parameters, once: type, default, bounds and help text.

Read by :class:`~.sgz_pipeline.SGZPipeline`'s input checks, the ComfyUI node's inputs (``nodes/sgz_nodes.py``) and
the ``lowlight enhance`` parser, so the three faces cannot disagree. Bounds are inclusive. Plain Python (no torch):
the command line's ``--help`` reads it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Union

Number = Union[int, float]


@dataclass(frozen=True)
class SGZOption:
    name: str
    type: type  # int or float
    default: Number
    min: Number
    max: Number
    step: Number  # the ComfyUI widget's step
    help: str

    @property
    def flag(self) -> str:
        """The command-line spelling, e.g. ``--temporal-smoothing``."""
        return "--" + self.name.replace("_", "-")

    @property
    def expected(self) -> str:
        kind = "an integer" if self.type is int else "a number"
        return f"{kind} in {self.min:g}..{self.max:g}"

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed (``"expected ..., got ..."``), or None when it is."""
        if self.type is int:
            valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if valid and self.min <= value <= self.max:
            return None
        return f"expected {self.expected}, got {value!r}"

    def check(self, value) -> None:
        """Raise ``ValueError`` naming the parameter and its allowed range when ``value`` is out of it."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{self.name}: {problem}")


DOWNSCALE = SGZOption(
    "downscale", int, 12, 1, 64, 1,
    "The enhancement factor is estimated on the image shrunk by this much (12 in the paper); larger is faster and "
    "smoother, 1 estimates at full resolution.",
)
RECURRENCES = SGZOption(
    "recurrences", int, 8, 0, 16, 1,
    "How many times the enhancement curve is applied (8 in the paper); more = brighter, 0 = unchanged.",
)
STRENGTH = SGZOption(
    "strength", float, 1.0, 0.0, 4.0, 0.05,
    "Exposure control: scales the enhancement factor. 0 leaves the image unchanged, 1 is the model as trained, "
    "above 1 is brighter.",
)
TEMPORAL_SMOOTHING = SGZOption(
    "temporal_smoothing", float, 0.0, 0.0, 0.99, 0.01,
    "For video frames (in order): deflicker strength. Steadies the enhancement factor and the output brightness "
    "across frames; scene cuts restart it. 0 treats frames independently, 0.8 is a good video setting; higher is "
    "steadier but slower to follow real changes.",
)

# In the ComfyUI node's widget order (saved workflows list widget values by position).
SGZ_OPTIONS = {option.name: option for option in (RECURRENCES, DOWNSCALE, STRENGTH, TEMPORAL_SMOOTHING)}

# What the command line uses for videos (images are unaffected by it).
VIDEO_TEMPORAL_SMOOTHING = 0.8


def check_sgz_options(**values) -> None:
    """Check keyword values against :data:`SGZ_OPTIONS` (``ValueError`` naming the first bad one)."""
    for name, value in values.items():
        SGZ_OPTIONS[name].check(value)
