"""SCUF node classes outside ComfyUI with stub ``comfy`` / ``folder_paths`` modules and the tiny SCUF model of
tests/tiny_scuf.py.

The real-server counterpart is tests/test_scuf_comfy_server.py.
"""

import gc
import sys
import weakref

import numpy as np
import pytest
import torch

from comfy_stubs import StubProgressBar, install_comfy_stubs, node_outputs, schema_inputs
from comfyui_lowlight.nodes import model_folders, scuf_nodes
from comfyui_lowlight.nodes.illumination_nodes import IlluminationPrompt
from comfyui_lowlight.nodes.scuf_nodes import SCUFAdapterLoader, SCUFLighten, SCUFLoadSDTurbo
from tiny_scuf import low_light_image, tiny_scuf  # noqa: F401  (session fixture: the tiny SCUF model)

PARITY_ATOL = 1e-5  # node output vs SCUFPipeline on the same float input (same ops, batch of one)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    """Stub ComfyUI (tests/comfy_stubs.py) on the CPU, recording the memory-management calls of the nodes."""
    def unet_offload_device():
        calls["offload"] += 1
        return torch.device("cpu")

    stubs = install_comfy_stubs(
        monkeypatch, tmp_path, folders=("diffusers", "checkpoints", "clip_vision"),
        free_memory=lambda memory, device: calls["free_memory"].append((memory, device)),
        unet_offload_device=unet_offload_device, soft_empty_cache=lambda: None,
        should_use_bf16=lambda device: False, should_use_fp16=lambda device: True,
    )
    calls = stubs.calls  # the functions above look it up when called
    calls.update(free_memory=[], offload=0)
    model_folders.register_model_folders()  # models/scuf
    (tmp_path / "scuf").mkdir()
    scuf_nodes.release_base()
    yield stubs
    scuf_nodes.release_base()


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


@pytest.fixture
def staged(comfy, scuf):
    """The tiny base, CLIP and official-format checkpoint linked into the stub model folders."""
    (comfy.models_dir / "diffusers" / "sd-turbo").symlink_to(scuf.base)
    (comfy.models_dir / "clip_vision" / "clip_tiny.pt").symlink_to(scuf.clip)
    (comfy.models_dir / "scuf" / "official.pkl").symlink_to(scuf.official)
    return comfy


