"""Reading weights files safely, for both methods: safetensors, foreign pickles, and the tensors' own content.

- :func:`open_safetensors`: ``safe_open`` that says "not a valid safetensors file: PATH" instead of a bare
  ``SafetensorError``;
- :func:`torch_load_weights`: ``torch.load(weights_only=True)`` whose refusals are our own message (the file, that
  it holds code, what was blocked), never torch's advice to turn the check off;
- :func:`check_weight_tensors`: refuse integer/bool tensors and NaN/inf values (a diverged run), naming the tensor.

All raise :class:`WeightsFileError` (a ``ValueError``): the file itself is unusable, whatever model it is meant for.
"""

from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLOAT_NAMES = ", ".join(str(dtype).replace("torch.", "") for dtype in FLOAT_DTYPES)
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class WeightsFileError(ValueError):
    """A weights file that cannot be used in itself: not a valid file, code inside, or non-float/non-finite tensors."""


@contextmanager
def open_safetensors(path, device="cpu", error: type[WeightsFileError] = WeightsFileError):
    """``safetensors.safe_open(path, "pt", device)``; a file that is not safetensors raises ``error``.

    ``error``: :class:`WeightsFileError` or a method's subclass of it (so do the other helpers).
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt", device=str(device))
    except SafetensorError as exc:
        raise error(f"not a valid safetensors file: {path} ({exc})") from None
    with handle as reader:
        yield reader


def _unpickler_detail(message: str) -> str:
    """What torch's weights-only unpickler stopped at, without its preamble (which suggests weights_only=False)."""
    kept = [
        line.strip() for line in message.splitlines()
        if line.strip() and "weights_only" not in line and "Weights only load failed" not in line
        and not line.startswith("Check the documentation")
    ]
    return " ".join(kept) or "an object the safe loader does not accept"


def torch_load_weights(path, map_location="cpu", error: type[WeightsFileError] = WeightsFileError):
    """``torch.load(path, map_location, weights_only=True)``: plain tensors and containers, never executing code.

    A pickle that needs anything else (e.g. calls ``os.system`` through ``__reduce__``) raises
    :class:`WeightsFileError` naming the file and the blocked global; nothing from the file runs.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        blocked = _BLOCKED_GLOBAL.search(detail)
        if blocked:
            reason = (f"it contains code: the pickle calls {blocked.group(1)} when loaded, which was blocked "
                      f"and not run ({detail})")
        else:
            reason = f"it is not a plain checkpoint of tensors (it may contain code, or be corrupt); blocked: {detail}"
        raise error(
            f"{path}: refused to load: {reason}. Only plain state dicts of tensors are read (torch.load with "
            "weights_only=True); use a .safetensors file or one saved with torch.save(model.state_dict())."
        ) from None
    except Exception as exc:  # arbitrary bytes make the unpickler fail in any way (IndexError, KeyError, ...)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{path}: not a readable PyTorch checkpoint ({first})") from exc


def check_weight_tensors(path, tensors, error: type[WeightsFileError] = WeightsFileError) -> None:
    """Refuse non-float tensors and NaN/inf values in ``tensors`` (``{name: tensor}``) read from ``path``."""
    path = os.fspath(path)
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise error(
                f"{path}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; weights must be "
                f"floating point ({_FLOAT_NAMES})"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise error(
                f"{path}: tensor {name!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; these weights are "
                "broken (e.g. saved from a diverged training run)"
            )
