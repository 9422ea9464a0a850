"""Node classes outside ComfyUI, with stub ``comfy`` / ``folder_paths`` modules (fast; the real server is in
test_comfy_server.py). Runs on the shipped weights and images the repository has or the tests make: no ``../shared``.
"""

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_lowlight.nodes import model_folders, node_classes, sgz_nodes
from comfyui_lowlight.nodes.illumination_nodes import IlluminationPrompt
from comfyui_lowlight.nodes.sgz_nodes import SGZEnhance
from comfyui_lowlight.pipelines.sgz.model import load_sgz_weights
from comfy_stubs import StubProgressBar, install_comfy_stubs, node_outputs, schema_inputs
from media import SHIPPED_SGZ_WEIGHTS, V1_SGZ_WEIGHTS, dark_scene, sample_night

SHIPPED_CHOICE = "lora_weights/sgz_lowlight.safetensors"


@pytest.fixture
def comfy_stubs(monkeypatch, tmp_path):
    """Stub ComfyUI modules with ``folder_paths.models_dir = tmp_path``."""
    return install_comfy_stubs(monkeypatch, tmp_path)


def _comfy_image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)


@pytest.fixture
def night_frames():
    """Three small low-light frames (the bundled night photo, two synthetic night scenes), ComfyUI IMAGE
    ``[3, 48, 72, 3]`` float32 0..1, mean about 0.06."""
    photo = np.asarray(Image.fromarray(sample_night()).resize((72, 48), Image.Resampling.LANCZOS))
    return torch.stack([_comfy_image(photo), _comfy_image(dark_scene(48, 72, 1)), _comfy_image(dark_scene(48, 72, 2))])


@pytest.fixture
def pth_in_models(comfy_stubs):
    """A user's ``.pth`` checkpoint (a plain state dict, the official format) in ``models/sgz``: the shipped weights."""
    model_folders.register_model_folders()
    sgz_dir = comfy_stubs.models_dir / "sgz"
    sgz_dir.mkdir()
    torch.save(load_sgz_weights(SHIPPED_SGZ_WEIGHTS).state_dict(), sgz_dir / "my_sgz.pth")
    sgz_nodes._PIPELINE_CACHE.clear()
    return "my_sgz.pth"


def enhance(image, weights=SHIPPED_CHOICE, recurrences=8, downscale=12, strength=1.0, temporal_smoothing=0.0):
    """SGZ Enhance run as ComfyUI runs it (``execute`` with keyword inputs); returns ``(image, factor)``."""
    return node_outputs(SGZEnhance.execute(image=image, weights=weights, recurrences=recurrences, downscale=downscale,
                                           strength=strength, temporal_smoothing=temporal_smoothing))


def test_every_node_is_documented_and_categorised():
    schemas = [cls.define_schema() for cls in node_classes()]
    ids = [schema.node_id for schema in schemas]
    assert ids[:1] == ["LowLightSGZEnhance"] and len(set(ids)) == len(ids)
    assert {"LowLightIlluminationPrompt", "LowLightSCUFLoadSDTurbo", "LowLightSCUFAdapterLoader",
            "LowLightSCUFLighten"} <= set(ids)  # the released ids: saved workflows name them
    for schema in schemas:
        name = schema.node_id
        assert name.startswith("LowLight") and schema.display_name, name
        assert schema.description.strip(), name
        assert schema.category == "image/lowlight", name
        assert schema.outputs and all(output.tooltip.strip() for output in schema.outputs), name
        for item in schema.inputs:
            assert item.tooltip.strip(), f"{name}.{item.id} has no tooltip"


def test_empty_image_batch_says_what_to_do_in_one_line(comfy_stubs):
    from comfyui_lowlight.nodes.scuf_nodes import SCUFLighten

    def lighten(empty):  # refused before the (absent) model is touched
        return SCUFLighten.execute(scuf_pipe=None, image=empty, prompt="", seed=0, sample_latent=False)

    for run in (lambda empty: enhance(empty), lambda empty: IlluminationPrompt.execute(image=empty), lighten):
        with pytest.raises(ValueError) as refused:
            run(torch.zeros(0, 48, 72, 3))
        message = str(refused.value)
        assert "\n" not in message and "empty" in message and "at least one image" in message, message


