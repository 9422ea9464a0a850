"""A plain copy of a SCUF VAE for CPU inference: the same function in fewer FLOPs and fewer memory passes.

The SCUF VAE wraps every conv and attention projection in a PEFT LoRA layer (rank 4): each one runs the base
conv, a 3x3 conv to 4 channels, a 1x1 conv back, a scale and an add, i.e. three extra passes over a full-size
activation per conv. On the CPU at 512x512 that was about a fifth of the VAE's time. :func:`inference_vae` builds
a plain ``AutoencoderKL`` whose convs hold the merged weight ``W + scaling * B A`` (summed in float32, rounded
once to the VAE's dtype), with two more changes that keep the function:

* each decoder upsampler (nearest 2x, then a 3x3 conv) becomes one 2x2 conv on the low-resolution input giving
  the four output phases (:class:`SubpixelUpsampleConv`): the nearest upsample repeats each input pixel, so a 3x3
  kernel on the upsampled grid sees only 2x2 distinct input pixels per output phase, with some of its taps summed:
  16 instead of 36 multiply-adds per output pixel and channel pair (about 190 of the decoder's 1,300 GMAC at 512 px);
* ResNet blocks apply SiLU in place and add the shortcut into the conv's output (:class:`InferenceResnetBlock`),
  which saves allocating a new full-size tensor three times per block.

The original VAE stays untouched (training, saving and swapping SCUF weights use it); the copy is rebuilt when any
of its tensors or LoRA settings change (:func:`vae_fingerprint`, and ``SCUFPipeline.load_scuf_weights``). Its outputs differ from the PEFT VAE's only by
rounding (merged weights, summed taps): the tests compare both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedVAE(ValueError):
    """The VAE has a layer this module does not know how to merge (the caller keeps the original VAE)."""


def _lora_layers(vae) -> dict[str, nn.Module]:
    """``{module name: PEFT LoRA layer}`` of ``vae`` (the wrappers that hold ``base_layer`` and ``lora_A``)."""
    return {name: m for name, m in vae.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}


def tensor_state(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's storage and, outside inference mode, its in-place modification count (inference
    tensors, e.g. a model loaded inside ComfyUI's ``torch.inference_mode``, have no version counter)."""
    version = None if tensor.is_inference() else tensor._version
    return tensor.data_ptr(), version, tensor.dtype, tensor.device


def vae_fingerprint(vae) -> tuple:
    """Changes whenever a tensor of ``vae`` is replaced, a LoRA setting changes, or the SCUF tensors (LoRA and skip
    convs, a few MB) change values, including by in-place copies that leave no version count (inference tensors)."""
    tensors = tuple(tensor_state(p) for p in vae.parameters())
    with torch.no_grad():
        scuf = [p.detach().reshape(-1) for n, p in vae.named_parameters() if ".lora_" in n or "skip_conv_" in n]
        checksum = tuple(torch.stack([torch.cat(scuf).double().sum(), torch.cat(scuf).double().square().sum()])
                         .tolist()) if scuf else ()
    settings = tuple(
        (name, layer.merged, layer.disable_adapters, tuple(layer.active_adapters), tuple(sorted(layer.scaling.items())))
        for name, layer in _lora_layers(vae).items()
    )
    return tensors, checksum, settings


def merged_weight(layer) -> torch.Tensor:
    """``W + sum(scaling * B A)`` over the active adapters of a PEFT LoRA ``Conv2d``/``Linear``, in W's dtype.

    Summed in float32 and rounded once. A layer PEFT has already merged, or whose adapters are disabled, is its
    base weight. DoRA, LoRA biases, ``fan_in_fan_out`` and non-1x1 ``lora_B`` convs raise :class:`UnsupportedVAE`.
    """
    base = layer.get_base_layer()
    if not isinstance(base, (nn.Conv2d, nn.Linear)):
        raise UnsupportedVAE(f"LoRA on {type(base).__name__}")
    if layer.merged or layer.disable_adapters:
        return base.weight.detach()
    weight = base.weight.detach().float()
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(name) or getattr(layer, "lora_bias", {}).get(name) \
                or getattr(layer, "fan_in_fan_out", False):
            raise UnsupportedVAE(f"LoRA adapter {name!r} uses DoRA, a bias or fan_in_fan_out")
        a, b = layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float()
        if b.dim() == 4 and b.shape[2:] != (1, 1):
            raise UnsupportedVAE(f"LoRA adapter {name!r}: lora_B kernel {tuple(b.shape[2:])}, expected 1x1")
        weight = weight + (b.flatten(1) @ a.flatten(1)).view_as(weight) * layer.scaling[name]
    return weight.to(base.weight.dtype).contiguous(memory_format=_layout(base.weight))


