"""SCUF unsupervised fine-tuning: cycle generation, losses, CLIP discriminators, reflectance decoder (paper sec. 3-4).

The math and the update order of one training iteration, shared by ``pipelines/scuf/trainer.py`` (data, accelerate, the loop,
checkpoints) and the tests. Notation:
``low`` = domain A (low-light), ``normal`` = domain B; ``a2b`` = lighten (``pipe.vae``, the direction our
inference weights hold), ``b2a`` = darken (its own VAE copy). One generator pass of direction ``d`` is
(:meth:`SCUFCycleModel.translate`; the first three lines are :func:`~.scuf_modules.scuf_one_step`, the forward
``SCUFPipeline`` runs)::

    skips, z = E_d(x)                      # VAE encoder with LoRA_d, posterior *sample* (official training)
    x0 = x0_from_noise(z, UNet(z, 999, [text_d ; projector(CLIP(image prompt))]))   # cycle-attention adapter
    y  = D_d(x0, skips).clamp(-1, 1)       # VAE decoder with LoRA_d and skip convs
    R  = sigmoid(D_ref(x0, skips))         # reflectance decoder (a third VAE decoder with its own LoRA/skips)

Image prompts follow the paper's Algorithm 1 (= official ``train.py``): the first pass of a cycle uses 1 - V of its
input, the second pass uses V of the *original* image; identity passes use V of their input.

One iteration (:func:`training_iteration`) = the official sequence of updates (each its own backward, gradient clip
and optimizer step, which keeps peak memory at about two generator passes): cycle from low, cycle from normal, generator GAN, identity, then
the discriminators on fakes and on reals. Losses (weights in :class:`LossWeights`):

* cycle: L1 (+ LPIPS when available) between the input and its reconstruction;
* caption consistency (when captions are given): ``1 - cos`` over latent channels between the second-pass UNet
  output and the plain (adapter-free) UNet's output for the caption prompt on the same encoder latent
  (paper eq. 4; the plain UNet shares the frozen weights, see :func:`plain_unet_twin`);
* reflectance consistency: ``L1 + (1 - SSIM)`` between the second pass's R and the Retinex reflectance of the input,
  plus ``MSE(R_first, R_second.detach())`` (paper eq. 5; official ``enhance_loss``);
* identity: L1 (+ LPIPS) of translating an image already in the target domain, with its caption and reflectance
  terms (paper eq. 7), weighted by ``lambda_idt``;
* GAN: vision-aided discriminators on frozen CLIP features (:class:`CLIPDiscriminatorHeads`), non-saturating
  sigmoid loss summed over feature levels, weighted by ``lambda_gan``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .clip_encoder import clip_image_embedding
from ..media.illumination import inverted_value_channel, value_channel
from .modules import (
    decode_with_skips,
    encode_with_skips,
    scuf_one_step,
    scuf_vae_trainable_parameters,
    unet_x0,
)

#: CLIP's image normalisation (the discriminator features use the standard CLIP preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LossWeights:
    """Loss weights. Defaults: paper appendix A (``lambda_idt`` 0.5, ``lambda_gan`` 1) and the official LPIPS weights."""

    lambda_cycle: float = 1.0
    lambda_cycle_lpips: float = 10.0
    lambda_idt: float = 0.5
    lambda_idt_lpips: float = 1.0
    lambda_gan: float = 1.0
    lambda_caption: float = 1.0
    lambda_reflectance: float = 1.0


# ------------------------------------------------------------------------------------------------ losses


def cosine_consistency_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - mean(cos)`` over dim 1 (official caption loss on ``[B, 4, h, w]`` latents)."""
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-7).mean()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of ``[B, C, H, W]`` images (Gaussian window, valid region only).

    The window shrinks to the largest odd size that fits images smaller than ``window``.
    """
    window = min(window, x.shape[-1], x.shape[-2])
    window -= 1 - window % 2
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    c = x.shape[1]
    kx, ky = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


def reflectance_target_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L1 + (1 - SSIM)`` of a predicted reflectance against the Retinex one (both ``[B, 3, H, W]`` in 0..1)."""
    return F.l1_loss(pred, target) + (1.0 - ssim(pred, target))