def test_illumination_prompt_maps_and_masks():
    image = torch.rand(2, 5, 7, 4)  # RGBA: alpha must not count as a colour
    image[..., 3] = 1.0
    value_image, value_mask, inverse_image, inverse_mask = node_outputs(IlluminationPrompt.execute(image=image))
    expected = image[..., :3].amax(dim=-1)
    assert value_image.shape == inverse_image.shape == (2, 5, 7, 3)
    assert value_mask.shape == inverse_mask.shape == (2, 5, 7)
    torch.testing.assert_close(value_mask, expected)
    torch.testing.assert_close(inverse_mask, 1.0 - expected)
    torch.testing.assert_close(value_image, expected[..., None].expand(-1, -1, -1, 3))
    torch.testing.assert_close(inverse_image[..., 1], 1.0 - expected)
    assert value_image.dtype == torch.float32 and value_image.device.type == "cpu"


def test_illumination_prompt_rejects_non_images():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        IlluminationPrompt.execute(image=torch.rand(5, 7, 3))


def test_model_folders_keep_extra_model_paths_entries(comfy_stubs, tmp_path):
    yaml_dir = str(tmp_path / "from_yaml")
    comfy_stubs.folder_paths.folder_names_and_paths["sgz"] = ([yaml_dir], set())  # what a yaml `sgz:` line makes
    assert model_folders.register_model_folders()
    sgz_paths, sgz_ext = comfy_stubs.folder_paths.folder_names_and_paths["sgz"]
    assert sgz_paths == [yaml_dir, str(tmp_path / "sgz")]
    assert {".safetensors", ".pth"} <= sgz_ext
    scuf_paths, _ = comfy_stubs.folder_paths.folder_names_and_paths["scuf"]
    assert scuf_paths == [str(tmp_path / "scuf")]
    model_folders.register_model_folders()  # idempotent (ComfyUI may import the pack twice)
    assert comfy_stubs.folder_paths.folder_names_and_paths["sgz"][0] == [yaml_dir, str(tmp_path / "sgz")]


def test_weight_choices_and_resolution(pth_in_models, comfy_stubs):
    choices = schema_inputs(SGZEnhance)["weights"].options
    assert choices[0] == "lora_weights/sgz_lowlight.safetensors"
    assert pth_in_models in choices
    resolved = model_folders.resolve_weights("sgz", pth_in_models)
    assert resolved == comfy_stubs.models_dir / "sgz" / "my_sgz.pth"
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*" + re.escape(str(comfy_stubs.models_dir / "sgz"))):
        model_folders.resolve_weights("sgz", "missing.pth")


