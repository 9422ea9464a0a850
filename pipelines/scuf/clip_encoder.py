"""The CLIP ViT image tower that embeds SCUF's illumination prompt, computed exactly as the official code does.

The official code runs OpenAI CLIP's ``encode_image(x, pos_embedding=False)`` on the 1 - V map repeated to 3
channels: no resize to 224, no mean/std normalisation, **no positional embedding**, patches of the full image
(trailing rows/columns that do not fill a patch are dropped), class token -> ``ln_post`` -> ``proj``, then L2
normalisation. One model class serves every source: a transformers ``CLIPVisionModelWithProjection`` (hub id,
folder or object), or an OpenAI-CLIP-format state dict (``.pt``/``.pth``/``.bin``/``.safetensors``, the official
code's format) converted to it by :func:`clip_vision_from_openai_state_dict`, or a single-file transformers-layout
state dict (ComfyUI's ``models/clip_vision``).
"""

from __future__ import annotations

import os
import zipfile

import torch

from ..weights_files import torch_load_weights

#: OpenAI's ``build_model`` derives the head count from the width (64 channels per head).
OPENAI_HEAD_WIDTH = 64


def _openai_vit_config(width: int, patch: int, grid: int, layers: int, intermediate: int, projection: int):
    """transformers config of an OpenAI CLIP ViT from its tensor shapes: heads = width // 64, QuickGELU, eps 1e-5."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        projection_dim=projection,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // OPENAI_HEAD_WIDTH),
        num_channels=3,
        image_size=patch * grid,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/code/") or "/code/" in name for name in archive.namelist()):
                raise ValueError(
                    f"{path} is a TorchScript archive (like OpenAI's ViT-B-32.pt); it is not loaded because that "
                    "would run TorchScript code. Use the transformers model 'openai/clip-vit-base-patch32' (hub id "
                    "or a local copy of that folder) instead, or a plain state dict saved with "
                    "torch.save(model.state_dict())."
                )
    state_dict = torch_load_weights(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a dict of tensors (CLIP state dict)")
    return state_dict


def clip_vision_from_openai_state_dict(state_dict: dict[str, torch.Tensor], source: str = "state dict"):
    """Build a transformers ``CLIPVisionModelWithProjection`` (float32) from an OpenAI CLIP state dict.

    Only the ``visual.*`` tensors are used. Head count = width // 64 (OpenAI ``build_model``); activation QuickGELU;
    fp16-stored values are upcast to float32, as the official code does on CPU (``model.float()``).
    """
    from transformers import CLIPVisionModelWithProjection

    prefix = "visual."
    required = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_post.weight", "proj"]
    missing = [prefix + k for k in required if prefix + k not in state_dict]
    if missing:
        raise ValueError(f"{source}: not an OpenAI CLIP ViT state dict, missing {missing}")
    sd = {k[len(prefix):]: v.float() for k, v in state_dict.items() if k.startswith(prefix)}
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = int(round((sd["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    config = _openai_vit_config(
        width, patch, grid, layers,
        intermediate=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], projection=sd["proj"].shape[1],
    )
    hf = {
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        "visual_projection.weight": sd["proj"].t().contiguous(),
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        q, k, v = sd[src + "attn.in_proj_weight"].chunk(3, dim=0)
        qb, kb, vb = sd[src + "attn.in_proj_bias"].chunk(3, dim=0)
        for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            hf[f"{dst}self_attn.{name}.weight"] = w.contiguous()
            hf[f"{dst}self_attn.{name}.bias"] = b.contiguous()
        pairs = {
            "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
            "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
        }
        for d, s in pairs.items():
            hf[f"{dst}{d}.weight"] = sd[f"{src}{s}.weight"]
            hf[f"{dst}{d}.bias"] = sd[f"{src}{s}.bias"]
    model = CLIPVisionModelWithProjection(config)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def clip_vision_from_transformers_state_dict(state_dict: dict[str, torch.Tensor], source: str = "state dict"):
    """Build a ``CLIPVisionModelWithProjection`` from a single-file transformers-layout state dict.

    The layout of ComfyUI's ``models/clip_vision`` files and of ``CLIPModel`` checkpoints (``vision_model.*`` +
    ``visual_projection.weight``; text-tower keys are ignored). Head count = width // 64 and QuickGELU, as for
    every OpenAI CLIP ViT.
    """
    from transformers import CLIPVisionModelWithProjection

    sd = {k: v.float() for k, v in state_dict.items() if k.startswith(("vision_model.", "visual_projection."))}
    patch_key = "vision_model.embeddings.patch_embedding.weight"
    if patch_key not in sd or "visual_projection.weight" not in sd:
        raise ValueError(f"{source}: not a CLIP vision state dict, missing {patch_key} / visual_projection.weight")
    width, _, patch, _ = sd[patch_key].shape
    positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    config = _openai_vit_config(
        width, patch, int(round((positions - 1) ** 0.5)), layers,
        intermediate=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        projection=sd["visual_projection.weight"].shape[0],
    )
    model = CLIPVisionModelWithProjection(config)
    model.load_state_dict(sd, strict=False)
    missing = sorted(set(model.state_dict()) - set(sd) - {"vision_model.embeddings.position_ids"})
    if missing:
        raise ValueError(f"{source}: CLIP vision state dict is missing {missing[:10]}")
    return model.eval()


def load_clip_image_encoder(source, local_files_only: bool | None = None):
    """Resolve ``source`` to a ``CLIPVisionModelWithProjection`` (eval mode).

    Args:
        source: a ``CLIPVisionModelWithProjection``; a state-dict file (``.pt``/``.pth``/``.bin``/``.safetensors``) in
            the OpenAI layout (``visual.*``) or the transformers layout (``vision_model.*``, e.g. ComfyUI's
            ``models/clip_vision``); a transformers folder; or a hub id such as ``"openai/clip-vit-base-patch32"``.
        local_files_only: forwarded to ``from_pretrained`` for hub ids/folders.
    """
    from transformers import CLIPVisionModelWithProjection

    if isinstance(source, CLIPVisionModelWithProjection):
        return source.eval()
    if isinstance(source, torch.nn.Module):
        raise TypeError(
            f"image_encoder: expected a transformers CLIPVisionModelWithProjection, got {type(source).__name__}"
        )
    source = os.fspath(source)
    if os.path.isfile(source):
        state_dict = _load_state_dict_file(source)
        if any(k.startswith("vision_model.") for k in state_dict):
            return clip_vision_from_transformers_state_dict(state_dict, source)
        return clip_vision_from_openai_state_dict(state_dict, source)
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, **kwargs).eval()
    except OSError as exc:
        raise OSError(
            f"image_encoder {source!r} could not be loaded. Expected an OpenAI CLIP state-dict file, a transformers "
            "CLIPVisionModelWithProjection folder, or a hub id; download 'openai/clip-vit-base-patch32' "
            "(huggingface-cli download openai/clip-vit-base-patch32) or, in ComfyUI, put ViT-B-32 weights into "
            f"models/clip_vision/. Original error: {exc}"
        ) from exc


def clip_image_embedding(image_encoder, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Official SCUF image embedding: class-token output without positional embedding, L2-normalised.

    Args:
        image_encoder: ``CLIPVisionModelWithProjection``.
        images: ``[B, 3, H, W]`` fed as is (SCUF: 1 - V in 0..1 repeated to 3 channels; no resize, no mean/std).
            Patches cover ``floor(H / p) x floor(W / p)``; images smaller than a patch contribute no patch tokens
            (only the class token; the official code would fail there).
        normalize: divide by the L2 norm (official: yes).
    Returns:
        ``[B, projection_dim]`` in the encoder's dtype.
    """
    hook = getattr(image_encoder, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(image_encoder)
    vision = image_encoder.vision_model
    embeddings = vision.embeddings
    weight = embeddings.patch_embedding.weight
    x = images.to(device=weight.device, dtype=weight.dtype)
    b, _, h, w = x.shape
    p = embeddings.patch_size
    gh, gw = h // p, w // p
    if gh > 0 and gw > 0:
        patches = embeddings.patch_embedding(x[:, :, : gh * p, : gw * p]).flatten(2).transpose(1, 2)
    else:
        patches = x.new_zeros(b, 0, weight.shape[0])
    cls = embeddings.class_embedding.to(x.dtype).expand(b, 1, -1)
    hidden = vision.pre_layrnorm(torch.cat([cls, patches], dim=1))
    hidden = vision.encoder(inputs_embeds=hidden)[0]
    pooled = vision.post_layernorm(hidden[:, 0])
    emb = image_encoder.visual_projection(pooled)
    if normalize:
        emb = emb / emb.norm(dim=-1, keepdim=True)
    return emb
