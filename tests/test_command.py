"""The SGZ parameter table (``pipelines/sgz/options.py``) and the faces that read it: the pipeline's checks, the
ComfyUI node's inputs and the ``lowlight enhance`` parser agree on defaults, bounds and errors."""

import inspect

import pytest
import torch

from comfyui_lowlight.cli import build_parser
from comfyui_lowlight.cli import main as lowlight
from comfyui_lowlight.nodes.sgz_nodes import SGZEnhance
from comfyui_lowlight.pipelines.sgz.options import SGZ_OPTIONS, VIDEO_TEMPORAL_SMOOTHING
from comfyui_lowlight.pipelines.sgz.pipeline import SGZPipeline
from comfyui_lowlight.pipelines.sgz.model import EnhancementFactorEstimator

NAMES = list(SGZ_OPTIONS)


def _out_of_range(option):
    """Values just outside the bounds, a wrong type, and (for floats) non-finite values."""
    step = 1 if option.type is int else 0.01
    values = [option.min - step, option.max + step]
    values.append(1.5 if option.type is int else "1")
    if option.type is float:
        values.append(float("nan"))
    return values


def _enhance_parser():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return commands.choices["enhance"]


def test_table_holds_the_paper_defaults_and_chosen_bounds():
    bounds = {name: (o.type, o.default, o.min, o.max) for name, o in SGZ_OPTIONS.items()}
    assert bounds == {
        "recurrences": (int, 8, 0, 16),
        "downscale": (int, 12, 1, 64),
        "strength": (float, 1.0, 0.0, 4.0),
        "temporal_smoothing": (float, 0.0, 0.0, 0.99),
        "denoise": (float, 1.0, 0.0, 4.0),
        "auto_exposure": (float, 1.0, 0.0, 1.0),
    }
    assert all(o.min <= o.default <= o.max and o.help for o in SGZ_OPTIONS.values())
    assert 0 < VIDEO_TEMPORAL_SMOOTHING <= SGZ_OPTIONS["temporal_smoothing"].max


def test_node_inputs_are_the_table():
    sections = SGZEnhance.INPUT_TYPES()
    inputs = {**sections["required"], **sections["optional"]}
    assert list(sections["optional"]) == NAMES  # optional: an API graph saved before an option existed still runs
    # widget order is part of saved workflows: image, weights, then the table in its order
    assert list(inputs) == ["image", "weights", *NAMES]
    # execute passes the table's values to the pipeline by name: every table entry is an input, none is dropped
    assert set(inspect.signature(SGZEnhance.execute).parameters) == {"image", "weights", "options"}
    for name, option in SGZ_OPTIONS.items():
        kind, spec = inputs[name]
        assert kind == ("INT" if option.type is int else "FLOAT")
        assert (spec["default"], spec["min"], spec["max"], spec["tooltip"]) == (
            option.default, option.min, option.max, option.help)


def test_pipeline_defaults_are_the_table():
    parameters = inspect.signature(SGZPipeline.__call__).parameters
    assert {name: parameters[name].default for name in NAMES} == {n: o.default for n, o in SGZ_OPTIONS.items()}


def test_cli_defaults_and_help_are_the_table():
    parser = _enhance_parser()
    for name, option in SGZ_OPTIONS.items():
        action = next(a for a in parser._actions if option.flag in a.option_strings)
        assert option.flag in action.option_strings and option.help in action.help
        assert f"{option.min:g}..{option.max:g}" in action.help
        expected = VIDEO_TEMPORAL_SMOOTHING if name == "temporal_smoothing" else option.default
        assert action.default == expected and action.type is option.type


@pytest.mark.parametrize("name", NAMES)
def test_every_face_accepts_the_bounds_and_rejects_beyond_them(name, capsys):
    option = SGZ_OPTIONS[name]
    pipe = SGZPipeline(EnhancementFactorEstimator())
    image = torch.rand(1, 3, 8, 8)
    for value in (option.min, option.max):
        assert pipe(image, **{name: value}).shape == image.shape
    for value in _out_of_range(option):
        with pytest.raises(ValueError) as pipeline_error:
            pipe(image, **{name: value})
        message = str(pipeline_error.value)
        assert message.startswith(f"{name}: ") and f"{option.min:g}..{option.max:g}" in message
        if isinstance(value, str):
            continue
        with pytest.raises(SystemExit) as usage_error:  # the parser rejects what the pipeline rejects
            lowlight(["enhance", "in.png", "-o", "out", option.flag, str(value)])
        assert usage_error.value.code == 2
        assert option.flag in capsys.readouterr().err
    # the node's widget bounds are the pipeline's: ComfyUI refuses values outside them before the node runs
    spec = SGZEnhance.INPUT_TYPES()["optional"][name][1]
    assert (spec["min"], spec["max"]) == (option.min, option.max)


def test_convert_scuf_directions_are_the_converters():
    from comfyui_lowlight.cli.convert_scuf import DIRECTIONS
    from comfyui_lowlight.pipelines.scuf.weights import OFFICIAL_VAE_PREFIX

    assert sorted(DIRECTIONS) == sorted(OFFICIAL_VAE_PREFIX)


@pytest.mark.parametrize("arguments, message", [
    (["--method", "scuf", "--base", "sd", "--strength", "2"], "--strength is an option of --method sgz"),
    (["--method", "scuf", "--base", "sd", "--no-temporal-smoothing"],
     "--temporal-smoothing is an option of --method sgz"),
    (["--prompt", "a photo"], "--prompt is an option of --method scuf"),
    (["--method", "scuf"], "--method scuf needs --base"),
    (["--method", "scuf", "--base", "sd", "--device", "cuda:1"], "--device"),
])
def test_enhance_refuses_options_of_the_other_method(arguments, message, capsys):
    with pytest.raises(SystemExit) as usage_error:
        lowlight(["enhance", "in.png", "-o", "out", *arguments])
    assert usage_error.value.code == 2 and message in capsys.readouterr().err


def test_scuf_training_errors_exit_2_without_a_traceback(tmp_path, capsys):
    code = lowlight(["train", "scuf", "caption", "--low", str(tmp_path / "none"), "--normal", str(tmp_path),
                     "--output", str(tmp_path / "captions.json")])
    assert code == 2 and "none" in capsys.readouterr().err
