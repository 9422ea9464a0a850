"""SCUF building blocks on top of an SD-Turbo VAE/UNet (paper sec. 3.1, official GEFU code).

* VAE: encoder-to-decoder skip connections (four 1x1 convs, scaled by ``gamma``) plus a PEFT LoRA adapter named
  ``"vae_skip"`` on the VAE convs/attention projections and on the skip convs themselves
  (:func:`add_scuf_vae_modules`, :func:`encode_with_skips`, :func:`decode_with_skips`).
* :class:`ImagePromptProjector`: the CLIP image embedding of the 1 - V illumination prompt -> ``num_tokens``
  tokens of the UNet cross-attention width (Linear + LayerNorm).
* :class:`CycleAttnProcessor`: the cycle-attention adapter on every UNet cross-attention layer: text
  cross-attention + ``adapter_scale`` x (eq. 2: image-prompt queries attend to the UNet features; eq. 3: those
  responses, through the layer's own ``to_q``, attend to the image-prompt tokens), plus the official code's
  unconditional residual.

All functions are dtype/device agnostic; module state-dict names equal the official checkpoint's (without its
``vae.`` / ``<index>.`` prefixes), so official weights load by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

#: PEFT adapter name used by the official code (state-dict keys ``*.lora_A.vae_skip.weight``).
VAE_ADAPTER_NAME = "vae_skip"
#: ``vae_lora_target_modules`` of the official ``initialize_vae`` (PEFT: exact name or dotted suffix match).
DEFAULT_VAE_LORA_TARGETS = (
    "conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
    "skip_conv_1", "skip_conv_2", "skip_conv_3", "skip_conv_4",
    "to_k", "to_q", "to_v", "to_out.0",
)
DEFAULT_LORA_RANK = 4
#: PEFT's default ``lora_alpha``; the official code leaves it unset, so scaling = 8 / 4 = 2.
DEFAULT_LORA_ALPHA = 8
#: Official initial skip-conv weight (``torch.nn.init.constant_(..., 1e-5)``): skips start almost closed.
SKIP_CONV_INIT = 1e-5
DEFAULT_NUM_IMAGE_TOKENS = 4
#: ``clip_embeddings_dim`` hard-coded by the official adapter (CLIP ViT-B/32 embedding width).
DEFAULT_CLIP_EMBEDDING_DIM = 512




@dataclass
class SCUFConfig:
    """Hyper-parameters that fix the shapes of the SCUF modules (stored in our weights file's metadata)."""

    lora_rank: int = DEFAULT_LORA_RANK
    lora_alpha: float = DEFAULT_LORA_ALPHA
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_VAE_LORA_TARGETS))
    num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS
    clip_embedding_dim: int = DEFAULT_CLIP_EMBEDDING_DIM
    skip_gamma: float = 1.0

    def __post_init__(self):
        # order is irrelevant to PEFT's matching (and PEFT keeps a set): normalise for comparisons
        self.lora_target_modules = sorted(set(self.lora_target_modules))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SCUFConfig":
        data = json.loads(text)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown SCUF config fields {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------- VAE


def skip_conv_channels(block_out_channels) -> list[tuple[int, int]]:
    """``(in, out)`` of ``skip_conv_1..4`` for VAE widths ``C`` = (C0, C1, C2, C3).

    skip_conv_k feeds the encoder activation entering down block ``4 - k`` into decoder up block ``k - 1``:
    (C2 -> C3), (C1 -> C3), (C0 -> C2), (C0 -> C1); for SD-Turbo (128, 256, 512, 512) these are the official
    hard-coded 512->512, 256->512, 128->512, 128->256.
    """
    c = list(block_out_channels)
    if len(c) != 4:
        raise ValueError(f"SCUF skip connections need a 4-level VAE, got block_out_channels={c}")
    return [(c[2], c[3]), (c[1], c[3]), (c[0], c[2]), (c[0], c[1])]


def has_scuf_vae_modules(vae) -> bool:
    """True if :func:`add_scuf_vae_modules` was applied to ``vae``."""
    return hasattr(vae.decoder, "skip_conv_1") and VAE_ADAPTER_NAME in getattr(vae, "peft_config", {})


def add_scuf_vae_modules(
    vae,
    rank: int = DEFAULT_LORA_RANK,
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    target_modules=DEFAULT_VAE_LORA_TARGETS,
    skip_init: float | None = SKIP_CONV_INIT,
    init_lora_weights="gaussian",
):
    """Add the skip convs and the ``"vae_skip"`` LoRA adapter to a diffusers ``AutoencoderKL``, in place.

    Same order as the official ``initialize_vae`` (skip convs first, so that they get LoRA too). Base weights are
    left as they are (callers that train freeze them: ``vae.requires_grad_(False)`` then
    :func:`scuf_vae_trainable_parameters`).

    Args:
        vae: ``AutoencoderKL`` with 4 blocks.
        rank, lora_alpha: LoRA rank and alpha (scaling = alpha / rank).
        target_modules: PEFT target names.
        skip_init: constant initial skip-conv weight (``None`` keeps PyTorch's default init).
        init_lora_weights: PEFT LoRA init (``"gaussian"`` as the official code; ``lora_B`` starts at 0 anyway).
    Returns:
        ``vae`` (same object).
    """
    from peft import LoraConfig

    if has_scuf_vae_modules(vae):
        raise ValueError("the VAE already has SCUF skip convs and the 'vae_skip' LoRA adapter")
    ref = next(vae.parameters())
    for k, (c_in, c_out) in enumerate(skip_conv_channels(vae.config.block_out_channels), start=1):
        conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False, device=ref.device, dtype=ref.dtype)
        if skip_init is not None:
            nn.init.constant_(conv.weight, skip_init)
        setattr(vae.decoder, f"skip_conv_{k}", conv)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=lora_alpha,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )
    vae.add_adapter(config, adapter_name=VAE_ADAPTER_NAME)
    return vae


