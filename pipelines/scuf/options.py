"""The SCUF inference parameters, once: type, default, bounds and help text.

Read by :class:`~.pipeline.SCUFPipeline`'s input checks (``__call__``, ``enable_vae_tiling``), the ComfyUI nodes'
inputs (``nodes/scuf_nodes.py``) and the ``lowlight enhance --method scuf`` parser, so the faces cannot disagree.
Bounds are inclusive. Plain Python (no torch): the command line's ``--help`` reads it. Which face exposes what:
``adapter_scale``, ``seed`` and ``sample_latent`` are the node's and the pipeline's (which takes a ``generator``
for the seed); ``tile_size``/``tile_overlap`` the command line's and the pipeline's; ``prompt`` and ``dtype`` all.
"""

from __future__ import annotations

from ..parameters import Option
from .prompts import DEFAULT_PROMPT  # noqa: F401  (the prompt's default; training uses it too)

ADAPTER_SCALE = Option(
    "adapter_scale", float, 1.0, 0.0, 2.0, 0.05,
    "Weight of the illumination image prompt in the cycle attention: 1 = as trained, 0 = text prompt only, above 1 "
    "= the image prompt counts more.",
)
SEED = Option(
    "seed", int, 0, 0, 0xFFFFFFFFFFFFFFFF, 1,
    "Seed of the latent sample; used only when sample_latent is on.",
)
# Pixels, multiples of 8 so that every tile maps to whole latent pixels; 512 is SD-Turbo's native size.
TILE_SIZE = Option(
    "tile_size", int, 512, 64, 8192, 8,
    "Process images larger than this many pixels in overlapping tiles (bounded memory, feathered seams).",
    multiple=8,
)
TILE_OVERLAP = Option(
    "tile_overlap", int, 64, 0, 1024, 8,
    "Pixels shared by neighbouring tiles (blended); less than half of tile_size.",
    multiple=8,
)

SCUF_OPTIONS = {option.name: option for option in (ADAPTER_SCALE, SEED, TILE_SIZE, TILE_OVERLAP)}

PROMPT_HELP = "Text prompt for the one step; the default is the paper's lighten prompt the weights were trained with."

SAMPLE_LATENT = False
SAMPLE_LATENT_HELP = (
    "Off: the VAE posterior mean (deterministic). On: a sample of it, as the official inference code does (varies "
    "with the seed)."
)

#: Weight precisions, reference first (the command line's default; the node adds "auto").
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = DTYPES[0]
DTYPE_HELP = (
    "Weight precision; float32 is the reference. bfloat16 is fast on recent CPUs and GPUs; with float16 the VAE "
    "stays float32 (the SD 2.x VAE overflows in float16)."
)


def check_scuf_options(**values) -> None:
    """Check keyword values against :data:`SCUF_OPTIONS` (``ValueError`` naming the first bad one)."""
    for name, value in values.items():
        SCUF_OPTIONS[name].check(value)


def tiling_problem(tile_size, tile_overlap) -> tuple[Option, str] | None:
    """The first bad tiling parameter and why (``"expected ..., got ..."``), or None when the tiling is usable.

    ``tile_size=None`` means no tiling (the command line's default): only ``tile_overlap`` is checked.
    """
    for option, value in ((TILE_SIZE, tile_size), (TILE_OVERLAP, tile_overlap)):
        problem = None if value is None and option is TILE_SIZE else option.problem(value)
        if problem is not None:
            return option, problem
    if tile_size is not None and 2 * tile_overlap >= tile_size:
        return TILE_OVERLAP, f"expected less than half of tile_size ({tile_size}), got {tile_overlap}"
    return None


def check_tiling_options(tile_size: int, tile_overlap: int) -> None:
    """Raise ``ValueError`` naming the parameter and its allowed range unless the tiling is usable."""
    problem = tiling_problem(tile_size, tile_overlap)
    if problem is not None:
        option, detail = problem
        raise ValueError(f"{option.name}: {detail}")
