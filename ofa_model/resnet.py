"""The truncated ResNet that turns an image into patch features (stem + stages 1-3, stride 16).

Module names follow the official checkpoints (`conv1`, `bn1`, `layer1.0.conv1`, `downsample.0`, ...).

Inference folds each BatchNorm into the convolution before it (`ResNet.fold_batchnorm(True)`, which
`OFAPredictor` sets): one convolution with scaled weights and a bias instead of a convolution plus a
normalisation pass over the activations. Only in eval mode without autograd, so training, and gradients
taken in eval mode, never see it. The folded weights are computed per forward (a few ms; a cache would go
stale, see `conv_bn`). In fp32 it changes results by rounding only (bench/inference.py fidelity: identical
top-1 and beam outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples (dim 0) with probability `rate`, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


def linspace(rate: float, n: int) -> list[float]:
    """n rates rising linearly from 0 to `rate` (drop-path schedule across blocks or layers)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool) -> torch.Tensor:
    """bn(conv(x)), as one folded convolution when `fold` in eval mode without autograd."""
    if not fold or bn.training or torch.is_grad_enabled() or conv.bias is not None:
        return bn(conv(x))
    # computed per call, never cached: optimizers (fused AdamW) and BatchNorm's running-statistics updates change
    # these tensors in place without bumping their version counters, so a cache could not tell it went stale
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    weight = conv.weight * scale.view(-1, 1, 1, 1)  # keeps the weight's memory format
    return F.conv2d(x, weight, bn.bias - bn.running_mean * scale, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv) with drop-path on the residual branch."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample  # Sequential(conv, bn) or None
        self.drop_path_rate = drop_path_rate
        self.fold = False  # set by ResNet.fold_batchnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, inplanes, H, W) -> (B, 4 * planes, H / stride, W / stride)."""
        fold = self.fold
        identity = x if self.downsample is None else conv_bn(self.downsample[0], self.downsample[1], x, fold)
        out = self.relu(conv_bn(self.conv1, self.bn1, x, fold))
        out = self.relu(conv_bn(self.conv2, self.bn2, out, fold))
        out = conv_bn(self.conv3, self.bn3, out, fold)
        if not torch.is_grad_enabled() and not self.training:  # the same sum, without a fresh activation buffer
            return out.add_(identity).relu_()
        return self.relu(identity + drop_path(out, self.drop_path_rate, self.training))


class ResNet(nn.Module):
    """Stem + three bottleneck stages: (B, 3, H, W) -> (B, 16 * width, H/16, W/16); OFA's width 64 gives 1024
    channels. `width` is the stem's channels and stage 1's planes (stages 2 and 3 double them)."""

    def __init__(self, layers: tuple[int, ...], drop_path_rate: float = 0.0, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width), layers, strict=True)):
            stage, inplanes = self._stage(inplanes, planes, blocks, 1 if i == 0 else 2, drop_path_rate)
            self.add_module(f"layer{i + 1}", stage)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.fold = False

    def fold_batchnorm(self, enabled: bool) -> None:
        """Whether eval-mode forwards without autograd fold each BatchNorm into its convolution."""
        for m in self.modules():
            if isinstance(m, (ResNet, Bottleneck)):
                m.fold = bool(enabled)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int, rate: float) -> tuple[nn.Sequential, int]:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        rates = linspace(rate, blocks)
        # As in the official model, the first block of a stage never gets drop-path.
        mods = [Bottleneck(inplanes, planes, stride, downsample)]
        mods += [Bottleneck(out, planes, drop_path_rate=rates[i]) for i in range(1, blocks)]
        return nn.Sequential(*mods), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(conv_bn(self.conv1, self.bn1, x, self.fold)))  # (B, width, H/4, W/4)
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 16 * width, H/16, W/16)