def scuf_config_from_modules(vae, unet, image_proj) -> SCUFConfig | None:
    """The :class:`SCUFConfig` of modules already attached (None if any part is missing)."""
    procs = cycle_attn_processors(unet)
    if image_proj is None or not procs or not has_scuf_vae_modules(vae):
        return None
    lora = vae.peft_config[VAE_ADAPTER_NAME]
    return SCUFConfig(
        lora_rank=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_target_modules=list(lora.target_modules),
        num_image_tokens=next(iter(procs.values())).num_tokens,
        clip_embedding_dim=image_proj.config.clip_embedding_dim,
    )


def scuf_vae_trainable_parameters(vae, include_skip_base: bool = True) -> list[nn.Parameter]:
    """The tensors SCUF trains in a VAE: every LoRA A/B and (by default) the skip-conv base weights.

    The official optimiser lists the skip-conv base weights too, but PEFT's ``add_adapter`` had already frozen them
    (``requires_grad=False``), so official training leaves them at 1e-5 and trains only their LoRA;
    ``include_skip_base=False`` reproduces that.
    """
    params = [p for n, p in vae.named_parameters() if "lora_" in n and f".{VAE_ADAPTER_NAME}." in n]
    if not include_skip_base:
        return params
    for k in range(1, 5):
        conv = getattr(vae.decoder, f"skip_conv_{k}")
        params.append(conv.base_layer.weight if hasattr(conv, "base_layer") else conv.weight)
    return params


def run_offload_hook(module) -> None:
    # Mirrors diffusers' ``apply_forward_hook``: these functions bypass ``vae.encode``/``decode``, so they must
    # trigger an ``enable_model_cpu_offload`` hook themselves.
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


