"""SCUF weights: our safetensors format, the official GEFU checkpoint (read safely), and a converter.

Our format (one ``.safetensors`` file, written atomically):

* ``vae.<module>.lora_A.weight`` / ``vae.<module>.lora_B.weight``: the VAE LoRA (PEFT names without the adapter
  name), ``vae.decoder.skip_conv_<k>.weight``: the skip convs (k = 1..4);
* ``image_proj.proj.{weight,bias}``, ``image_proj.norm.{weight,bias}``: the image-prompt projector;
* ``ca_adapter.<attention layer>.to_{q,k,v}_ca.weight``: the cycle-attention adapter, keyed by UNet layer name
  (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``);
* metadata ``format`` = ``comfyui-lowlight/scuf``, ``format_version`` = ``1``, ``scuf_config`` = JSON of
  :class:`~.scuf_modules.SCUFConfig`, ``direction`` (``a2b`` = lighten), optional ``source``.

The official checkpoint (``torch.save`` of a dict by GEFU's ``src/train.py``) is read with
``torch.load(weights_only=True)`` and checked to hold only dicts, lists, strings, numbers and tensors. It holds two
(three) whole VAEs; we take the LoRA and skip-conv tensors of one direction and only check the base tensors' shapes
against the loaded base model (PEFT froze them in training, they equal SD-Turbo's VAE).

Converter: :func:`convert_official_file`, on the command line
``lowlight convert-scuf OFFICIAL.pkl OUT.safetensors``.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..media.atomic_files import atomic_output
from ..weights_files import WeightsFileError, check_weight_tensors, open_safetensors, torch_load_weights
from .modules import VAE_ADAPTER_NAME, SCUFConfig


def shipped_config_dir() -> str:
    """Folder of the SD-Turbo diffusers configs shipped with the package (for offline ``from_single_file``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sd-turbo")

FORMAT_NAME = "comfyui-lowlight/scuf"
FORMAT_VERSION = "1"
#: Official checkpoint top-level keys needed for inference.
OFFICIAL_KEYS = ("rank_vae", "vae_lora_target_modules", "image_proj", "ca_adapter")
OFFICIAL_VAE_PREFIX = {"a2b": "vae.", "b2a": "vae_b2a."}
_SKIP_BASE = re.compile(r"^decoder\.skip_conv_([1-4])\.base_layer\.weight$")
_SKIP_OURS = re.compile(r"^decoder\.skip_conv_([1-4])\.weight$")
_MAX_LISTED = 25


class SCUFWeightsError(ValueError):
    """A SCUF weights file that cannot be used (unsafe, malformed, or made for another base model)."""


class SCUFFileError(SCUFWeightsError, WeightsFileError):
    """The file itself is unusable, whatever the base model: not valid, code inside, non-float or NaN/inf tensors."""


# -------------------------------------------------------------------------------------------- reading


def _check_plain(obj, path: str, where: str = "checkpoint") -> None:
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, int, float, bool)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise SCUFWeightsError(f"{path}: {where} has a key of type {type(key).__name__}; refused")
            _check_plain(value, path, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, path, f"{where}[{i}]")
        return
    raise SCUFWeightsError(
        f"{path}: {where} is a {type(obj).__name__}; only tensors, numbers, strings, lists and dicts are accepted"
    )


def safe_torch_load(path) -> object:
    """``torch.load(path, weights_only=True)`` on CPU, then refuse anything but plain values and tensors.

    Nothing in the pickle is executed: the weights-only unpickler rejects every global that is not a tensor
    type or a plain container, and we raise :class:`SCUFFileError` naming the file and what was blocked.
    """
    path = os.fspath(path)
    obj = torch_load_weights(path, error=SCUFFileError)
    _check_plain(obj, path)
    return obj


