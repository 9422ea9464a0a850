"""SCUFPipeline behaviour on the tiny SCUF model made in code (tests/tiny_scuf.py): inputs, batches, determinism,
weights IO, the official-checkpoint converter and bad input. Golden parity with the official code:
tests/test_scuf_parity.py."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_scuf import tiny_scuf  # noqa: F401  session fixture: the tiny SCUF model (no ../shared needed)


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


@pytest.fixture(scope="module")
def official_pkl(scuf):
    return scuf.official


def _load(scuf, scuf_weights=None):
    return scuf.pipeline(scuf_weights)


@pytest.fixture(scope="module")
def pipe(scuf, official_pkl):
    return _load(scuf, official_pkl)


@pytest.fixture(scope="module")
def low_image(scuf) -> Image.Image:
    return scuf.image("img64x64")


def _pt(pipe, image, **kwargs):
    return pipe(image, output_type="pt", **kwargs).images


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("size", [(37, 21), (8, 8), (64, 40), (5, 3)])
def test_any_size_keeps_size(pipe, low_image, size):
    image = low_image.resize(size)
    out = pipe(image).images[0]
    assert out.size == size and out.mode == "RGB"
    arr = pipe(image, output_type="np").images
    assert arr.shape == (1, size[1], size[0], 3) and arr.dtype == np.float32
    assert 0.0 <= arr.min() and arr.max() <= 1.0


def test_grayscale_rgba_and_containers_agree(pipe, low_image):
    gray = low_image.convert("L")
    ref = _pt(pipe, gray.convert("RGB"))
    assert torch.equal(_pt(pipe, gray), ref)
    assert torch.equal(_pt(pipe, np.asarray(gray)), ref)  # HxW uint8
    rgba = low_image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    with_alpha = _pt(pipe, rgba)  # colours as the official convert("RGB"), alpha kept as a fourth channel
    assert torch.equal(with_alpha[:, :3], _pt(pipe, low_image))
    assert torch.equal(with_alpha[0, 3], torch.from_numpy(np.asarray(rgba)[:, :, 3] / np.float32(255)))
    u8 = np.asarray(low_image)
    as_float = torch.from_numpy(u8.copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(_pt(pipe, as_float[None]), _pt(pipe, u8), atol=1e-6)


@pytest.mark.parametrize("bad", ["numpy", "torch"])
def test_nan_rejected(pipe, bad):
    image = np.full((16, 16, 3), 0.1, np.float32)
    image[3, 4, 1] = np.nan
    if bad == "torch":
        image = torch.from_numpy(image).permute(2, 0, 1)
    with pytest.raises(ValueError, match="NaN"):
        pipe(image)


def test_float_range_and_half_precision_inputs(pipe, low_image):
    as_float = torch.from_numpy(np.array(low_image)).permute(2, 0, 1).float() / 255
    with pytest.raises(ValueError, match="0..1"):
        pipe(as_float * 255)
    ref = _pt(pipe, as_float)
    assert torch.allclose(_pt(pipe, as_float.to(torch.bfloat16)), ref, atol=2e-2)


def test_wrong_input_kind(pipe):
    with pytest.raises(TypeError, match="PIL image"):
        pipe("not an image")
    with pytest.raises(ValueError, match="HxW"):
        pipe(np.zeros((4, 16, 16, 2), np.float32))


# ------------------------------------------------------------------------------------------ batches


def test_batch_matches_single_images(pipe, low_image):
    second = low_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    batch = _pt(pipe, [low_image, second])
    assert batch.shape == (2, 3, 64, 64)
    assert torch.allclose(batch[0], _pt(pipe, low_image)[0], atol=1e-5)
    assert torch.allclose(batch[1], _pt(pipe, second)[0], atol=1e-5)
    tensor_batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in (low_image, second)])
    assert torch.allclose(_pt(pipe, tensor_batch.float() / 255), batch, atol=1e-5)


def test_mixed_sizes_give_lists(pipe, low_image):
    images = pipe([low_image, low_image.resize((40, 24))], output_type="np").images
    assert isinstance(images, list) and images[0].shape == (64, 64, 3) and images[1].shape == (24, 40, 3)


def test_per_image_prompts_and_illumination(pipe, low_image):
    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT

    default = _pt(pipe, low_image)
    explicit = 1 - np.asarray(low_image).max(axis=2).astype(np.float32) / 255
    assert torch.allclose(_pt(pipe, low_image, illumination=explicit), default, atol=1e-6)
    assert torch.equal(_pt(pipe, low_image, prompt=DEFAULT_PROMPT), default)
    other = _pt(pipe, [low_image, low_image], prompt=[DEFAULT_PROMPT, "a dark photo"])
    assert torch.allclose(other[0], default[0], atol=1e-5) and (other[1] - default[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prompt"):
        pipe([low_image, low_image], prompt=["one"])


# -------------------------------------------------------------------------------------- determinism


def test_deterministic_by_default(pipe, low_image):
    assert torch.equal(_pt(pipe, low_image), _pt(pipe, low_image))


def test_cpu_run_uses_channels_last_with_the_same_output(scuf, official_pkl, low_image):
    fresh = _load(scuf, official_pkl)
    conv_weights = [p for m in (fresh.unet, fresh.vae) for p in m.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert not any(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    fresh._use_channels_last = lambda: None  # the same pipeline with its modules left in the default layout
    default_layout = fresh(low_image, output_type="np").images
    del fresh._use_channels_last
    channels_last = fresh(low_image, output_type="np").images
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    np.testing.assert_allclose(channels_last, default_layout, atol=1e-5)


def test_seeded_sampling(pipe, low_image):
    def sampled(seed):
        return _pt(pipe, low_image, sample_latent=True, generator=torch.Generator().manual_seed(seed))

    first = sampled(3)
    assert torch.equal(first, sampled(3))
    assert (first - sampled(4)).abs().max() > 1e-3
    assert (first - _pt(pipe, low_image)).abs().max() > 1e-3


def test_adapter_scale(pipe, low_image):
    full = _pt(pipe, low_image, adapter_scale=1.0)
    text_only = _pt(pipe, low_image, adapter_scale=0.0)
    half = _pt(pipe, low_image, adapter_scale=0.5)
    assert (full - text_only).abs().max() > 1e-2
    assert (half - full).abs().max() > 1e-3 and (half - text_only).abs().max() > 1e-3
    assert torch.equal(_pt(pipe, low_image), full)  # the scale does not stick to the next call


def test_pipeline_dtype_float32_output(pipe, low_image):
    out = _pt(pipe, low_image)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    images, = pipe(low_image, return_dict=False)
    assert isinstance(images, list) and images[0].size == low_image.size


def test_mixed_component_dtypes(scuf, official_pkl, pipe, low_image):
    """Components may run in different dtypes (here a bfloat16 UNet + encoders, float32 VAE); output stays float32."""
    mixed = _load(scuf, official_pkl)
    for name in ("unet", "text_encoder", "image_encoder", "image_proj"):
        getattr(mixed, name).to(torch.bfloat16)
    out = _pt(mixed, low_image)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - _pt(pipe, low_image)).abs().mean() < 2e-2  # bf16 noise, not a different computation


# -------------------------------------------------------------------------------------- weights IO


def test_save_pretrained_round_trip(pipe, low_image, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from comfyui_lowlight.pipelines import SCUFPipeline

    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "scuf_weights.safetensors").is_file()
    # the base components are saved plain (no LoRA/skip/adapter tensors), loadable by stock diffusers
    plain_vae = AutoencoderKL.from_pretrained(tmp_path / "saved" / "vae")
    assert not any("lora" in k or "skip_conv" in k or "base_layer" in k for k in plain_vae.state_dict())
    plain_unet = UNet2DConditionModel.from_pretrained(tmp_path / "saved" / "unet")
    assert not any("_ca." in k for k in plain_unet.state_dict())
    reloaded = SCUFPipeline.from_pretrained(tmp_path / "saved")  # image encoder saved as a transformers folder
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(_pt(reloaded, low_image), _pt(pipe, low_image))
    for key, value in pipe.scuf_parameters().items():
        assert torch.equal(reloaded.scuf_parameters()[key], value), key
    # the live pipeline still works after saving (modules restored)
    assert torch.equal(_pt(pipe, low_image), _pt(reloaded, low_image))


def test_official_conversion_round_trip(pipe, scuf, official_pkl, low_image, tmp_path):
    from safetensors import safe_open

    from comfyui_lowlight.cli import main
    from comfyui_lowlight.pipelines.scuf.weights import safe_torch_load

    out = tmp_path / "scuf_ours.safetensors"
    assert main(["convert-scuf", str(official_pkl), str(out)]) == 0
    ours = _load(scuf, out)
    assert torch.equal(_pt(ours, low_image), _pt(pipe, low_image))
    official = safe_torch_load(official_pkl)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "comfyui-lowlight/scuf" and meta["direction"] == "a2b"
        assert len(list(f.keys())) == 74 * 2 + 4 + 4 + 48
        for index, layer in ((1, "down_blocks.0.attentions.0"), (31, "mid_block.attentions.0")):
            key = f"ca_adapter.{layer}.transformer_blocks.0.attn2.to_q_ca.weight"
            assert torch.equal(f.get_tensor(key), official["ca_adapter"][f"{index}.to_q_ca.weight"])
        assert torch.equal(
            f.get_tensor("vae.decoder.skip_conv_1.weight"),
            official["sd_vae_dec"]["vae.decoder.skip_conv_1.base_layer.weight"],
        )
        assert torch.equal(
            f.get_tensor("vae.encoder.conv_in.lora_A.weight"),
            official["sd_vae_dec"]["vae.encoder.conv_in.lora_A.vae_skip.weight"],
        )
    # our file saved again from the pipeline is identical
    again = tmp_path / "again.safetensors"
    ours.save_scuf_weights(again)
    with safe_open(out, "pt") as a, safe_open(again, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # the fixture's checkpoint was written from the same lighten modules as its file in our format
    with safe_open(out, "pt") as a, safe_open(scuf.scuf_weights, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert torch.equal(_pt(_load(scuf, "ours"), low_image), _pt(pipe, low_image))


def test_converter_command_line(scuf, official_pkl, tmp_path):
    """``lowlight convert-scuf`` (``python -m comfyui_lowlight convert-scuf``): the darken direction, the base's UNet config."""
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file

    out = tmp_path / "darken.safetensors"
    command = [sys.executable, "-m", "comfyui_lowlight", "convert-scuf", str(official_pkl),
               str(out), "--direction", "b2a", "--unet-config", str(scuf.base / "unet" / "config.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}: {74 * 2 + 4 + 4 + 48} tensors, direction b2a" in done.stdout
    converted, config, base_shapes, meta = load_scuf_file(out)
    expected, expected_config, _, _ = load_scuf_file(official_pkl, "b2a")
    assert meta["direction"] == "b2a" and meta["source"] == official_pkl.name and not base_shapes
    assert config == expected_config and converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    lighten, _, _, _ = load_scuf_file(scuf.scuf_weights)
    assert not torch.equal(converted["vae.decoder.skip_conv_1.weight"], lighten["vae.decoder.skip_conv_1.weight"])
    # the output is refused unless it is a .safetensors file, and nothing is written then
    bad = subprocess.run(command[:5] + [str(tmp_path / "out.pkl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must end with .safetensors" in bad.stderr
    assert not (tmp_path / "out.pkl").exists()


def test_darken_direction_differs(scuf, official_pkl, low_image):
    from comfyui_lowlight.pipelines.scuf.weights import load_scuf_file

    a2b, _, _, _ = load_scuf_file(official_pkl, "a2b")
    b2a, _, _, _ = load_scuf_file(official_pkl, "b2a")
    key = "vae.decoder.skip_conv_1.weight"
    assert not torch.equal(a2b[key], b2a[key])
    assert torch.equal(a2b["image_proj.proj.weight"], b2a["image_proj.proj.weight"])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_without_execution(scuf, tmp_path):
    from comfyui_lowlight.pipelines.scuf.weights import SCUFWeightsError

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"rank_vae": 4, "payload": _Exploit(marker)}, f, protocol=2)
    torch_path = tmp_path / "evil_torch.pkl"
    torch.save({"rank_vae": 4, "payload": _Exploit(marker)}, torch_path)
    pipe = _load(scuf)
    for p in (path, torch_path):
        with pytest.raises(SCUFWeightsError, match="refused"):
            pipe.load_scuf_weights(p)
    assert not marker.exists()
    assert pipe.scuf_config is None  # nothing attached on failure


def test_not_a_scuf_checkpoint(scuf, tmp_path):
    from comfyui_lowlight.pipelines.scuf.weights import SCUFWeightsError

    path = tmp_path / "other.pkl"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(SCUFWeightsError, match="missing"):
        _load(scuf).load_scuf_weights(path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(SCUFWeightsError, match="format"):
        _load(scuf).load_scuf_weights(tmp_path / "other.safetensors")


def test_weights_for_another_base_model(scuf, official_pkl):
    """A VAE of different widths: the error lists the keys and both shapes."""
    from diffusers import AutoencoderKL

    from comfyui_lowlight.pipelines.scuf.weights import SCUFWeightsError

    pipe = _load(scuf)
    config = dict(pipe.vae.config)
    config["block_out_channels"] = [8, 8, 16, 16]
    pipe.register_modules(vae=AutoencoderKL.from_config(config))
    with pytest.raises(SCUFWeightsError) as info:
        pipe.load_scuf_weights(official_pkl)
    message = str(info.value)
    assert "different" in message and "shape mismatch" in message
    assert pipe.scuf_config is None and pipe.image_proj is None  # checked before anything was attached
    assert "vae.encoder.conv_in.base_layer.weight: file (4, 3, 3, 3) vs base VAE (8, 3, 3, 3)" in message
    assert "more" in message  # long listings are cut, with a count


def test_unet_mismatch_lists_keys(scuf, official_pkl, tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_lowlight.pipelines.scuf.weights import SCUFWeightsError

    pipe = _load(scuf, official_pkl)
    path = tmp_path / "ours.safetensors"
    pipe.save_scuf_weights(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    removed = "ca_adapter.mid_block.attentions.0.transformer_blocks.0.attn2.to_v_ca.weight"
    del tensors[removed]
    tensors["ca_adapter.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q_ca.weight"] = torch.zeros(3, 4)
    tensors["image_proj.norm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(SCUFWeightsError) as info:
        _load(scuf).load_scuf_weights(path)
    message = str(info.value)
    assert removed in message and "up_blocks.0.attentions.0" in message
    assert "image_proj.norm.weight: file (64,) vs model (32,)" in message


def test_base_model_missing(tmp_path, scuf):
    from comfyui_lowlight.pipelines import SCUFPipeline

    with pytest.raises(FileNotFoundError) as info:
        SCUFPipeline.from_pretrained(tmp_path / "no-such-sd-turbo", image_encoder=scuf.clip)
    assert "stabilityai/sd-turbo" in str(info.value) and "models/checkpoints" in str(info.value)
    with pytest.raises(FileNotFoundError, match="sd_turbo.safetensors"):
        SCUFPipeline.from_single_file(tmp_path / "sd_turbo.safetensors", image_encoder=scuf.clip)


def test_hub_base_model_not_cached(tmp_path, scuf):
    from comfyui_lowlight.pipelines import SCUFPipeline

    with pytest.raises(OSError) as info:
        SCUFPipeline.from_pretrained("stabilityai/sd-turbo", image_encoder=scuf.clip,
                                     local_files_only=True, cache_dir=tmp_path)
    assert "huggingface-cli download stabilityai/sd-turbo" in str(info.value)
    assert "models/checkpoints" in str(info.value)


def test_weights_required_before_call(scuf, low_image):
    with pytest.raises(RuntimeError, match="load_scuf_weights"):
        _load(scuf)(low_image)


def test_training_init_matches_official(scuf, low_image):
    """Fresh modules for training: skip convs 1e-5, LoRA B = 0 (so the VAE starts as the base one)."""
    from comfyui_lowlight.pipelines.scuf.modules import scuf_vae_trainable_parameters

    pipe = _load(scuf)
    pipe.init_scuf_modules()
    params = pipe.scuf_parameters()
    assert len(params) == 74 * 2 + 4 + 4 + 48
    assert torch.all(params["vae.decoder.skip_conv_4.weight"] == 1e-5)
    assert torch.all(params["vae.encoder.conv_in.lora_B.weight"] == 0)
    assert len(scuf_vae_trainable_parameters(pipe.vae)) == 74 * 2 + 4
    # what official training effectively updates: PEFT froze the skip-conv base weights (fixture README sec. 5)
    assert len(scuf_vae_trainable_parameters(pipe.vae, include_skip_base=False)) == 74 * 2
    out = _pt(pipe, low_image)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="already attached"):
        pipe.init_scuf_modules()


def test_openai_and_transformers_clip_agree(scuf, tmp_path):
    from comfyui_lowlight.pipelines.scuf.clip_encoder import clip_image_embedding, load_clip_image_encoder

    from_openai = load_clip_image_encoder(scuf.clip)
    from_openai.save_pretrained(tmp_path / "clip")
    from_folder = load_clip_image_encoder(tmp_path / "clip")
    from safetensors.torch import save_file

    single = {k: v.contiguous() for k, v in from_openai.state_dict().items()}
    single["text_model.final_layer_norm.weight"] = torch.ones(8)  # full CLIPModel files: text tower ignored
    save_file(single, tmp_path / "clip_vision_b32.safetensors")  # ComfyUI models/clip_vision layout
    from_single = load_clip_image_encoder(tmp_path / "clip_vision_b32.safetensors")
    x = torch.rand(2, 3, 72, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = clip_image_embedding(from_openai, x)
        b = clip_image_embedding(from_folder, x)
        c = clip_image_embedding(from_single, x)
        d = clip_image_embedding(load_clip_image_encoder(scuf.clip_folder), x)  # the fixture's transformers folder
        tiny = clip_image_embedding(from_openai, x[:, :, :8, :8])  # smaller than a patch: class token only
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.isfinite(tiny).all() and tiny.shape == (2, 512)


def test_rebuilt_from_components(pipe, low_image):
    """``SCUFPipeline(**pipe.components)`` recognises the attached SCUF modules (as ComfyUI nodes rebuild it)."""
    from comfyui_lowlight.pipelines import SCUFPipeline

    rebuilt = SCUFPipeline(**pipe.components)
    assert rebuilt.scuf_config == pipe.scuf_config
    assert torch.equal(_pt(rebuilt, low_image), _pt(pipe, low_image))