def encode_with_skips(vae, image: torch.Tensor) -> tuple[DiagonalGaussianDistribution, list[torch.Tensor]]:
    """Encode and keep the input of every encoder down block (official ``my_vae_encoder_fwd``).

    Args:
        vae: ``AutoencoderKL`` (with or without SCUF modules).
        image: ``[B, 3, H, W]`` in -1..1, H and W multiples of 8.
    Returns:
        the posterior (unscaled latents ``[B, 4, H/8, W/8]``) and the four skip activations
        ``[conv_in out (C0, H), down0 out (C0, H/2), down1 out (C1, H/4), down2 out (C2, H/8)]``.
    """
    run_offload_hook(vae)
    enc = vae.encoder
    h = enc.conv_in(image)
    skips = []
    for block in enc.down_blocks:
        skips.append(h)
        h = block(h)
    h = enc.mid_block(h)
    h = enc.conv_act(enc.conv_norm_out(h))
    h = enc.conv_out(h)
    if getattr(vae, "quant_conv", None) is not None:
        h = vae.quant_conv(h)
    return DiagonalGaussianDistribution(h), skips


def decode_with_skips(vae, latents: torch.Tensor, skips: list[torch.Tensor] | None, gamma: float = 1.0):
    """Decode unscaled latents, adding ``skip_conv_k(skip * gamma)`` before each up block (official decoder).

    Args:
        vae: ``AutoencoderKL`` with SCUF skip convs (unless ``skips`` is None).
        latents: ``[B, 4, h, w]`` unscaled (already divided by the scaling factor).
        skips: the list from :func:`encode_with_skips` of the same image, or None for a plain decode.
        gamma: skip strength (official: 1).
    Returns:
        ``[B, 3, 8h, 8w]`` image, not clamped.
    """
    run_offload_hook(vae)
    dec = vae.decoder
    if getattr(vae, "post_quant_conv", None) is not None:
        latents = vae.post_quant_conv(latents)
    h = dec.conv_in(latents)
    upscale_dtype = next(iter(dec.up_blocks.parameters())).dtype
    h = dec.mid_block(h, None).to(upscale_dtype)
    if skips is None:
        for block in dec.up_blocks:
            h = block(h, None)
    else:
        if len(skips) != len(dec.up_blocks):
            raise ValueError(f"skips: expected {len(dec.up_blocks)} activations, got {len(skips)}")
        skip_convs = [getattr(dec, f"skip_conv_{k}") for k in range(1, 5)]
        for conv, skip, block in zip(skip_convs, reversed(skips), dec.up_blocks):
            h = h + conv(skip * gamma)
            h = block(h, None)
    h = dec.conv_act(dec.conv_norm_out(h))
    return dec.conv_out(h)


# ------------------------------------------------------------------------------------------ the one step


def x0_from_noise(latents: torch.Tensor, noise_pred: torch.Tensor, alphas_cumprod: torch.Tensor,
                  timestep: int) -> torch.Tensor:
    """The clean latent predicted from the UNet's noise: ``x0 = (z - sqrt(1 - a_t) eps) / sqrt(a_t)``, float32.

    What the official ``DDPMScheduler.step`` at ``timestep`` = 999 with one trailing step returns (previous alpha
    = 1). ``latents``, ``noise_pred``: ``[B, 4, h, w]`` (scaled latents); ``alphas_cumprod``: the scheduler's.
    """
    alpha = alphas_cumprod[timestep].to(device=latents.device, dtype=torch.float32)
    return (latents.float() - (1 - alpha) ** 0.5 * noise_pred.float()) / alpha ** 0.5


