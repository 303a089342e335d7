"""A PatchGAN discriminator and hinge losses for training the image tokenizer adversarially (training only: the
tokenizer bundle never holds it).

    disc = PatchDiscriminator(layers=2, channels=32)
    logits = disc(pixels)                     # (B, 3, S, S) in [-1, 1] -> (B, 1, S / 2^layers, S / 2^layers)
    d_loss = hinge_d_loss(disc(real), disc(fake.detach()))
    g_loss = hinge_g_loss(disc(fake))

Each output position judges one patch of the input (its receptive field), so the loss rewards local texture
rather than the whole image (Isola et al.'s PatchGAN; taming trains its VQGANs with one, hinge loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convolutions (widths channels, 2 channels, ... capped at 8 channels), GroupNorm (the
    most groups up to 32 that divide the width) and leaky ReLU after all but the first, then a 3x3 convolution to one logit per patch."""

    def __init__(self, layers: int = 2, channels: int = 32, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_out = channels * min(2**i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2, 1), nn.GroupNorm(math.gcd(32, c_out), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 1, S / 2^layers, S / 2^layers) patch logits."""
        return self.net(pixels)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: (mean relu(1 - D(x)) + mean relu(1 + D(x'))) / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's (the tokenizer's) adversarial loss: -mean D(x')."""
    return -fake_logits.mean()
