"""The SCUF parameter table (``pipelines/scuf/options.py``) and the faces that read it: the pipeline's checks, the
ComfyUI nodes' inputs and the ``lowlight enhance --method scuf`` parser agree on defaults, bounds and errors."""

import inspect

import pytest
import torch

from comfy_stubs import install_comfy_stubs
from comfyui_lowlight.cli import build_parser
from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.cli.enhance import _validate
from comfyui_lowlight.nodes import model_folders, scuf_nodes
from comfyui_lowlight.nodes.scuf_nodes import SCUFAdapterLoader, SCUFLighten, SCUFLoadSDTurbo
from comfyui_lowlight.pipelines.scuf import tiling
from comfyui_lowlight.pipelines.scuf.options import (
    ADAPTER_SCALE,
    DEFAULT_DTYPE,
    DEFAULT_PROMPT,
    DTYPE_HELP,
    DTYPES,
    PROMPT_HELP,
    SAMPLE_LATENT,
    SAMPLE_LATENT_HELP,
    SCUF_OPTIONS,
    SEED,
    TILE_OVERLAP,
    TILE_SIZE,
)
from comfyui_lowlight.pipelines.scuf.pipeline import SCUFPipeline
from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)

SCUF_ARGUMENTS = ["enhance", "in.png", "-o", "out", "--method", "scuf", "--base", "sd"]


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """Stub ComfyUI model folders, so that the nodes can list their inputs."""
    stubs = install_comfy_stubs(monkeypatch, tmp_path, folders=("diffusers", "checkpoints", "clip_vision"))
    model_folders.register_model_folders()
    (tmp_path / "scuf").mkdir()
    return stubs


@pytest.fixture(scope="module")
def pipe(tiny_scuf):  # noqa: F811
    return tiny_scuf.pipeline("official")


def _enhance_parser():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return commands.choices["enhance"]


def _action(flag):
    return next(a for a in _enhance_parser()._actions if flag in a.option_strings)


def test_table_holds_the_defaults_and_chosen_bounds():
    bounds = {name: (o.type, o.default, o.min, o.max, o.multiple) for name, o in SCUF_OPTIONS.items()}
    assert bounds == {
        "adapter_scale": (float, 1.0, 0.0, 2.0, 1),
        "seed": (int, 0, 0, 2**64 - 1, 1),
        "tile_size": (int, 512, 64, 8192, 8),
        "tile_overlap": (int, 64, 0, 1024, 8),
    }
    assert all(o.min <= o.default <= o.max and o.help for o in SCUF_OPTIONS.values())
    assert 2 * TILE_OVERLAP.default < TILE_SIZE.default
    # the low-level tiler's own defaults are the table's
    assert (tiling.DEFAULT_TILE_SIZE, tiling.DEFAULT_TILE_OVERLAP) == (TILE_SIZE.default, TILE_OVERLAP.default)
    assert DTYPES == ("float32", "bfloat16", "float16") and DEFAULT_DTYPE == "float32" and SAMPLE_LATENT is False


def test_node_inputs_are_the_table(comfy):
    loader = SCUFAdapterLoader.INPUT_TYPES()["required"]
    lighten = SCUFLighten.INPUT_TYPES()["required"]
    # widget order is part of saved workflows
    assert list(loader) == ["scuf_pipe", "scuf_weights", "adapter_scale"]
    assert list(lighten) == ["scuf_pipe", "image", "prompt", "seed", "sample_latent"]
    for inputs, option in ((loader, ADAPTER_SCALE), (lighten, SEED)):
        kind, spec = inputs[option.name]
        assert kind == ("INT" if option.type is int else "FLOAT")
        assert (spec["default"], spec["min"], spec["max"], spec["step"], spec["tooltip"]) == (
            option.default, option.min, option.max, option.step, option.help)
    assert (lighten["prompt"][1]["default"], lighten["prompt"][1]["tooltip"]) == (DEFAULT_PROMPT, PROMPT_HELP)
    assert (lighten["sample_latent"][1]["default"], lighten["sample_latent"][1]["tooltip"]) == (
        SAMPLE_LATENT, SAMPLE_LATENT_HELP)
    dtype = SCUFLoadSDTurbo.INPUT_TYPES()["required"]["dtype"]
    assert dtype[1]["options"] == ["auto", *DTYPES] and DTYPE_HELP in dtype[1]["tooltip"]
    assert list(scuf_nodes.DTYPES) == list(DTYPES)
    assert all(scuf_nodes.DTYPES[name] == getattr(torch, name) for name in DTYPES)