def unet_x0(unet, scheduler, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``U(z, c)`` of the paper: one UNet step at the last training timestep -> x0 ``[B, 4, h, w]`` float32.

    ``latents``: scaled encoder latents ``[B, 4, h, w]``; ``context``: ``[B, T, D]`` text (+ image-prompt) tokens.
    """
    timestep = scheduler.config.num_train_timesteps - 1
    t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
    eps = unet(latents.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample
    return x0_from_noise(latents, eps, scheduler.alphas_cumprod, timestep)


@dataclass
class OneStepOutput:
    """One SCUF pass. ``image``: ``[B, 3, H, W]`` clamped to -1..1 (the VAE's dtype); ``latent``: x0 ``[B, 4, h, w]``
    float32 (scaled); ``encoded``: the scaled encoder latent the UNet saw; ``skips``: the encoder activations."""

    image: torch.Tensor
    latent: torch.Tensor
    encoded: torch.Tensor
    skips: list


def scuf_one_step(vae, unet, scheduler, x: torch.Tensor, context: torch.Tensor, skip_gamma: float = 1.0,
                  noise: torch.Tensor | torch.Generator | None = None) -> OneStepOutput:
    """SCUF's generator ``D(U(E(x), c))`` (paper Algorithm 1): VAE encoder with skips, one UNet step, skip decoder.

    Args:
        vae: ``AutoencoderKL`` with SCUF modules (the direction's encoder/decoder LoRA and skip convs).
        unet: ``UNet2DConditionModel`` with the cycle-attention adapter.
        scheduler: SD-Turbo's (``alphas_cumprod``, ``num_train_timesteps``).
        x: ``[B, 3, H, W]`` in -1..1, H and W multiples of 8.
        context: ``[B, T, D]`` text embedding followed by the image-prompt tokens.
        skip_gamma: skip strength (:attr:`SCUFConfig.skip_gamma`).
        noise: None = posterior mean; a ``[B, 4, H / 8, W / 8]`` standard-normal tensor or a generator (drawn in
            the posterior's dtype) = a posterior sample, as the official code.
    """
    vae_dtype = next(vae.parameters()).dtype
    posterior, skips = encode_with_skips(vae, x.to(vae_dtype))
    if isinstance(noise, torch.Generator):
        noise = torch.randn(posterior.mean.shape, generator=noise, device=posterior.mean.device,
                            dtype=posterior.mean.dtype)
    latents = posterior.mean if noise is None else posterior.mean + posterior.std * noise
    scaling = vae.config.scaling_factor
    latents = latents * scaling
    x0 = unet_x0(unet, scheduler, latents, context)
    image = decode_with_skips(vae, (x0 / scaling).to(vae_dtype), skips, skip_gamma).clamp(-1, 1)
    return OneStepOutput(image, x0, latents, skips)


# ---------------------------------------------------------------------------------------------- projector


class ImagePromptProjector(ModelMixin, ConfigMixin):
    """CLIP image embedding -> ``num_tokens`` image-prompt tokens (official ``ProjModel``).

    ``[B, clip_embedding_dim]`` -> Linear -> ``[B, num_tokens, cross_attention_dim]`` -> LayerNorm.
    """

    @register_to_config
    def __init__(
        self,
        cross_attention_dim: int = 1024,
        clip_embedding_dim: int = DEFAULT_CLIP_EMBEDDING_DIM,
        num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
    ):
        super().__init__()
        self.proj = nn.Linear(clip_embedding_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(
            -1, self.config.num_tokens, self.config.cross_attention_dim
        )
        return self.norm(tokens)


# ---------------------------------------------------------------------------------------- cycle attention

_INDEX_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def cycle_query_indices(num_rows: int, num_tokens: int, device=None) -> torch.Tensor:
    """Indices ``torch.linspace(0, num_rows - 1, num_tokens).long()`` as the official code computes them.

    The float32 linspace is truncated, which is not always ``floor(i * (D-1) / (N-1))`` (fixture README 8.7).
    Computed per element (``i * step`` in the first half, ``end - (N-1-i) * step`` in the second, float32, on the
    CPU), which gives the same integers on every device; int64 ``[num_tokens]`` on ``device`` (cached).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    key = (num_rows, num_tokens, str(device))
    cached = _INDEX_CACHE.get(key)
    if cached is not None:
        return cached
    if num_tokens == 1:
        idx = torch.zeros(1, dtype=torch.long)
    else:
        end = torch.tensor(float(num_rows - 1), dtype=torch.float32)
        step = end / torch.tensor(float(num_tokens - 1), dtype=torch.float32)
        i = torch.arange(num_tokens, dtype=torch.float32)
        half = num_tokens // 2
        values = torch.where(i < half, i * step, end - (num_tokens - 1 - i) * step)
        idx = values.long()
    idx = idx.to(device)
    _INDEX_CACHE[key] = idx
    return idx


def distinct_query_rows(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows, repeats)`` with ``rows[repeats] == idx`` for the sorted indices of :func:`cycle_query_indices`:
    ``rows`` its distinct values; ``(idx, None)`` when there are no duplicates."""
    rows, repeats = torch.unique_consecutive(idx, return_inverse=True)
    return (idx, None) if rows.numel() == idx.numel() else (rows, repeats)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class CycleAttnProcessor(nn.Module):
    """Cross-attention processor with the cycle-attention adapter (official ``CAAttnProcessor2_0``).

    ``encoder_hidden_states`` = ``[B, T + num_tokens, D]``: text tokens then the projected image-prompt tokens.
    For normalised block input ``hs`` ``[B, N, Cb]`` (heads ``nh``):

    * ``o1 = Attn(to_q(hs), to_k(text), to_v(text))``: the layer's own text cross-attention;
    * eq. 2: ``q = to_q_ca(img^T)`` ``[B, D, Cb]``, rows picked by :func:`cycle_query_indices` -> ``[B, N, Cb]``;
      ``z_f = Attn(q, hs, hs)``;
    * eq. 3: ``o2 = Attn(to_q(z_f), to_k_ca(img), to_v_ca(img))``;
    * ``out = to_out(o1 + scale * o2) + hs``. The ``+ hs`` is unconditional in the official code (the model was
      trained with it); ``scale`` (attribute, default 1 = official) weighs only the image-prompt branch, so 0 gives
      the text-only cross-attention the adapter was trained around.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
                 scale: float = 1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.scale = scale
        self.to_q_ca = nn.Linear(num_tokens, hidden_size, bias=False)
        self.to_k_ca = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ca = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CycleAttnProcessor is for cross-attention layers: encoder_hidden_states is required")
        if encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens; expected text tokens followed "
                f"by {self.num_tokens} image-prompt tokens"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
            residual = hidden_states
        batch_size = encoder_hidden_states.shape[0]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        text = encoder_hidden_states[:, : -self.num_tokens]
        image_tokens = encoder_hidden_states[:, -self.num_tokens:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        heads = attn.heads

        # text cross-attention (the layer's own projections)
        query = attn.to_q(hidden_states)
        out = F.scaled_dot_product_attention(
            _heads(query, heads), _heads(attn.to_k(text), heads), _heads(attn.to_v(text), heads),
            attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
        )
        out = _merge(out).to(query.dtype)

        if self.scale != 0:
            # eq. 2: image-prompt queries over the UNet features (keys = values = the normalised block input)
            q_img = self.to_q_ca(image_tokens.transpose(1, 2))  # [B, D, Cb]
            idx = cycle_query_indices(q_img.shape[1], residual.shape[1], q_img.device)
            repeats = None
            if q_img.device.type == "cpu":
                # with more UNet tokens than rows (N > D: 4096 vs 1024 at 512 px) the picked query rows repeat, and
                # so do their attention outputs: eqs. 2 and 3 run once per distinct row, then the rows are repeated
                idx, repeats = distinct_query_rows(idx)
            q_img = q_img[:, idx, :]
            z_f = F.scaled_dot_product_attention(
                _heads(q_img, heads), _heads(residual, heads), _heads(residual, heads), dropout_p=0.0, is_causal=False,
            )
            z_f = _merge(z_f).to(query.dtype)
            # eq. 3: the responses query the image-prompt tokens
            z_n = F.scaled_dot_product_attention(
                _heads(attn.to_q(z_f), heads), _heads(self.to_k_ca(image_tokens), heads),
                _heads(self.to_v_ca(image_tokens), heads), dropout_p=0.0, is_causal=False,
            )
            z_n = _merge(z_n).to(query.dtype)
            if repeats is not None:
                z_n = z_n[:, repeats, :]
            out = out + z_n if self.scale == 1 else out + self.scale * z_n

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, height, width)
            residual = residual.transpose(-1, -2).reshape(b, c, height, width)
        out = out + residual
        return out / attn.rescale_output_factor


def _hidden_size(unet, processor_name: str) -> int:
    channels = list(unet.config.block_out_channels)
    if processor_name.startswith("mid_block"):
        return channels[-1]
    if processor_name.startswith("up_blocks"):
        return list(reversed(channels))[int(processor_name.split(".")[1])]
    if processor_name.startswith("down_blocks"):
        return channels[int(processor_name.split(".")[1])]
    raise ValueError(f"unexpected attention layer {processor_name!r}")


def is_cross_attention(processor_name: str) -> bool:
    """SD UNet convention: ``attn2`` layers are the text cross-attention."""
    return processor_name.endswith("attn2.processor")


def add_cycle_attn_processors(unet, num_tokens: int = DEFAULT_NUM_IMAGE_TOKENS, init: str = "official"):
    """Install a :class:`CycleAttnProcessor` on every cross-attention layer of ``unet`` (in place).

    Self-attention layers get diffusers' ``AttnProcessor2_0`` (as the official code).

    Args:
        unet: ``UNet2DConditionModel``.
        num_tokens: image-prompt tokens.
        init: ``"official"`` (as the official training: ``to_q_ca`` ~ N(0, 1), ``to_k_ca``/``to_v_ca`` copies of the
            layer's ``to_k``/``to_v``) or ``"none"`` (PyTorch default init, for loading weights right after).
    Returns:
        ``{layer name (without ".processor"): processor}`` in ``unet.attn_processors`` order.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref = next(unet.parameters())
    cross_dim = unet.config.cross_attention_dim
    processors, adapters = {}, {}
    attn_layers = dict(unet.named_modules())
    for name in unet.attn_processors:
        if not is_cross_attention(name):
            processors[name] = AttnProcessor2_0()
            continue
        proc = CycleAttnProcessor(_hidden_size(unet, name), cross_dim, num_tokens).to(ref.device, ref.dtype)
        if init == "official":
            layer = attn_layers[name[: -len(".processor")]]
            with torch.no_grad():
                proc.to_q_ca.weight.normal_()
                proc.to_k_ca.weight.copy_(layer.to_k.weight)
                proc.to_v_ca.weight.copy_(layer.to_v.weight)
        elif init != "none":
            raise ValueError(f"init: expected 'official' or 'none', got {init!r}")
        processors[name] = proc
        adapters[name[: -len(".processor")]] = proc
    unet.set_attn_processor(processors)
    return adapters


def cycle_attn_processors(unet) -> dict[str, CycleAttnProcessor]:
    """``{layer name: CycleAttnProcessor}`` of ``unet`` in ``unet.attn_processors`` order (empty if none)."""
    return {
        name[: -len(".processor")]: proc
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, CycleAttnProcessor)
    }


def set_adapter_scale(unet, scale: float) -> None:
    """Weight of the image-prompt branch in every :class:`CycleAttnProcessor` (0 = text only, 1 = official)."""
    if not math.isfinite(scale):
        raise ValueError(f"adapter_scale must be finite, got {scale}")
    for proc in cycle_attn_processors(unet).values():
        proc.scale = float(scale)