@pytest.fixture(scope="module")
def reference_pipe(scuf):
    return scuf.pipeline()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Two small dark frames as a ComfyUI IMAGE ``[2, 44, 60, 3]`` (not a multiple of 8 wide)."""
    images = [low_light_image(60, 44, seed) for seed in (11, 12)]
    return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0) for image in images])


def load_base(model="diffusers/sd-turbo", clip="clip_tiny.pt", dtype="float32"):
    (base,) = node_outputs(SCUFLoadSDTurbo.execute(model=model, clip=clip, dtype=dtype))
    return base


def attach(base, weights="official.pkl", scale=1.0):
    (model,) = node_outputs(SCUFAdapterLoader.execute(scuf_pipe=base, scuf_weights=weights, adapter_scale=scale))
    return model


def load_chain(weights="official.pkl", scale=1.0, dtype="float32"):
    base = load_base(dtype=dtype)
    return base, attach(base, weights, scale)


def lighten(model, image, prompt=None, seed=0, sample_latent=False, **illumination):
    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT

    (out,) = node_outputs(SCUFLighten.execute(scuf_pipe=model, image=image, prompt=prompt or DEFAULT_PROMPT, seed=seed,
                                              sample_latent=sample_latent, **illumination))
    return out


def expected(pipe, image, **kwargs) -> torch.Tensor:
    """SCUFPipeline on each image of a ComfyUI IMAGE batch, back in ComfyUI layout."""
    return torch.from_numpy(np.stack([pipe(image[i : i + 1].permute(0, 3, 1, 2), output_type="np", **kwargs).images[0]
                                      for i in range(image.shape[0])]))


def test_nodes_are_registered_documented_and_typed():
    from comfyui_lowlight.nodes import node_classes

    ids = {cls.define_schema().node_id: cls for cls in node_classes()}
    for name, cls in (("LowLightSCUFLoadSDTurbo", SCUFLoadSDTurbo), ("LowLightSCUFAdapterLoader", SCUFAdapterLoader),
                      ("LowLightSCUFLighten", SCUFLighten)):
        assert ids[name] is cls
        schema = cls.define_schema()
        assert schema.category == "image/lowlight" and schema.description.strip()
        for item in schema.inputs:
            assert item.tooltip.strip(), f"{name}.{item.id}"
    for cls in (SCUFLoadSDTurbo, SCUFAdapterLoader):
        assert [output.get_io_type() for output in cls.define_schema().outputs] == ["SCUF_PIPE"]
    assert schema_inputs(SCUFLighten)["scuf_pipe"].get_io_type() == "SCUF_PIPE"


def test_dropdowns_list_model_folders_and_keep_the_defaults(comfy):
    models = comfy.models_dir
    for folder in ("sd-turbo", "nested/other-base"):
        (models / "diffusers" / folder / "unet").mkdir(parents=True)
        (models / "diffusers" / folder / "model_index.json").write_text("{}")
        (models / "diffusers" / folder / "unet" / "model_index.json").write_text("{}")  # not a model of its own
    (models / "diffusers" / "not-a-model").mkdir()
    (models / "checkpoints" / "sd_turbo.safetensors").write_bytes(b"")
    (models / "checkpoints" / "notes.txt").write_text("")
    (models / "clip_vision" / "vit-b-32").mkdir()
    (models / "clip_vision" / "vit-b-32" / "config.json").write_text("{}")
    (models / "clip_vision" / "vit-b-32" / "model.safetensors").write_bytes(b"")
    (models / "clip_vision" / "ViT-B-32.pt").write_bytes(b"")
    for name in ("ours.safetensors", "official.pkl", "readme.md"):
        (models / "scuf" / name).write_bytes(b"")

    model = schema_inputs(SCUFLoadSDTurbo)["model"].options
    assert model == ["diffusers/sd-turbo", "diffusers/nested/other-base", "checkpoints/sd_turbo.safetensors"]
    clip = schema_inputs(SCUFLoadSDTurbo)["clip"].options
    assert clip == ["clip-vit-base-patch32", "vit-b-32", "ViT-B-32.pt"]  # no base folder has an image_encoder/
    (models / "diffusers" / "sd-turbo" / "image_encoder").mkdir()
    (models / "diffusers" / "sd-turbo" / "image_encoder" / "config.json").write_text("{}")
    assert schema_inputs(SCUFLoadSDTurbo)["clip"].options[-1] == model_folders.CLIP_FROM_BASE
    weights = schema_inputs(SCUFAdapterLoader)["scuf_weights"].options
    assert weights[0] == "scuf_lowlight.safetensors" and {"ours.safetensors", "official.pkl"} <= set(weights)
    assert "readme.md" not in weights


def test_dropdowns_list_only_existing_files_plus_the_marked_default_names(comfy):
    # Nothing downloaded: only the default names (so that the templates open), each marked in its tooltip.
    inputs = {**schema_inputs(SCUFLoadSDTurbo), **schema_inputs(SCUFAdapterLoader)}
    assert inputs["model"].options == ["diffusers/sd-turbo"]
    assert inputs["clip"].options == ["clip-vit-base-patch32"]
    assert inputs["scuf_weights"].options == ["scuf_lowlight.safetensors"]
    for name, default in (("model", "diffusers/sd-turbo"), ("clip", "clip-vit-base-patch32"),
                          ("scuf_weights", "scuf_lowlight.safetensors")):
        assert f"Not downloaded yet: '{default}'" in inputs[name].tooltip, name
    (comfy.models_dir / "clip_vision" / "clip-vit-base-patch32").mkdir()
    (comfy.models_dir / "clip_vision" / "clip-vit-base-patch32" / "config.json").write_text("{}")
    assert "Not downloaded yet" not in schema_inputs(SCUFLoadSDTurbo)["clip"].tooltip


def test_dropdowns_outside_comfyui_keep_only_the_defaults(monkeypatch):
    monkeypatch.setitem(sys.modules, "folder_paths", None)  # import fails: not inside ComfyUI
    assert model_folders.base_choices() == ["diffusers/sd-turbo"]
    assert model_folders.clip_choices() == ["clip-vit-base-patch32"]


def test_missing_parts_are_all_named_in_one_message_with_folder_size_and_download(comfy, scuf):
    with pytest.raises(FileNotFoundError) as missing:
        load_base("diffusers/sd-turbo", "clip-vit-base-patch32", "auto")
    message = str(missing.value)
    assert message.startswith("3 of the 3 parts SCUF needs are missing")
    for expected_text in ("'diffusers/sd-turbo'", str(comfy.models_dir / "diffusers"), "https://huggingface.co/stabilityai/sd-turbo",
                          "about 5 GB", "'clip-vit-base-patch32'", str(comfy.models_dir / "clip_vision"),
                          "https://huggingface.co/openai/clip-vit-base-patch32", "about 0.6 GB",
                          "scuf_lowlight.safetensors", str(comfy.models_dir / "scuf"), "https://github.com/wangsen99/GEFU"):
        assert expected_text in message, expected_text
    # Two parts there: the message names the one still missing, and only it.
    (comfy.models_dir / "diffusers" / "sd-turbo").symlink_to(scuf.base)
    (comfy.models_dir / "clip_vision" / "clip_tiny.pt").symlink_to(scuf.clip)
    with pytest.raises(FileNotFoundError) as missing:
        load_base("diffusers/sd-turbo", "clip_tiny.pt", "float32")
    message = str(missing.value)
    assert message.startswith("1 of the 3 parts SCUF needs is missing") and "SCUF weights" in message
    assert "SD-Turbo" not in message and "CLIP" not in message
    (comfy.models_dir / "scuf" / "official.pkl").symlink_to(scuf.official)
    base = load_base("diffusers/sd-turbo", "clip_tiny.pt", "float32")
    with pytest.raises(FileNotFoundError) as missing:  # a chosen weights file that is not there
        attach(base, "scuf_lowlight.safetensors")
    assert "scuf_lowlight.safetensors" in str(missing.value) and str(comfy.models_dir / "scuf") in str(missing.value)


@pytest.mark.parametrize("field, value", [("model", "diffusers/../../outside"), ("model", "checkpoints//etc/x.safetensors"),
                                          ("clip", "../clip_vision_elsewhere"), ("scuf_weights", "../scuf.pkl")])
def test_node_paths_must_stay_inside_the_model_folders(staged, field, value):
    outside = staged.models_dir.parent / "outside"
    (outside / "unet").mkdir(parents=True, exist_ok=True)
    (outside / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="without '..' or an absolute path"):
        if field == "scuf_weights":
            attach(load_base(), value)
        else:
            load_base(**{"model": "diffusers/sd-turbo", "clip": "clip_tiny.pt", field: value})


def test_lighten_matches_the_pipeline_with_progress_and_offload(staged, reference_pipe, frames):
    _, model = load_chain()
    out = lighten(model, frames)
    assert out.shape == frames.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected(reference_pipe, frames), atol=PARITY_ATOL, rtol=0)
    assert [bar.current for bar in StubProgressBar.instances] == [2]
    assert staged.calls["interrupt_checks"] == 2
    (memory, device), = staged.calls["free_memory"]
    unet_bytes = sum(p.numel() * 4 for p in scuf_nodes._BASE_CACHE["pipe"].unet.parameters())
    assert device.type == "cpu" and memory > unet_bytes
    assert staged.calls["offload"] == 1


def test_illumination_inputs_custom_prompt_and_sampled_latent(staged, reference_pipe, frames):
    _, model = load_chain(scale=0.5)
    _, _, inverse_image, inverse_mask = node_outputs(IlluminationPrompt.execute(image=frames))
    default = lighten(model, frames)
    # The Illumination Prompt's 1 - V, as MASK or IMAGE, is the default image prompt (up to the resize: a map at the
    # input size is resized to the multiple of 8 with the image, the default one is computed after that resize).
    torch.testing.assert_close(lighten(model, frames, illumination_mask=inverse_mask), default, atol=1e-4, rtol=0)
    torch.testing.assert_close(lighten(model, frames, illumination_image=inverse_image), default, atol=1e-4, rtol=0)
    edited = (inverse_mask[:1] > 0.6).float()  # one map for the whole batch
    prompt = "evenly lit street"
    out = lighten(model, frames, prompt=prompt, seed=7, sample_latent=True, illumination_mask=edited)
    generator = torch.Generator().manual_seed(7)
    ref = expected(reference_pipe, frames, prompt=prompt, adapter_scale=0.5, illumination=edited[0],
                   sample_latent=True, generator=generator)
    torch.testing.assert_close(out, ref, atol=PARITY_ATOL, rtol=0)
    assert (out - default).abs().max() > 0.01


def test_bad_illumination_inputs_are_explained(staged, frames):
    _, model = load_chain()
    mask = torch.rand(1, 44, 60)
    with pytest.raises(ValueError, match="not both"):
        lighten(model, frames, illumination_mask=mask, illumination_image=mask[..., None].expand(-1, -1, -1, 3))
    with pytest.raises(ValueError, match=r"illumination_mask: expected 2 or 1 map\(s\) of the image size 44x60"):
        lighten(model, frames, illumination_mask=torch.rand(1, 40, 60))
    with pytest.raises(ValueError, match="illumination_mask"):
        lighten(model, frames, illumination_mask=torch.rand(3, 44, 60))


def test_base_is_loaded_once_and_weights_switch_without_reloading(staged, reference_pipe, frames, monkeypatch,
                                                                  tmp_path):
    from comfyui_lowlight.pipelines.scuf.pipeline import SCUFPipeline
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file, save_scuf_file

    loads = []
    original = SCUFPipeline.from_pretrained.__func__
    monkeypatch.setattr(SCUFPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    tensors, config, _, _ = load_scuf_file(staged.models_dir / "scuf" / "official.pkl", "a2b",
                                           [n[: -len(".processor")] for n in reference_pipe.unet.attn_processors])
    tensors = {k: v * 1.5 if "lora_B" in k else v for k, v in tensors.items()}
    save_scuf_file(staged.models_dir / "scuf" / "other.safetensors", tensors, config)

    base, official = load_chain("official.pkl")
    pipe = scuf_nodes._BASE_CACHE["pipe"]
    base_again = load_base()
    other = attach(base_again, "other.safetensors", 1.0)
    official_half = attach(base, "official.pkl", 0.5)
    first = lighten(official, frames[:1])
    other_out = lighten(other, frames[:1])
    half = lighten(official_half, frames[:1])
    assert len(loads) == 1 and scuf_nodes._BASE_CACHE["pipe"] is pipe  # one base for everything
    assert (other_out - first).abs().max() > 0.01 and (half - first).abs().max() > 0.01
    torch.testing.assert_close(lighten(official, frames[:1]), first, atol=0, rtol=0)  # switching back restores
    torch.testing.assert_close(half, expected(reference_pipe, frames[:1], adapter_scale=0.5), atol=PARITY_ATOL,
                               rtol=0)

    # Another dtype is another base: the old one is released before the new one loads (never two in memory).
    old = weakref.ref(pipe)
    del pipe
    _, bf16 = load_chain("official.pkl", dtype="bfloat16")
    gc.collect()
    assert old() is None and len(loads) == 2
    assert scuf_nodes._BASE_CACHE["pipe"].unet.dtype == torch.bfloat16
    out = lighten(bf16, frames[:1])
    assert out.dtype == torch.float32 and (out - first).abs().mean() < 0.05
    # A SCUF_PIPE made for the released base still works: its base is reloaded on demand.
    assert lighten(official, frames[:1]).shape == first.shape and len(loads) == 3


def test_mismatched_scuf_weights_name_the_file_and_folder(staged, frames, reference_pipe):
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file, save_scuf_file

    tensors, config, _, _ = load_scuf_file(staged.models_dir / "scuf" / "official.pkl", "a2b",
                                           [n[: -len(".processor")] for n in reference_pipe.unet.attn_processors])
    tensors["image_proj.proj.weight"] = torch.zeros(7, 512)
    save_scuf_file(staged.models_dir / "scuf" / "other_base.safetensors", tensors, config)
    base = load_base()
    with pytest.raises(ValueError) as mismatch:
        attach(base, "other_base.safetensors", 1.0)
    message = str(mismatch.value)
    assert "other_base.safetensors" in message and "image_proj.proj.weight" in message
    assert str(staged.models_dir / "scuf") in message
    (staged.models_dir / "scuf" / "truncated.safetensors").write_bytes(b"\x10\x00 not safetensors")
    with pytest.raises(ValueError, match=r"(?s)'truncated.safetensors'.*Put SCUF weights"):
        attach(base, "truncated.safetensors", 1.0)
    good = attach(base, "official.pkl", 1.0)  # the base is still usable
    torch.testing.assert_close(lighten(good, frames[:1]), expected(reference_pipe, frames[:1]), atol=PARITY_ATOL,
                               rtol=0)


def test_lighten_without_weights_or_interrupted(staged, frames):
    base, model = load_chain()
    with pytest.raises(ValueError, match="Cycle-Attention Adapter Loader"):
        lighten(base, frames)
    staged.calls["interrupt_after"] = 1
    with pytest.raises(RuntimeError, match="interrupted"):
        lighten(model, frames)
    assert StubProgressBar.instances[-1].current == 1  # stopped between the two images
    assert staged.calls["offload"] == 1  # and the model still went back to the offload device


def test_nodes_run_inside_inference_mode_like_comfyui(staged, reference_pipe, frames):
    with torch.inference_mode():
        _, model = load_chain()
        out = lighten(model, frames[:1])
    torch.testing.assert_close(out, expected(reference_pipe, frames[:1]), atol=PARITY_ATOL, rtol=0)


def test_auto_dtype_follows_comfy_model_management(staged, monkeypatch):
    assert scuf_nodes._resolve_auto_dtype("auto") == "float32"  # CPU
    monkeypatch.setattr(staged.model_management, "get_torch_device", lambda: torch.device("cuda", 0))
    assert scuf_nodes._resolve_auto_dtype("auto") == "float16"
    monkeypatch.setattr(staged.model_management, "should_use_bf16", lambda device: True)
    assert scuf_nodes._resolve_auto_dtype("auto") == "bfloat16"
    assert scuf_nodes._resolve_auto_dtype("float32") == "float32"


def test_single_file_checkpoint_is_loaded_with_from_single_file(staged, monkeypatch):
    from comfyui_lowlight.pipelines.scuf.pipeline import SCUFPipeline

    checkpoint = staged.models_dir / "checkpoints" / "sd_turbo.safetensors"
    checkpoint.write_bytes(b"")
    calls = []

    def fake_from_single_file(cls, path, **kwargs):
        calls.append((path, kwargs))
        raise OSError("not a real checkpoint")

    monkeypatch.setattr(SCUFPipeline, "from_single_file", classmethod(fake_from_single_file))
    with pytest.raises(RuntimeError) as failed:
        load_base("checkpoints/sd_turbo.safetensors", "clip_tiny.pt", "float32")
    (path, kwargs), = calls
    assert path == str(checkpoint) and kwargs["image_encoder"].endswith("clip_tiny.pt")
    assert kwargs["dtype"] == torch.float32
    assert "'checkpoints/sd_turbo.safetensors'" in str(failed.value) and "not a real checkpoint" in str(failed.value)