def test_weight_choices_outside_comfyui_list_the_shipped_files_default_first(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # import fails as outside ComfyUI
    assert model_folders.weight_choices("sgz", "sgz*.safetensors", "sgz_lowlight.safetensors") == [
        "lora_weights/sgz_lowlight.safetensors", "lora_weights/sgz_lowlight_v1.safetensors"
    ]
    assert not model_folders.register_model_folders()


def test_sgz_enhance_matches_the_pipeline_with_progress_and_cache(pth_in_models, comfy_stubs, night_frames):
    from comfyui_lowlight.pipelines import SGZPipeline

    args = dict(weights=pth_in_models, recurrences=8, downscale=4, strength=1.0, temporal_smoothing=0.5)
    image, factor = enhance(night_frames, **args)
    assert image.shape == factor.shape == night_frames.shape
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    assert image.mean() > night_frames.mean() + 0.1
    assert 0.0 <= float(factor.min()) and float(factor.max()) <= 1.0
    assert StubProgressBar.instances[-1].current == 3
    assert comfy_stubs.calls["interrupt_checks"] == 3

    pipe = SGZPipeline.from_pretrained(comfy_stubs.models_dir / "sgz" / "my_sgz.pth", device="cpu")
    expected, expected_factor = pipe(
        night_frames.permute(0, 3, 1, 2).contiguous(), downscale=4, recurrences=8, strength=1.0,
        temporal_smoothing=0.5, return_factor=True,
    )
    torch.testing.assert_close(image, expected.clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(factor, ((expected_factor + 1) / 2).permute(0, 2, 3, 1), atol=1e-5, rtol=0)

    cached = sgz_nodes._PIPELINE_CACHE["pipe"]
    enhance(night_frames[:1], **args)
    assert sgz_nodes._PIPELINE_CACHE["pipe"] is cached


def test_sgz_enhance_default_choice_is_the_shipped_weights(comfy_stubs, night_frames):
    from comfyui_lowlight.pipelines import SGZPipeline

    model_folders.register_model_folders()
    sgz_nodes._PIPELINE_CACHE.clear()
    weights = schema_inputs(SGZEnhance)["weights"].options[0]
    assert weights == SHIPPED_CHOICE
    assert model_folders.resolve_weights("sgz", weights) == SHIPPED_SGZ_WEIGHTS
    image, factor = enhance(night_frames, weights)
    assert image.shape == factor.shape == night_frames.shape and image.dtype == factor.dtype == torch.float32
    assert (image.mean(dim=(1, 2, 3)) > night_frames.mean(dim=(1, 2, 3)) + 0.1).all()  # every frame brightened
    expected = SGZPipeline.from_pretrained(device="cpu")(night_frames.permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(image, expected.clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_sgz_enhance_strength_zero_is_identity(pth_in_models, comfy_stubs, night_frames):
    image, _ = enhance(night_frames[:1], pth_in_models, strength=0.0)
    torch.testing.assert_close(image, night_frames[:1], atol=1e-6, rtol=0)


def test_sgz_enhance_stops_between_frames_when_interrupted(pth_in_models, comfy_stubs, night_frames):
    comfy_stubs.calls["interrupt_after"] = 1
    with pytest.raises(RuntimeError, match="interrupted"):
        enhance(night_frames, pth_in_models)
    assert StubProgressBar.instances[-1].current == 1


def test_sgz_enhance_unreadable_weights_names_the_file(comfy_stubs, pth_in_models, night_frames):
    broken = comfy_stubs.models_dir / "sgz" / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        enhance(night_frames[:1], "broken.pth")


def test_sgz_enhance_runs_inside_inference_mode_like_comfyui(pth_in_models, comfy_stubs):
    # ComfyUI executes nodes under torch.inference_mode(); the fused pass writes a full-size frame tile by tile, with
    # each op split over torch's threads, into the (inference-mode) output tensor.
    frame = _comfy_image(dark_scene(400, 600))[None]  # a LOL-sized 600x400 frame: many tiles
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            enhanced, _ = enhance(frame, pth_in_models)
    finally:
        torch.set_num_threads(threads)
    expected, _ = enhance(frame, pth_in_models)
    torch.testing.assert_close(enhanced, expected)


def test_comfy_registry_metadata_and_requirements_match_pyproject():
    import tomllib

    from comfyui_lowlight.nodes.model_folders import PACK_ROOT

    pyproject = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    comfy = pyproject["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r"(>=|==|~=)\d+\.\d+\.\d+", comfy["requires-comfyui"])
    icon_prefix = pyproject["project"]["urls"]["Repository"].replace("github.com", "raw.githubusercontent.com")
    assert comfy["Icon"].startswith(icon_prefix + "/main/")
    assert (PACK_ROOT / comfy["Icon"][len(icon_prefix + "/main/"):]).is_file()
    # ComfyUI Manager installs requirements.txt: the same dependencies, minus the torch ComfyUI already has.
    requirements = [
        line for line in (PACK_ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert requirements == [d for d in pyproject["project"]["dependencies"] if d != "torch"]


def test_sample_inputs_are_copied_once_and_never_overwrite(tmp_path):
    from comfyui_lowlight.nodes.example_inputs import EXAMPLE_INPUTS, install_example_inputs

    assert install_example_inputs(tmp_path) == list(EXAMPLE_INPUTS)
    for name, source in EXAMPLE_INPUTS.items():
        assert (tmp_path / name).read_bytes() == source.read_bytes()
    users_own = tmp_path / "lowlight_sample_night.jpg"
    users_own.write_bytes(b"the user's own file under that name")
    assert install_example_inputs(tmp_path) == []  # nothing copied twice, nothing overwritten
    assert users_own.read_bytes() == b"the user's own file under that name"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXAMPLE_INPUTS)  # no temporary file left


def test_sample_inputs_in_a_read_only_folder_do_not_stop_comfyui(tmp_path):
    from comfyui_lowlight.nodes.example_inputs import install_example_inputs

    blocked = tmp_path / "input"
    blocked.write_text("a file where the folder should be")
    assert install_example_inputs(blocked) == []


def test_template_inputs_are_the_shipped_samples():
    from comfyui_lowlight.nodes.example_inputs import EXAMPLE_INPUTS

    templates = sorted((model_folders.PACK_ROOT / "example_workflows").glob("*.json"))
    assert templates
    for template in templates:
        graph = json.loads(template.read_text())
        for node in graph["nodes"]:
            if node["type"] in ("LoadImage", "LoadVideo"):
                assert node["widgets_values"][0] in EXAMPLE_INPUTS, f"{template.name}: {node['widgets_values'][0]}"


def test_weights_fingerprint_follows_the_file_on_disk(pth_in_models, comfy_stubs):
    path = comfy_stubs.models_dir / "sgz" / pth_in_models
    before = SGZEnhance.fingerprint_inputs(weights=pth_in_models, image=None)
    assert SGZEnhance.fingerprint_inputs(weights=pth_in_models, image=None) == before  # unchanged file: cached
    path.write_bytes(path.read_bytes() + b"\0")  # the same name replaced by another download
    assert SGZEnhance.fingerprint_inputs(weights=pth_in_models, image=None) != before
    assert SGZEnhance.fingerprint_inputs(weights="gone.pth") == ("gone.pth", "missing")


@pytest.mark.parametrize("choice", ["../outside.pth", "/etc/passwd", "lora_weights/../../secret.safetensors",
                                    "night/../../outside.pth"])
def test_weights_paths_must_stay_inside_the_model_folders(comfy_stubs, choice):
    model_folders.register_model_folders()
    with pytest.raises(ValueError, match="without '..' or an absolute path"):
        model_folders.resolve_weights("sgz", choice)


def test_sgz_enhance_runs_the_v1_weights_chosen_in_the_dropdown(comfy_stubs, night_frames):
    """The first shipped weights stay selectable in saved workflows: the dropdown lists them, they resolve to the
    pack's file and the node then equals the pipeline with that file (and differs from the default weights)."""
    from comfyui_lowlight.pipelines import SGZPipeline

    model_folders.register_model_folders()
    sgz_nodes._PIPELINE_CACHE.clear()
    choice = "lora_weights/sgz_lowlight_v1.safetensors"
    assert choice in schema_inputs(SGZEnhance)["weights"].options
    assert model_folders.resolve_weights("sgz", choice) == V1_SGZ_WEIGHTS
    image, _ = enhance(night_frames, choice)
    expected = SGZPipeline.from_pretrained(V1_SGZ_WEIGHTS, device="cpu")(night_frames.permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(image, expected.clamp(0, 1).permute(0, 2, 3, 1), atol=1e-5, rtol=0)
    default, _ = enhance(night_frames, SHIPPED_CHOICE)
    assert (image - default).abs().max() > 1e-3
