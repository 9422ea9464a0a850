"""One inference parameter, described once: type, default, inclusive bounds, widget step and help text.

Each method lists its parameters as :class:`Option` values (``sgz/options.py``, ``scuf/options.py``); the
pipeline's checks, the ComfyUI node's inputs and the command-line parser read them, so the faces cannot disagree.
Plain Python (no torch): the command line's ``--help`` reads it. Imports nothing else of ours.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Union

Number = Union[int, float]


@dataclass(frozen=True)
class Option:
    """One inference parameter as every face shows it: a pipeline check, a ComfyUI widget, a command-line flag."""

    name: str
    type: type  # int or float
    default: Number
    min: Number
    max: Number
    step: Number  # the ComfyUI widget's step
    help: str
    multiple: int = 1  # integers only: the value must be a multiple of this

    @property
    def flag(self) -> str:
        """The command-line spelling, e.g. ``--tile-size``."""
        return "--" + self.name.replace("_", "-")

    @property
    def expected(self) -> str:
        kind = "an integer" if self.type is int else "a number"
        if self.multiple > 1:
            kind = f"a multiple of {self.multiple}"
        return f"{kind} in {self.min:g}..{self.max:g}"

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed (``"expected ..., got ..."``), or None when it is."""
        if self.type is int:
            valid = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value % self.multiple == 0
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
