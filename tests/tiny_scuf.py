"""A tiny, randomly initialised SCUF model made in code, so the SCUF tests run on a clone without ``../shared``.

Same component types, block types and block counts as SD-Turbo (``pipelines/scuf/configs/sd-turbo``); only widths,
heads, layer counts and vocabulary are shrunk, to the sizes of the official conformance fixture
(``../shared/reference/scuf/README.md`` section 3), so the shape-dependent facts of the tests (tensor counts, the
32 attention layers, error messages with shapes) are the same on both. Nothing here is golden: parity with the
official code stays with the shared fixture (tests/test_scuf_parity.py).

Made once per test session (seeded, deterministic) under pytest's base temp folder:

- ``base/``: diffusers folder as ``stabilityai/sd-turbo`` is laid out (UNet, VAE, CLIP text encoder, a byte-level
  BPE CLIP tokenizer learnt on SCUF's two prompts, the shipped scheduler config);
- ``clip_tiny.pt``: an OpenAI-format CLIP state dict (ViT, patch 32, width 64, embed 512; fp16 where OpenAI's
  ``convert_weights`` puts fp16), and ``clip_folder/``: the same as a transformers folder;
- ``scuf_weights.safetensors``: SCUF weights in our format (the pipeline's official initialisation, then every
  trainable tensor moved off its initial value, saved with ``SCUFPipeline.save_scuf_weights``);
- ``scuf_official_tiny.pkl``: the same lighten weights plus a darken and a reflectance VAE in the official GEFU
  checkpoint format (``torch.save`` of plain dicts, the layout of ``pkl_keys.txt``), for the converter;
- ``decomp.pth``: random RetinexNet DecomNet weights in the official key layout;
- ``inputs/img<W>x<H>.png``: dark synthetic test images (the fixture README's recipe, section 9).

Session fixtures: ``tiny_scuf`` (a :class:`SCUFFixture`) and ``tiny_decomnet`` (path of random DecomNet weights).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SEED = 20251204
COMPLETE = ".complete"

#: Tiny sizes (the official fixture's, README section 3).
UNET_SIZES = dict(block_out_channels=[12, 24, 24, 24], attention_head_dim=[2, 4, 4, 4], norm_num_groups=4,
                  cross_attention_dim=32)
VAE_SIZES = dict(block_out_channels=[4, 8, 16, 16], norm_num_groups=2)
TEXT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                  projection_dim=32)
CLIP_WIDTH, CLIP_LAYERS, CLIP_PATCH, CLIP_GRID, CLIP_EMBED = 64, 2, 32, 7, 512
#: The input images of the official fixture, same names and sizes (width x height).
INPUTS = {"img64x64": (64, 64, 1), "img96x80": (96, 80, 2), "img70x50": (70, 50, 3), "img232x120": (232, 120, 4)}


@dataclass(frozen=True)
class SCUFFixture:
    """Paths of one SCUF fixture: the tiny one made here, or the official one in ``../shared/reference/scuf``."""

    root: Path
    base: Path  # diffusers folder laid out as stabilityai/sd-turbo
    clip: Path  # OpenAI-format CLIP state dict
    official: Path  # checkpoint in the official GEFU format (.pkl)
    inputs: Path  # folder of img<W>x<H>.png
    scuf_weights: Path | None = None  # our safetensors format
    clip_folder: Path | None = None  # the CLIP image tower as a transformers folder
    decomnet: Path | None = None  # RetinexNet DecomNet weights (random) for the trainer's reflectance targets

    def input(self, case: str) -> Path:
        return self.inputs / f"{case}.png"

    def image(self, case: str = "img64x64") -> Image.Image:
        with Image.open(self.input(case)) as image:
            return image.convert("RGB")

    def pipeline(self, scuf_weights="official", **kwargs):
        """``SCUFPipeline`` on this fixture; ``scuf_weights``: "official" (the .pkl), "ours", None or a path."""
        from comfyui_lowlight.pipelines import SCUFPipeline

        weights = {"official": self.official, "ours": self.scuf_weights}.get(scuf_weights, scuf_weights)
        pipe = SCUFPipeline.from_pretrained(self.base, image_encoder=self.clip, scuf_weights=weights, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def official_fixture() -> SCUFFixture:
    """The official tiny fixture in ``../shared/reference/scuf`` (golden outputs beside it); the calling test is
    skipped (failed under ``CI=true``) without it."""
    from shared_material import shared_path

    root = shared_path("reference", "scuf")
    return SCUFFixture(root=root, base=root / "base", clip=root / "clip_tiny.pt",
                       official=root / "scuf_official_tiny.pkl", inputs=root / "inputs")


def tiny_fixture(root: Path) -> SCUFFixture:
    return SCUFFixture(root=root, base=root / "base", clip=root / "clip_tiny.pt",
                       official=root / "scuf_official_tiny.pkl", inputs=root / "inputs",
                       scuf_weights=root / "scuf_weights.safetensors", clip_folder=root / "clip_folder",
                       decomnet=root / "decomp.pth")


# ------------------------------------------------------------------------------------------------ images


def low_light_image(width: int, height: int, seed: int) -> Image.Image:
    """A dark, smooth, coloured RGB test image (mean 0.1), as the official fixture's inputs are made."""
    rng = np.random.RandomState(seed)
    coarse = Image.fromarray(rng.randint(0, 256, (5, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = np.asarray(coarse, dtype=np.float64) / 255
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (xx / (9 + seed) + yy / 13))[..., None] * np.array([1.0, 0.6, -0.4])
    mixed = np.clip(0.6 * noise + 0.4 * wave, 0, 1) ** 2
    mixed = np.clip(mixed * 0.1 / mixed.mean(), 0, 1)
    return Image.fromarray(np.round(mixed * 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable character table (the order of CLIP's vocabulary)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(texts: list[str]) -> list[tuple[str, str]]:
    """Greedy byte-pair merges on ``texts`` until every word is one token (ties broken by the pair itself)."""
    words = Counter(w for text in texts for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges = []
    while True:
        pairs = Counter()
        for word, parts in symbols.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, parts in symbols.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            symbols[word] = tuple(out)


def write_tokenizer(folder: Path, shipped: Path) -> int:
    """A valid CLIP byte-level BPE tokenizer (vocab.json + merges.txt) learnt on SCUF's prompts; returns its size.

    Vocabulary order as CLIP's ``SimpleTokenizer``: 256 byte characters ("!" = 0, SD-Turbo's pad), the same with
    ``</w>``, the merges, then ``<|startoftext|>`` and ``<|endoftext|>``. Configs: the shipped SD-Turbo ones.
    """
    from comfyui_lowlight.pipelines.scuf.prompts import DARKEN_PROMPT, DEFAULT_PROMPT

    folder.mkdir(parents=True)
    chars = list(_bytes_to_unicode().values())
    merges = learn_bpe([DEFAULT_PROMPT, DARKEN_PROMPT])
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shipped / "tokenizer" / name, folder / name)
    return len(vocab)


# ------------------------------------------------------------------------------------------------ models


def perturb_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm affines to 1 + N(0, 0.1) / N(0, 0.1), all-zero biases to N(0, 0.02): default inits would hide bugs
    that swap or drop them (the official fixture does the same)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
                sub.weight.copy_(1 + 0.1 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
        for name, param in module.named_parameters():
            if name.endswith("bias") and not param.any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def write_base(folder: Path) -> None:
    """The tiny SD-Turbo-shaped diffusers folder, from the shipped configs with shrunk sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_lowlight.pipelines.scuf.pipeline import shipped_config_dir

    shipped = Path(shipped_config_dir())
    vocab_size = write_tokenizer(folder / "tokenizer", shipped)
    (folder / "scheduler").mkdir(parents=True)
    shutil.copy(shipped / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    generator = torch.Generator().manual_seed(SEED)

    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(shipped / "unet"), **UNET_SIZES})
    perturb_(unet, generator)
    unet.save_pretrained(folder / "unet")

    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL.from_config({**AutoencoderKL.load_config(shipped / "vae"), **VAE_SIZES})
    perturb_(vae, generator)
    vae.save_pretrained(folder / "vae")

    torch.manual_seed(SEED + 3)
    text_config = CLIPTextConfig.from_pretrained(shipped / "text_encoder")
    for key, value in {**TEXT_SIZES, "vocab_size": vocab_size, "bos_token_id": vocab_size - 2,
                       "eos_token_id": vocab_size - 1, "pad_token_id": 0}.items():
        setattr(text_config, key, value)
    text = CLIPTextModel(text_config)
    perturb_(text, generator)
    text.save_pretrained(folder / "text_encoder")

    # the layout of stabilityai/sd-turbo's own model_index.json (a StableDiffusionPipeline folder)
    shipped_index = json.loads((shipped / "model_index.json").read_text())
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": shipped_index["_diffusers_version"],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": True,
             "safety_checker": [None, None]}
    index.update({k: v for k, v in shipped_index.items() if isinstance(v, list) and v[0] is not None})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def openai_clip_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random OpenAI-format CLIP state dict (ViT vision tower + 1-layer text tower), dtypes as ``convert_weights``
    leaves them: fp16 conv/linear/attention weights and projections, fp32 embeddings and LayerNorms."""
    w = CLIP_WIDTH

    def randn(*shape, std=1.0):
        return std * torch.randn(shape, generator=generator)

    def block(prefix):
        return {
            f"{prefix}attn.in_proj_weight": randn(3 * w, w, std=w ** -0.5),
            f"{prefix}attn.in_proj_bias": randn(3 * w, std=0.02),
            f"{prefix}attn.out_proj.weight": randn(w, w, std=w ** -0.5),
            f"{prefix}attn.out_proj.bias": randn(w, std=0.02),
            f"{prefix}ln_1.weight": 1 + randn(w, std=0.1), f"{prefix}ln_1.bias": randn(w, std=0.1),
            f"{prefix}mlp.c_fc.weight": randn(4 * w, w, std=w ** -0.5),
            f"{prefix}mlp.c_fc.bias": randn(4 * w, std=0.02),
            f"{prefix}mlp.c_proj.weight": randn(w, 4 * w, std=(4 * w) ** -0.5),
            f"{prefix}mlp.c_proj.bias": randn(w, std=0.02),
            f"{prefix}ln_2.weight": 1 + randn(w, std=0.1), f"{prefix}ln_2.bias": randn(w, std=0.1),
        }

    sd = {
        "positional_embedding": randn(77, w, std=0.01),
        "text_projection": randn(w, CLIP_EMBED, std=w ** -0.5),
        "logit_scale": torch.tensor(float(np.log(1 / 0.07))),
        "visual.class_embedding": randn(w, std=w ** -0.5),
        "visual.positional_embedding": randn(CLIP_GRID ** 2 + 1, w, std=w ** -0.5),
        "visual.proj": randn(w, CLIP_EMBED, std=w ** -0.5),
        "visual.conv1.weight": randn(w, 3, CLIP_PATCH, CLIP_PATCH, std=0.02),
        "visual.ln_pre.weight": 1 + randn(w, std=0.1), "visual.ln_pre.bias": randn(w, std=0.1),
    }
    for i in range(CLIP_LAYERS):
        sd.update(block(f"visual.transformer.resblocks.{i}."))
    sd.update({"visual.ln_post.weight": 1 + randn(w, std=0.1), "visual.ln_post.bias": randn(w, std=0.1)})
    sd.update(block("transformer.resblocks.0."))
    sd.update({"token_embedding.weight": randn(620, w, std=0.02),
               "ln_final.weight": 1 + randn(w, std=0.1), "ln_final.bias": randn(w, std=0.1)})
    half = re.compile(r"conv1\.weight$|attn\.in_proj_(weight|bias)$|(out_proj|c_fc|c_proj)\.(weight|bias)$"
                      r"|^visual\.proj$|^text_projection$")
    return {k: v.half() if half.search(k) else v for k, v in sd.items()}


def write_decomnet(path: Path, seed: int = SEED) -> Path:
    """Random RetinexNet DecomNet weights in the official ``decomp.pth`` layout (``DecomNet.`` prefix)."""
    from comfyui_lowlight.pipelines.scuf.retinex import DECOMNET_PREFIX, DecomNet

    torch.manual_seed(seed)
    net = DecomNet()
    torch.save({DECOMNET_PREFIX + k: v for k, v in net.state_dict().items()}, path)
    return path


def _move_scuf_vae_tensors_(vae, generator: torch.Generator) -> None:
    """LoRA A ~ N(0, 0.1), LoRA B ~ N(0, 0.05) (PEFT starts B at 0), skip convs ~ N(0, 0.1) (init: 1e-5)."""
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if ".lora_A." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif ".lora_B." in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
            elif name.startswith("decoder.skip_conv_") and name.endswith("base_layer.weight"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def write_scuf_weights(fixture: SCUFFixture) -> None:
    """Our safetensors file and the official-format checkpoint, from the pipeline's own SCUF initialisation."""
    from comfyui_lowlight.pipelines.scuf.modules import DEFAULT_VAE_LORA_TARGETS, CycleAttnProcessor

    pipe = fixture.pipeline(None)
    torch.manual_seed(SEED + 4)
    config = pipe.init_scuf_modules(init="official")
    generator = torch.Generator().manual_seed(SEED + 5)
    _move_scuf_vae_tensors_(pipe.vae, generator)
    layers = dict(pipe.unet.named_modules())
    processors = list(pipe.unet.attn_processors.items())
    with torch.no_grad():
        proj = pipe.image_proj
        proj.proj.weight.copy_(0.05 * torch.randn(proj.proj.weight.shape, generator=generator))
        proj.proj.bias.copy_(0.05 * torch.randn(proj.proj.bias.shape, generator=generator))
        proj.norm.weight.copy_(1 + 0.1 * torch.randn(proj.norm.weight.shape, generator=generator))
        proj.norm.bias.copy_(0.1 * torch.randn(proj.norm.bias.shape, generator=generator))
        for name, proc in processors:
            if isinstance(proc, CycleAttnProcessor):
                layer = layers[name[: -len(".processor")]]
                proc.to_q_ca.weight.copy_(torch.randn(proc.to_q_ca.weight.shape, generator=generator))
                for ours, own in ((proc.to_k_ca, layer.to_k), (proc.to_v_ca, layer.to_v)):
                    ours.weight.copy_(own.weight + 0.05 * torch.randn(own.weight.shape, generator=generator))
    pipe.save_scuf_weights(fixture.scuf_weights)

    # official layout (GEFU src/train.py): whole VAEs (base + LoRA + skip convs) per direction, an index-keyed
    # adapter over all attention processors (self-attention ones have no tensors)
    vaes = {"vae": pipe.vae}
    for name in ("vae_b2a", "vae_ref"):
        vaes[name] = copy.deepcopy(pipe.vae)
        _move_scuf_vae_tensors_(vaes[name], generator)

    def state(*names):
        return {f"{n}.{k}": v.detach().clone() for n in names for k, v in vaes[n].state_dict().items()}

    checkpoint = {
        "rank_vae": config.lora_rank,
        "vae_lora_target_modules": list(DEFAULT_VAE_LORA_TARGETS),
        "sd_vae_enc": state("vae", "vae_b2a"),
        "sd_vae_dec": state("vae", "vae_b2a"),
        "sd_vae_ref": state("vae", "vae_b2a", "vae_ref"),
        "image_proj": {k: v.detach().clone() for k, v in pipe.image_proj.state_dict().items()},
        "ca_adapter": {f"{i}.{k}": v.detach().clone() for i, (_, proc) in enumerate(processors)
                       if isinstance(proc, CycleAttnProcessor) for k, v in proc.state_dict().items()},
    }
    torch.save(checkpoint, fixture.official)


def build_tiny_scuf(root: Path) -> SCUFFixture:
    """Make the tiny fixture in ``root`` (once: a finished folder is reused)."""
    fixture = tiny_fixture(root)
    if (root / COMPLETE).is_file():
        return fixture
    from comfyui_lowlight.pipelines.scuf.clip_encoder import load_clip_image_encoder

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    write_base(fixture.base)
    torch.save(openai_clip_state_dict(torch.Generator().manual_seed(SEED + 6)), fixture.clip)
    load_clip_image_encoder(fixture.clip).save_pretrained(fixture.clip_folder)
    fixture.inputs.mkdir()
    for case, (width, height, seed) in INPUTS.items():
        low_light_image(width, height, seed).save(fixture.input(case))
    write_scuf_weights(fixture)
    write_decomnet(fixture.decomnet)
    (root / COMPLETE).write_text("")
    return fixture


# ------------------------------------------------------------------------------------------------ fixtures
# Test modules import these names (``from tiny_scuf import tiny_scuf``). The files live under the session's base
# temp folder, so however many modules define the fixture, the model is made once per session.


@pytest.fixture(scope="session")
def tiny_scuf(tmp_path_factory) -> SCUFFixture:
    """The tiny SCUF fixture (no ``../shared`` needed)."""
    return build_tiny_scuf(tmp_path_factory.getbasetemp() / "tiny_scuf")


@pytest.fixture(scope="session")
def tiny_decomnet(tmp_path_factory) -> Path:
    """Random RetinexNet DecomNet weights (official key layout)."""
    path = tmp_path_factory.getbasetemp() / "tiny_decomnet" / "decomp.pth"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        write_decomnet(path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return path
