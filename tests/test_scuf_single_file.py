"""``SCUFPipeline.from_single_file`` offline: an SD-2.x/SD-Turbo-layout single file built from the tiny SCUF model
(tests/tiny_scuf.py).

The tiny base model is written back into the original (LDM/OpenCLIP) single-file key layout that
``sd_turbo.safetensors`` uses, then loaded with diffusers' own single-file conversion, and must give exactly
the same output as ``from_pretrained`` on the diffusers folder.
"""

import json
from pathlib import Path

import pytest
import torch

from tiny_scuf import official_fixture, tiny_scuf  # noqa: F401  (session fixture: the tiny SCUF model)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attn = {k.split(".")[1] for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        module, leaf = ".".join(p[:-1]), p[-1]
        if module in top:
            new = f"{top[module]}.{leaf}"
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * per}.0.op.{leaf}"
            else:
                block = 1 + b * per + int(p[3])
                rest = ".".join(p[4:])
                if kind == "resnets":
                    new = f"input_blocks.{block}.0.{_RESNET.get(p[4], p[4])}.{'.'.join(p[5:])}"
                else:
                    new = f"input_blocks.{block}.1.{rest}"
        elif p[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            if p[1] == "resnets":
                new = f"middle_block.{index}.{_RESNET.get(p[3], p[3])}.{'.'.join(p[4:])}"
            else:
                new = f"middle_block.{index}.{'.'.join(p[3:])}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                slot = 2 if p[1] in up_has_attn else 1
                new = f"output_blocks.{b * per + per - 1}.{slot}.conv.{leaf}"
            else:
                block = b * per + int(p[3])
                if kind == "resnets":
                    new = f"output_blocks.{block}.0.{_RESNET.get(p[4], p[4])}.{'.'.join(p[5:])}"
                else:
                    new = f"output_blocks.{block}.1.{'.'.join(p[4:])}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(sd: dict, num_up: int) -> dict:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if ".down_blocks." in key:
            p = key.split(".")
            if p[3] == "downsamplers":
                new = f"encoder.down.{p[2]}.downsample.conv.{p[-1]}"
            else:
                new = f"encoder.down.{p[2]}.block.{p[4]}.{'.'.join(p[5:])}"
        elif ".up_blocks." in key:
            p = key.split(".")
            block = num_up - 1 - int(p[2])
            if p[3] == "upsamplers":
                new = f"decoder.up.{block}.upsample.conv.{p[-1]}"
            else:
                new = f"decoder.up.{block}.block.{p[4]}.{'.'.join(p[5:])}"
        elif ".mid_block.resnets." in key:
            p = key.split(".")
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif ".mid_block.attentions.0." in key:
            prefix, rest = key.split(".mid_block.attentions.0.")
            module, leaf = rest.rsplit(".", 1)
            new = f"{prefix}.mid.attn_1.{attn[module]}.{leaf}"
            if value.ndim == 2:  # LDM keeps these projections as 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def _text_to_open_clip(sd: dict) -> dict:
    prefix = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(
                [sd.pop(f"{src}self_attn.{q}_proj.{leaf}") for q in ("q", "k", "v")]
            )
            for d, s in names.items():
                out[f"{dst}{s}.{leaf}"] = sd.pop(f"{src}{d}.{leaf}")
    assert not sd, f"unmapped text encoder keys {sorted(sd)}"
    return out


@pytest.fixture(scope="module")
def scuf(tiny_scuf):  # noqa: F811
    return tiny_scuf


@pytest.fixture(scope="module")
def single_file(scuf, tmp_path_factory) -> Path:
    from safetensors.torch import load_file, save_file

    base = scuf.base
    unet_cfg = json.loads((base / "unet" / "config.json").read_text())
    vae_cfg = json.loads((base / "vae" / "config.json").read_text())
    checkpoint = {}
    checkpoint.update(_unet_to_ldm(load_file(base / "unet" / "diffusion_pytorch_model.safetensors"),
                                   unet_cfg["layers_per_block"]))
    checkpoint.update(_vae_to_ldm(load_file(base / "vae" / "diffusion_pytorch_model.safetensors"),
                                  len(vae_cfg["up_block_types"])))
    checkpoint.update(_text_to_open_clip(load_file(base / "text_encoder" / "model.safetensors")))
    path = tmp_path_factory.mktemp("ckpt") / "sd_turbo_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)
    return path


def test_from_path_single_file_matches_folder(scuf, single_file, tmp_path):
    """``from_path`` sends a file to ``from_single_file`` and a folder to ``from_pretrained``: same weights."""
    from comfyui_lowlight.pipelines import SCUFPipeline

    kwargs = dict(image_encoder=scuf.clip, scuf_weights=scuf.official)
    from_file = SCUFPipeline.from_path(single_file, config=str(scuf.base), **kwargs)
    from_folder = SCUFPipeline.from_path(scuf.base, **kwargs)
    with pytest.raises(FileNotFoundError, match="SD-Turbo checkpoint not found"):
        SCUFPipeline.from_path(tmp_path / "missing.safetensors", **kwargs)  # a checkpoint name, not a folder
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    image = scuf.image("img96x80")
    # bit-equal weights; some converted tensors are strided views (LDM 1x1 convs), hence float noise only
    out_file = from_file(image, output_type="pt").images
    assert torch.allclose(out_file, from_folder(image, output_type="pt").images, atol=1e-5, rtol=0)


def test_shipped_sd_turbo_configs():
    """The offline configs describe SD-Turbo: known parameter counts, same attention layout as the fixture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_lowlight.pipelines.scuf.pipeline import shipped_config_dir
    from comfyui_lowlight.pipelines.scuf.weights import official_unet_layer_names

    folder = Path(shipped_config_dir())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (865_910_724, 83_653_863, 340_387_840)
    names = official_unet_layer_names()
    assert len(names) == 32 and names[1] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert names[31] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "SCUFPipeline"
    tokenizer_config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "!" and tokenizer_config["model_max_length"] == 77


def test_tokenizer_lookup_error_is_actionable(tmp_path, monkeypatch):
    from comfyui_lowlight.pipelines.scuf.pipeline import find_clip_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    try:
        tokenizer = find_clip_tokenizer(str(tmp_path))
    except OSError as exc:
        assert "stabilityai/sd-turbo" in str(exc) and "tokenizer=" in str(exc)
    else:  # a ComfyUI install or a cached tokenizer was found: it must have SD-Turbo's padding
        assert tokenizer.pad_token == "!"


def _comfyui_install_tokenizer(base: Path, root: Path, monkeypatch):
    """``find_clip_tokenizer`` inside a fake ComfyUI whose ``comfy/sd1_tokenizer`` holds ``base``'s BPE files with
    ComfyUI's SD 1.x padding (``<|endoftext|>``)."""
    import shutil
    import sys
    import types

    from comfyui_lowlight.pipelines.scuf.pipeline import find_clip_tokenizer

    folder = root / "comfy" / "sd1_tokenizer"
    folder.mkdir(parents=True)
    (root / "comfy" / "__init__.py").write_text("")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(base / "tokenizer" / name, folder / name)
    config = json.loads((base / "tokenizer" / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|endoftext|>"  # as ComfyUI ships it (SD 1.x)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    fake_comfy = types.ModuleType("comfy")
    fake_comfy.__file__ = str(root / "comfy" / "__init__.py")
    monkeypatch.setitem(sys.modules, "comfy", fake_comfy)  # restored (or removed) after the test
    return find_clip_tokenizer(str(root / "no-config"))


def test_tokenizer_from_comfyui_install(scuf, tmp_path, monkeypatch):
    """Inside ComfyUI the bundled ``comfy/sd1_tokenizer`` (SD 1.x padding) is used, with SD-Turbo's pad "!"."""
    from transformers import CLIPTokenizer

    from comfyui_lowlight.pipelines.scuf.pipeline import DEFAULT_PROMPT

    tokenizer = _comfyui_install_tokenizer(scuf.base, tmp_path, monkeypatch)
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    ids = tokenizer(DEFAULT_PROMPT, max_length=77, padding="max_length", truncation=True).input_ids
    own = CLIPTokenizer.from_pretrained(scuf.base / "tokenizer")  # the base model's own tokenizer (pad "!")
    assert ids == own(DEFAULT_PROMPT, max_length=77, padding="max_length", truncation=True).input_ids
    end = ids.index(own.eos_token_id)
    assert ids[0] == own.bos_token_id and 2 < end < 76 and ids[end + 1:] == [0] * (76 - end)


@pytest.fixture(scope="module")
def official_scuf():
    """The official fixture (../shared/reference/scuf): skipped without it (failed under ``CI=true``)."""
    return official_fixture()


def test_tokenizer_from_comfyui_install_matches_official_ids(official_scuf, tmp_path, monkeypatch):
    """Same, on the official fixture: the ids of the official tokenizer (golden ``prompt_input_ids``)."""
    import numpy as np

    fixture = official_scuf
    tokenizer = _comfyui_install_tokenizer(fixture.base, tmp_path, monkeypatch)
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    golden = np.load(fixture.root / "golden.npz")
    ids = tokenizer(str(golden["prompt"]), max_length=77, padding="max_length", truncation=True).input_ids
    assert ids == golden["prompt_input_ids"][0].tolist()