def gan_generator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating sigmoid loss pushing every level's logit ``[B, L]`` towards "real", summed over levels."""
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").sum(1).mean()


def gan_discriminator_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Sigmoid loss of discriminator logits ``[B, L]`` for real or fake inputs, summed over levels."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


# --------------------------------------------------------------------------------------------- discriminator


def clip_levels(num_layers: int, num_levels: int) -> list[int]:
    """Hidden-state indices (1..num_layers) of ``num_levels`` evenly spaced transformer layers, the last included."""
    num_levels = max(1, min(num_levels, num_layers))
    return sorted({round(num_layers * (i + 1) / num_levels) for i in range(num_levels)})


def clip_discriminator_features(image_encoder, images: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """Frozen CLIP ViT features for the discriminators.

    Args:
        image_encoder: ``CLIPVisionModelWithProjection`` (frozen; gradients still flow to ``images``).
        images: ``[B, 3, H, W]`` in -1..1.
        levels: hidden-state indices from :func:`clip_levels`.
    Returns:
        ``[B, len(levels), 2 * width]``: per level the class token and the mean patch token after ``post_layernorm``.
    """
    vision = image_encoder.vision_model
    size = image_encoder.config.image_size
    weight = vision.embeddings.patch_embedding.weight
    x = (images.to(weight.dtype) * 0.5 + 0.5).clamp(0, 1)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    hidden = vision(pixel_values=(x - mean) / std, output_hidden_states=True).hidden_states
    feats = []
    for i in levels:
        h = vision.post_layernorm(hidden[i])
        feats.append(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1))
    return torch.stack(feats, dim=1)


class CLIPDiscriminatorHeads(nn.Module):
    """Vision-aided GAN discriminator (Kumari et al., CVPR 2022) heads on frozen CLIP features.

    One small MLP per feature level: ``[B, L, F]`` -> logits ``[B, L]``. The CLIP backbone is shared with the
    pipeline and frozen; only these heads train.
    """

    def __init__(self, num_levels: int, feature_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, 1))
            for _ in range(num_levels)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)


# ----------------------------------------------------------------------------------------------- modules


def plain_unet_twin(unet):
    """A UNet with default attention processors sharing ``unet``'s (frozen) weight tensors: no extra memory.

    Plays the official ``unet_distill`` (a copy of the UNet taken before the cycle-attention adapter was attached),
    which gives the caption-consistency targets.
    """
    from diffusers import UNet2DConditionModel

    state = {k: v for k, v in unet.state_dict().items() if ".processor." not in k}
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    twin.load_state_dict(state, strict=True, assign=True)
    return twin.requires_grad_(False).train(unet.training)


def make_reflectance_decoder(vae):
    """The reflectance decoder ``D_r``: a copy of the SCUF VAE (skip convs + LoRA) whose decoder side is used.

    As the official ``vae_ref`` (a deepcopy of the lighten VAE after the SCUF modules were attached); the encoder is
    dropped because ``D_r`` decodes the UNet output with the skip activations of the pass's own encoder.
    """
    ref = copy.deepcopy(vae)
    ref.encoder = None
    return ref