class SubpixelUpsampleConv(nn.Module):
    """Nearest 2x upsample followed by a 3x3 conv (padding 1), computed on the input grid.

    Output pixel ``(2i + a, 2j + b)`` of the 3x3 conv on the upsampled grid reads input rows ``i - 1, i, i`` (a = 0)
    or ``i, i, i + 1`` (a = 1), the same for columns, so it is a 2x2 conv of the input padded by 1 whose taps are sums
    of the 3x3 taps. One conv with the four phase kernels stacked on the output channels computes all phases; the
    phases are then interleaved into the 2x output. Same signature as diffusers' ``Upsample2D`` for the decoder.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight.shape[2:] != (3, 3):
            raise UnsupportedVAE(f"upsampler conv kernel {tuple(weight.shape[2:])}, expected 3x3")
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))  # taps summed in float32 at least
        self.out_channels, self.channels = w.shape[0], w.shape[1]
        phases = []
        for rows in (_phase_taps(w, 2)):
            phases.extend(_phase_taps(rows, 3))
        kernel = torch.cat(phases).to(weight.dtype)  # [4 * out, in, 2, 2], phases (a, b) = 00, 01, 10, 11
        self.weight = nn.Parameter(kernel.contiguous(memory_format=_layout(weight)), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().repeat(4), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        n, _, h, w = hidden_states.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            raise ValueError(f"SubpixelUpsampleConv doubles the size: output_size {output_size} for {h}x{w}")
        phases = F.conv2d(hidden_states, self.weight, self.bias, padding=1)  # [n, 4 * out, h + 1, w + 1]
        c = self.out_channels
        out = phases.new_empty((n, h, 2, w, 2, c))  # channels-last memory of the [n, c, 2h, 2w] result
        for a in (0, 1):
            for b in (0, 1):
                k = 2 * a + b
                out[:, :, a, :, b, :] = phases[:, k * c:(k + 1) * c, a:a + h, b:b + w].permute(0, 2, 3, 1)
        out = out.view(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        return out if _layout(self.weight) == torch.channels_last else out.contiguous()


def _phase_taps(w: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """The two 2-tap kernels along ``dim`` (size 3): phase 0 = (w0, w1 + w2), phase 1 = (w0 + w1, w2)."""
    w0, w1, w2 = w.unbind(dim)
    return [torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)]


def _layout(weight: torch.Tensor):
    if weight.dim() == 4 and weight.shape[-1] > 1 and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class InferenceResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without time embedding, resampling or dropout, for inference:
    ``shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` / ``output_scale_factor``, SiLU in place and the
    shortcut added into conv2's output (both are fresh tensors nobody else holds)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2 = block.norm1, block.conv1, block.norm2, block.conv2
        self.conv_shortcut = block.conv_shortcut
        self.output_scale_factor = block.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
        if temb is not None:
            raise ValueError("InferenceResnetBlock has no time embedding")
        h = self.conv1(F.silu(self.norm1(input_tensor), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        h += input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        if self.output_scale_factor != 1:
            h /= self.output_scale_factor
        return h


def _plain_resnet(block) -> bool:
    return (type(block).__name__ == "ResnetBlock2D" and block.time_emb_proj is None and block.upsample is None
            and block.downsample is None and isinstance(block.nonlinearity, nn.SiLU)
            and block.time_embedding_norm in ("default", "group"))  # the same without a time embedding


def _plain_upsampler(up) -> bool:
    return (type(up).__name__ == "Upsample2D" and up.use_conv and not up.use_conv_transpose and up.interpolate
            and up.norm is None and getattr(up, "name", "conv") == "conv" and isinstance(up.conv, nn.Conv2d)
            and up.conv.kernel_size == (3, 3) and up.conv.stride == (1, 1) and up.conv.padding == (1, 1)
            and up.conv.groups == 1 and up.conv.dilation == (1, 1))


def inference_vae(vae, winograd: bool = True):
    """A plain ``AutoencoderKL`` computing what ``vae`` (with SCUF skip convs and LoRA) computes, for inference.

    LoRA merged into the weights (:func:`merged_weight`), decoder upsamplers as :class:`SubpixelUpsampleConv`,
    ResNet blocks as :class:`InferenceResnetBlock`; with ``winograd``, the wide 3x3 convs of a bfloat16 CPU VAE as
    :class:`~.winograd.WinogradConv2d` (:func:`~.winograd.use_winograd`; fewer multiply-adds, ~3x a bfloat16
    conv's rounding error). Tensors that need no change (norms, biases, the non-LoRA
    layers) are shared with ``vae``, not copied; the merged ones are new (about one VAE's size in memory).
    Same dtype, device and conv weight layout as ``vae``; in eval mode, no gradients.
    Raises :class:`UnsupportedVAE` for layers it cannot merge.
    """
    merged = {f"{name}.weight": merged_weight(layer) for name, layer in _lora_layers(vae).items()}
    state = {}
    for key, value in vae.state_dict(keep_vars=False).items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = merged.get(key, value.detach())
    with torch.device("meta"):
        plain = type(vae).from_config(vae.config)
        for k in range(1, 5):
            conv = getattr(vae.decoder, f"skip_conv_{k}", None)
            if conv is not None:
                conv = conv.get_base_layer() if hasattr(conv, "get_base_layer") else conv
                setattr(plain.decoder, f"skip_conv_{k}", nn.Conv2d(
                    conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None))
    plain.load_state_dict(state, assign=True, strict=True)
    plain.requires_grad_(False).eval()
    for coder in (plain.encoder, plain.decoder):
        for blocks in (getattr(coder, "down_blocks", []), getattr(coder, "up_blocks", []), [coder.mid_block]):
            for block in blocks:
                resnets = getattr(block, "resnets", [])
                for i, resnet in enumerate(resnets):
                    if _plain_resnet(resnet):
                        resnets[i] = InferenceResnetBlock(resnet)
    for block in plain.decoder.up_blocks:
        upsamplers = getattr(block, "upsamplers", None) or []
        for i, up in enumerate(upsamplers):
            if _plain_upsampler(up):
                upsamplers[i] = SubpixelUpsampleConv(up.conv.weight, up.conv.bias)
    if winograd:
        from .winograd import use_winograd

        use_winograd(plain)
    return plain