def test_pipeline_defaults_are_the_table():
    call = inspect.signature(SCUFPipeline.__call__).parameters
    assert call["adapter_scale"].default == ADAPTER_SCALE.default
    assert call["sample_latent"].default == SAMPLE_LATENT
    assert call["prompt"].default is None  # None = DEFAULT_PROMPT, as the command line's --prompt
    tiled = inspect.signature(SCUFPipeline.enable_vae_tiling).parameters
    assert (tiled["tile_size"].default, tiled["tile_overlap"].default) == (TILE_SIZE.default, TILE_OVERLAP.default)


def test_cli_defaults_and_help_are_the_table():
    dtype = _action("--dtype")
    assert tuple(dtype.choices) == DTYPES and dtype.default == DEFAULT_DTYPE and DTYPE_HELP in dtype.help
    assert _action("--prompt").default is None and PROMPT_HELP in _action("--prompt").help
    for option in (TILE_SIZE, TILE_OVERLAP):
        action = _action(option.flag)
        assert option.help in action.help and f"{option.min}..{option.max}" in action.help
        assert action.type is option.type
    assert _action(TILE_SIZE.flag).default is None  # no tiling unless asked
    assert _action(TILE_OVERLAP.flag).default == TILE_OVERLAP.default


def _rejected(option):
    step = option.multiple if option.type is int else 0.01
    values = [option.min - step, option.max + step]
    if option.type is int and option.multiple > 1:
        values.append(option.min + option.multiple // 2)  # in range, not a multiple
    values.append(1.5 if option.type is int else "1")
    if option.type is float:
        values.append(float("nan"))
    return values


def test_adapter_scale_bounds_in_pipeline_and_node(pipe, tiny_scuf):  # noqa: F811
    image = tiny_scuf.image("img64x64")
    for value in (ADAPTER_SCALE.min, ADAPTER_SCALE.max):
        assert pipe(image, adapter_scale=value, output_type="pt").images.shape == (1, 3, 64, 64)
    for value in _rejected(ADAPTER_SCALE):
        for face in (lambda: pipe(image, adapter_scale=value), lambda: SCUFAdapterLoader.execute(scuf_pipe=None, scuf_weights="x", adapter_scale=value)):
            with pytest.raises(ValueError) as error:
                face()
            assert str(error.value).startswith("adapter_scale: ") and "0..2" in str(error.value)
    # the node's widget bounds are the pipeline's: ComfyUI refuses values outside them before the node runs
    assert (ADAPTER_SCALE.min, ADAPTER_SCALE.max) == (0.0, 2.0)


@pytest.mark.parametrize("option", [TILE_SIZE, TILE_OVERLAP], ids=lambda o: o.name)
def test_tiling_bounds_in_pipeline_and_cli(pipe, option, capsys):
    other = TILE_OVERLAP if option is TILE_SIZE else TILE_SIZE
    for value in (option.min, option.max):
        # the other parameter at a value that keeps overlap < tile_size / 2
        partner = other.min if option is TILE_SIZE else other.max
        pipe.enable_vae_tiling(**{option.name: value, other.name: partner})
        pipe.disable_vae_tiling()
        parser = _enhance_parser()
        args = parser.parse_args([*SCUF_ARGUMENTS[1:], option.flag, str(value), other.flag, str(partner)])
        _validate(args, parser)  # accepted (exits 2 otherwise)
    for value in _rejected(option):
        partner = other.default
        with pytest.raises(ValueError) as error:
            pipe.enable_vae_tiling(**{option.name: value, other.name: partner})
        message = str(error.value)
        assert message.startswith(f"{option.name}: ") and f"{option.min}..{option.max}" in message
        if isinstance(value, float):
            continue  # argparse's type=int refuses it already
        with pytest.raises(SystemExit) as usage_error:  # the parser rejects what the pipeline rejects
            lowlight([*SCUF_ARGUMENTS, option.flag, str(value), other.flag, str(partner)])
        assert usage_error.value.code == 2
        assert f"{option.flag}: " in capsys.readouterr().err
    assert pipe._tiling is None  # a refused tiling leaves the pipeline untiled


def test_overlap_must_stay_below_half_the_tile(pipe, capsys):
    with pytest.raises(ValueError, match="tile_overlap: expected less than half of tile_size"):
        pipe.enable_vae_tiling(128, 64)
    with pytest.raises(SystemExit) as usage_error:
        lowlight([*SCUF_ARGUMENTS, "--tile-size", "128", "--tile-overlap", "64"])
    assert usage_error.value.code == 2 and "--tile-overlap: expected less than half" in capsys.readouterr().err
    pipe.enable_vae_tiling(128, 56)
    pipe.disable_vae_tiling()