def official_unet_layer_names(unet_config: dict | None = None) -> list[str]:
    """Names of the UNet attention layers in ``unet.attn_processors`` order (official ``ca_adapter`` indices).

    Built on the meta device from ``unet_config`` (default: the SD-Turbo UNet config shipped in ``configs/``).
    """
    from diffusers import UNet2DConditionModel

    if unet_config is None:
        unet_config = UNet2DConditionModel.load_config(os.path.join(shipped_config_dir(), "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    return [name[: -len(".processor")] for name in unet.attn_processors]


def convert_official_checkpoint(
    ckpt: dict, direction: str = "a2b", layer_names: list[str] | None = None, path: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], SCUFConfig, dict[str, tuple]]:
    """Official GEFU checkpoint dict -> (our tensors, config, base-VAE tensor shapes).

    Args:
        ckpt: as returned by :func:`safe_torch_load`.
        direction: ``"a2b"`` (lighten, official inference) or ``"b2a"`` (darken).
        layer_names: UNet attention layer names in processor order (``ca_adapter`` index -> name); default
            :func:`official_unet_layer_names`.
    Returns:
        tensors in our format, the :class:`SCUFConfig`, and ``{vae state-dict key: shape}`` of the base tensors
        stored with them (for checking them against the base model).
    """
    if not isinstance(ckpt, dict):
        raise SCUFWeightsError(f"{path}: expected the official checkpoint dict, got {type(ckpt).__name__}")
    missing = [k for k in OFFICIAL_KEYS if k not in ckpt]
    vae_sd = ckpt.get("sd_vae_dec") or ckpt.get("sd_vae_enc")
    if vae_sd is None:
        missing.append("sd_vae_dec/sd_vae_enc")
    if missing:
        raise SCUFWeightsError(
            f"{path}: not an official SCUF (GEFU) checkpoint: missing {missing}; found keys {sorted(ckpt)}"
        )
    if direction not in OFFICIAL_VAE_PREFIX:
        raise ValueError(f"direction: expected 'a2b' (lighten) or 'b2a' (darken), got {direction!r}")
    prefix = OFFICIAL_VAE_PREFIX[direction]
    tensors: dict[str, torch.Tensor] = OrderedDict()
    base_shapes: dict[str, tuple] = {}
    lora_marker = f".{VAE_ADAPTER_NAME}."
    for key, value in vae_sd.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):]
        skip = _SKIP_BASE.match(sub)
        if ".lora_A" + lora_marker in sub or ".lora_B" + lora_marker in sub:
            tensors["vae." + sub.replace(lora_marker, ".")] = value
        elif skip:
            tensors[f"vae.decoder.skip_conv_{skip.group(1)}.weight"] = value
        else:
            base_shapes[sub] = tuple(value.shape)
    if not tensors:
        raise SCUFWeightsError(f"{path}: no '{prefix}' LoRA tensors found for direction {direction!r}")
    for key, value in ckpt["image_proj"].items():
        tensors["image_proj." + key] = value
    names = layer_names if layer_names is not None else official_unet_layer_names()
    for key, value in ckpt["ca_adapter"].items():
        index, _, param = key.partition(".")
        if not index.isdigit() or int(index) >= len(names):
            raise SCUFWeightsError(
                f"{path}: ca_adapter key {key!r} does not match a UNet with {len(names)} attention layers"
            )
        tensors[f"ca_adapter.{names[int(index)]}.{param}"] = value
    proj_w = ckpt["image_proj"]["proj.weight"]
    norm_w = ckpt["image_proj"]["norm.weight"]
    config = SCUFConfig(
        lora_rank=int(ckpt["rank_vae"]),
        lora_alpha=8,  # not stored: the official LoraConfig leaves PEFT's default
        lora_target_modules=list(ckpt["vae_lora_target_modules"]),
        num_image_tokens=proj_w.shape[0] // norm_w.shape[0],
        clip_embedding_dim=proj_w.shape[1],
    )
    return tensors, config, base_shapes


def load_scuf_file(path, direction: str = "a2b", layer_names: list[str] | None = None):
    """Read our ``.safetensors`` or an official checkpoint.

    Raises :class:`SCUFFileError` when the file is not valid safetensors, holds code, or has non-float or NaN/inf
    tensors (naming the file and the tensor).

    Returns:
        ``(tensors, config, base_shapes, metadata)``; ``base_shapes`` is empty for our format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SCUF weights not found: {path}")
    if path.endswith(".safetensors"):
        with open_safetensors(path, error=SCUFFileError) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT_NAME:
                raise SCUFWeightsError(
                    f"{path}: not a SCUF weights file of this project (metadata format={metadata.get('format')!r},"
                    f" expected {FORMAT_NAME!r}); convert official checkpoints with "
                    "`lowlight convert-scuf`"
                )
            if metadata.get("format_version") != FORMAT_VERSION:
                raise SCUFWeightsError(
                    f"{path}: format_version {metadata.get('format_version')!r} is not supported "
                    f"(expected {FORMAT_VERSION})"
                )
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
        check_weight_tensors(path, tensors, error=SCUFFileError)
        return tensors, SCUFConfig.from_json(metadata["scuf_config"]), {}, metadata
    ckpt = safe_torch_load(path)
    tensors, config, base_shapes = convert_official_checkpoint(ckpt, direction, layer_names, path)
    check_weight_tensors(path, tensors, error=SCUFFileError)
    return tensors, config, base_shapes, {"direction": direction, "source": os.path.basename(path)}


@dataclass(frozen=True)
class SCUFWeightsFile:
    """SCUF weights read from one file (:func:`read_scuf_weights`), in our key format, on the CPU.

    ``base_shapes``: ``{vae key: shape}`` of the base tensors an official checkpoint stores (empty for ours), checked
    against the base model when the weights are attached.
    """

    path: str
    tensors: dict = field(repr=False)
    config: SCUFConfig
    base_shapes: dict = field(repr=False)
    metadata: dict


def read_scuf_weights(path, direction: str = "a2b", layer_names: list[str] | None = None) -> SCUFWeightsFile:
    """:func:`load_scuf_file` as one value, for attaching later (``SCUFPipeline.load_scuf_weights``)."""
    tensors, config, base_shapes, metadata = load_scuf_file(path, direction, layer_names)
    return SCUFWeightsFile(os.fspath(path), tensors, config, base_shapes, metadata)


def save_scuf_file(path, tensors: dict[str, torch.Tensor], config: SCUFConfig, direction: str = "a2b",
                   source: str | None = None) -> None:
    """Write ``tensors`` in our format, atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "scuf_config": config.to_json(),
        "direction": direction,
    }
    if source:
        metadata["source"] = source
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_output(path) as temporary:
        save_file(data, str(temporary), metadata=metadata)