def reflectance_decoder_parameters(ref_vae) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` that train in the reflectance decoder: decoder LoRA A/B and skip-conv weights."""
    trainable = {id(p) for p in scuf_vae_trainable_parameters(ref_vae)}
    return {name: p for name, p in ref_vae.named_parameters() if id(p) in trainable}


def load_vae_weights(pipe, vae, weights, direction: str = "b2a") -> None:
    """Copy the VAE part (LoRA + skip convs) of SCUF weights into another direction's VAE (the darken copy).

    ``weights``: a file (our ``.safetensors`` or the official checkpoint, whose ``direction`` VAE is taken) or a
    :class:`~.weights.SCUFWeightsFile`. Raises :class:`~.weights.SCUFWeightsError` when they do not fit.
    """
    from .weights import SCUFWeightsFile, check_compatible, copy_into, scuf_parameters

    if not isinstance(weights, SCUFWeightsFile):
        weights = pipe.read_scuf_weights(weights, direction)
    expected = {k: v for k, v in scuf_parameters(vae, None, pipe.unet).items() if k.startswith("vae.")}
    check_compatible(weights.path, expected, {k: v for k, v in weights.tensors.items() if k in expected})
    copy_into(expected, weights.tensors)


@dataclass
class PassOutput:
    """One generator pass. ``image`` ``[B, 3, H, W]`` in -1..1; ``latent`` x0 ``[B, 4, h, w]`` (scaled);
    ``reflectance`` ``[B, 3, H, W]`` in 0..1 or None; ``encoded`` the scaled encoder latent the UNet saw."""

    image: torch.Tensor
    latent: torch.Tensor
    reflectance: torch.Tensor | None
    encoded: torch.Tensor


class SCUFCycleModel:
    """The networks of SCUF training around a :class:`~.pipeline.SCUFPipeline` with SCUF modules attached.

    Args:
        pipe: pipeline after ``init_scuf_modules`` (its ``vae`` is the a2b = lighten VAE).
        vae_b2a: the darken VAE (a copy of ``pipe.vae`` with its own LoRA/skip convs).
        ref_vae: reflectance decoder from :func:`make_reflectance_decoder`, or None (reflectance loss off).
        decomposer: frozen Retinex decomposer (``[B, 3, H, W]`` 0..1 -> (R, L)), or None.
        caption_unet: :func:`plain_unet_twin` of ``pipe.unet``, or None (caption loss off).
        lpips: callable ``(x, y) -> [B, ...]`` on -1..1 images, or None (cycle/identity use L1 only).
        disc_levels: CLIP hidden-state indices for the discriminators.
        disc_lighten, disc_darken: :class:`CLIPDiscriminatorHeads` judging lightened (vs real normal-light) and
            darkened (vs real low-light) images.
        prompt_a2b, prompt_b2a: ``[1, 77, D]`` text embeddings of the lighten / darken prompts.
        weights: :class:`LossWeights`.
    """

    def __init__(self, pipe, vae_b2a, ref_vae, decomposer, caption_unet, lpips, disc_levels, disc_lighten,
                 disc_darken, prompt_a2b, prompt_b2a, weights: LossWeights):
        self.pipe = pipe
        self.vaes = {"a2b": pipe.vae, "b2a": vae_b2a}
        self.ref_vae = ref_vae
        self.decomposer = decomposer
        self.caption_unet = caption_unet
        self.lpips = lpips
        self.disc_levels = disc_levels
        self.discs = {"a2b": disc_lighten, "b2a": disc_darken}
        self.prompts = {"a2b": prompt_a2b, "b2a": prompt_b2a}
        self.w = weights

    # ---------------------------------------------------------------------------------------- passes

    def image_prompt_embedding(self, images: torch.Tensor, invert: bool) -> torch.Tensor:
        """CLIP embedding ``[B, 512]`` (frozen, detached) of V or 1 - V of ``images`` (``[B, 3, H, W]`` in -1..1)."""
        with torch.no_grad():
            rgb = (images * 0.5 + 0.5).clamp(0, 1)
            prompt = inverted_value_channel(rgb) if invert else value_channel(rgb)
            return clip_image_embedding(self.pipe.image_encoder, prompt.repeat(1, 3, 1, 1))

    def encode(self, x: torch.Tensor, direction: str, generator: torch.Generator | None):
        """``(scaled posterior sample [B, 4, h, w], skips)`` of the direction's VAE encoder (LoRA active)."""
        vae = self.vaes[direction]
        posterior, skips = encode_with_skips(vae, x)
        noise = torch.randn(posterior.mean.shape, generator=generator, device=posterior.mean.device,
                            dtype=posterior.mean.dtype)
        return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor, skips

    def translate(self, x: torch.Tensor, direction: str, prompt_embedding: torch.Tensor,
                  generator: torch.Generator, with_reflectance: bool = False) -> PassOutput:
        """One generator pass of ``x`` (``[B, 3, H, W]`` in -1..1) with a CLIP image-prompt embedding ``[B, 512]``:
        :func:`~.scuf_modules.scuf_one_step` (the pipeline's forward) on a posterior sample drawn from ``generator``."""
        tokens = self.pipe.image_proj(prompt_embedding.to(self.pipe.image_proj.dtype))
        text = self.prompts[direction].expand(x.shape[0], -1, -1)
        context = torch.cat([text.to(tokens.dtype), tokens], dim=1)
        gamma = self.pipe.scuf_config.skip_gamma
        out = scuf_one_step(self.vaes[direction], self.pipe.unet, self.pipe.scheduler, x, context, gamma,
                            noise=generator)
        reflectance = None
        if with_reflectance and self.ref_vae is not None:
            latents = (out.latent / self.ref_vae.config.scaling_factor).to(x.dtype)
            reflectance = torch.sigmoid(decode_with_skips(self.ref_vae, latents, out.skips, gamma))
        return PassOutput(out.image, out.latent, reflectance, out.encoded)

    def caption_latent(self, encoded: torch.Tensor, caption_embedding: torch.Tensor) -> torch.Tensor:
        """Plain-UNet x0 ``[B, 4, h, w]`` for the caption prompt ``[B, 77, D]`` on an encoder latent (eq. 4)."""
        return unet_x0(self.caption_unet, self.pipe.scheduler, encoded, caption_embedding)

    # ------------------------------------------------------------------------------------------ losses

    def _image_loss(self, pred: torch.Tensor, target: torch.Tensor, l1_weight: float, lpips_weight: float):
        loss = F.l1_loss(pred, target) * l1_weight
        if self.lpips is not None and lpips_weight:
            loss = loss + self.lpips(pred.float(), target.float()).mean() * lpips_weight
        return loss

    def cycle_losses(self, x: torch.Tensor, direction: str, caption: torch.Tensor | None,
                     reflectance_target: torch.Tensor | None, generator) -> dict[str, torch.Tensor]:
        """Cycle from ``x`` (domain of ``direction``'s input): the losses of paper eq. 4-6 for that image."""
        back = "b2a" if direction == "a2b" else "a2b"
        want_ref = reflectance_target is not None and self.ref_vae is not None
        first = self.translate(x, direction, self.image_prompt_embedding(x, invert=True), generator, want_ref)
        second = self.translate(first.image, back, self.image_prompt_embedding(x, invert=False), generator, want_ref)
        losses = {"cycle": self._image_loss(second.image, x, self.w.lambda_cycle, self.w.lambda_cycle_lpips)}
        if caption is not None and self.caption_unet is not None:
            target = self.caption_latent(first.encoded, caption)
            losses["caption"] = cosine_consistency_loss(second.latent, target) * self.w.lambda_caption
        if want_ref:
            ref = reflectance_target_loss(second.reflectance, reflectance_target)
            ref = ref + F.mse_loss(first.reflectance, second.reflectance.detach())
            losses["reflectance"] = ref * self.w.lambda_reflectance
        return losses

    def identity_losses(self, x: torch.Tensor, direction: str, caption: torch.Tensor | None,
                        reflectance_target: torch.Tensor | None, generator) -> dict[str, torch.Tensor]:
        """Identity of ``x`` already in ``direction``'s target domain (paper eq. 7), scaled by ``lambda_idt``."""
        back = "b2a" if direction == "a2b" else "a2b"
        want_ref = reflectance_target is not None and self.ref_vae is not None
        out = self.translate(x, direction, self.image_prompt_embedding(x, invert=False), generator, want_ref)
        losses = {"identity": self._image_loss(out.image, x, self.w.lambda_idt, self.w.lambda_idt_lpips)}
        if caption is not None and self.caption_unet is not None:
            # official: the caption target comes from the *other* direction's encoder on the same image
            encoded, _ = self.encode(x, back, generator)
            losses["caption"] = cosine_consistency_loss(out.latent, self.caption_latent(encoded, caption)) \
                * self.w.lambda_caption
        if want_ref:
            losses["reflectance"] = reflectance_target_loss(out.reflectance, reflectance_target) \
                * self.w.lambda_reflectance
        return losses

    def discriminator_logits(self, direction: str, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L]`` of the discriminator for ``direction``'s outputs on ``images`` (-1..1)."""
        feats = clip_discriminator_features(self.pipe.image_encoder, images, self.disc_levels)
        return self.discs[direction](feats.float())

    @torch.no_grad()
    def reflectance_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """Retinex reflectance ``[B, 3, H, W]`` of ``x`` (-1..1), or None without decomposer/decoder."""
        if self.decomposer is None or self.ref_vae is None:
            return None
        return self.decomposer((x.float() * 0.5 + 0.5).clamp(0, 1))[0].to(x.dtype)


# ------------------------------------------------------------------------------------------- one iteration


def training_iteration(model: SCUFCycleModel, batch, generator: torch.Generator,
                       update: Callable[[torch.Tensor, str], None],
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       ) -> dict[str, float]:
    """One SCUF iteration in the paper's (= official) order: cycle from low, cycle from normal, generator GAN,
    identity, then the discriminators on fakes and on reals. Returns every loss term as a float.

    Args:
        model: the :class:`SCUFCycleModel`.
        batch: ``(low, normal, low captions or None, normal captions or None)``; images ``[B, 3, H, W]`` in -1..1.
        generator: draws the posterior samples.
        update: ``update(loss, "generator" | "discriminator")``: backward, gradient clip, optimizer step, zero grad
            (the trainer's, so that it can all-reduce gradients and scale losses).
        autocast: context manager factory around each forward (mixed precision).
    """
    low, normal, low_caption, normal_caption = batch
    pipe = model.pipe
    lambda_gan = model.w.lambda_gan
    logs: dict[str, float] = {}

    def total(losses: dict, prefix: str):
        for k, v in losses.items():
            logs[f"{prefix}_{k}"] = logs.get(f"{prefix}_{k}", 0.0) + float(v.detach())
        return sum(losses.values())

    with torch.no_grad():
        cap_low = pipe.encode_prompt(low_caption, low.device) if low_caption is not None else None
        cap_normal = pipe.encode_prompt(normal_caption, low.device) if normal_caption is not None else None
        ref_low, ref_normal = model.reflectance_of(low), model.reflectance_of(normal)

    for x, direction, cap, ref, name in ((low, "a2b", cap_low, ref_low, "low"),
                                        (normal, "b2a", cap_normal, ref_normal, "normal")):
        with autocast():
            loss = total(model.cycle_losses(x, direction, cap, ref, generator), f"cycle_{name}")
        update(loss, "generator")

    with autocast():
        fake_normal = model.translate(low, "a2b", model.image_prompt_embedding(low, invert=True), generator).image
        fake_low = model.translate(normal, "b2a", model.image_prompt_embedding(normal, invert=True), generator).image
        gan = {"lighten": gan_generator_loss(model.discriminator_logits("a2b", fake_normal)) * lambda_gan,
               "darken": gan_generator_loss(model.discriminator_logits("b2a", fake_low)) * lambda_gan}
        loss = total(gan, "gan")
    update(loss, "generator")

    with autocast():
        loss = total(model.identity_losses(normal, "a2b", cap_normal, ref_normal, generator), "idt_normal") \
            + total(model.identity_losses(low, "b2a", cap_low, ref_low, generator), "idt_low")
    update(loss, "generator")

    # The generator's GAN update also left gradients on the heads: the discriminator starts clean.
    for head in model.discs.values():
        head.zero_grad(set_to_none=True)
    for real, name in ((False, "fake"), (True, "real")):
        with autocast():
            images_l = normal if real else fake_normal.detach()
            images_d = low if real else fake_low.detach()
            disc = {"lighten": gan_discriminator_loss(model.discriminator_logits("a2b", images_l), real) * lambda_gan,
                    "darken": gan_discriminator_loss(model.discriminator_logits("b2a", images_d), real) * lambda_gan}
            loss = total(disc, f"disc_{name}")
        update(loss, "discriminator")
    return logs