# ------------------------------------------------------------------------------- modules <-> our keys


def scuf_parameters(vae, image_proj, unet) -> dict[str, torch.Tensor]:
    """``{our key: live parameter}`` of the SCUF modules attached to ``vae``/``unet`` and the projector."""
    from .modules import cycle_attn_processors

    params: dict[str, torch.Tensor] = OrderedDict()
    lora_marker = f".{VAE_ADAPTER_NAME}."
    for key, value in vae.state_dict(keep_vars=True).items():
        skip = _SKIP_BASE.match(key)
        if lora_marker in key and (".lora_A." in key or ".lora_B." in key):
            params["vae." + key.replace(lora_marker, ".")] = value
        elif skip:
            params[f"vae.decoder.skip_conv_{skip.group(1)}.weight"] = value
    if image_proj is not None:
        for key, value in image_proj.state_dict(keep_vars=True).items():
            params["image_proj." + key] = value
    for layer, proc in cycle_attn_processors(unet).items():
        for key, value in proc.state_dict(keep_vars=True).items():
            params[f"ca_adapter.{layer}.{key}"] = value
    return params


def _listing(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "\n  " + "\n  ".join(shown) + more


def check_compatible(path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                     base_shapes: dict[str, tuple] | None = None, vae_state: dict | None = None) -> None:
    """Raise :class:`SCUFWeightsError` listing missing/unexpected keys and shape mismatches."""
    problems = []
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = []
    if base_shapes and vae_state is not None:
        # base tensors first: they say most directly that the checkpoint belongs to another base model
        shapes += [
            f"vae.{k}: file {shape} vs base VAE {tuple(vae_state[k].shape) if k in vae_state else 'absent'}"
            for k, shape in base_shapes.items()
            if k not in vae_state or tuple(vae_state[k].shape) != shape
        ]
    shapes += [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing:
        problems.append(f"missing {len(missing)} key(s):" + _listing(missing))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s):" + _listing(unexpected))
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es):" + _listing(shapes))
    if problems:
        raise SCUFWeightsError(
            f"{path}: SCUF weights do not fit this base model (made for a different SD-Turbo/VAE/UNet, or a "
            "different LoRA configuration):\n" + "\n".join(problems)
        )


def copy_into(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy file tensors into the live parameters (cast to each parameter's dtype/device)."""
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))


# ------------------------------------------------------------------------------------------------ converter


def convert_official_file(official, output, direction: str = "a2b", unet_config=None) -> str:
    """Convert the official checkpoint ``official`` (one ``direction``) into our file ``output``; returns a summary.

    ``unet_config``: the base model's UNet ``config.json`` (or its folder) when it is not SD-Turbo's.
    """
    layer_names = None
    if unet_config:
        from diffusers import UNet2DConditionModel

        if os.path.isfile(unet_config):
            unet_config = os.path.dirname(os.path.abspath(unet_config))
        layer_names = official_unet_layer_names(UNet2DConditionModel.load_config(unet_config))
    tensors, config, _, _ = load_scuf_file(official, direction, layer_names)
    save_scuf_file(output, tensors, config, direction, source=os.path.basename(official))
    return f"wrote {output}: {len(tensors)} tensors, direction {direction}, {config.to_json()}"
