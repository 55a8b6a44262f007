"""SA-GAN parts (method.md §2): self-attention, generator, discriminator and their losses.

Sizes are kept small on purpose: the scorer must cost little next to the frozen backbone,
and the score only needs D's attended features, never its classification head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linewatch.model.mdaae import xavier_init

__all__ = [
    "Discriminator",
    "Generator",
    "ImageEncoder",
    "SelfAttention",
    "attention_mask",
    "disc_loss",
    "feature_matching",
    "generator_adv_loss",
    "r1_penalty",
]


class SelfAttention(nn.Module):
    """SAGAN self-attention (Fig. 5), multi-head as eq. 10-11.

    ``f, g, h`` are 1x1 convolutions; ``beta = softmax(f^T g / sqrt(d_k))``;
    ``o = W_v(h beta)``; ``y = x + gamma * o`` with ``gamma`` starting at 0, so the block
    begins as the identity and the network learns how much attention to use.
    """

    def __init__(self, channels: int, heads: int = 1, reduction: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.d_k = max(channels // reduction // heads, 1)
        self.d_v = max(channels // 2 // heads, 1)
        self.f = nn.Conv2d(channels, heads * self.d_k, 1)
        self.g = nn.Conv2d(channels, heads * self.d_k, 1)
        self.h = nn.Conv2d(channels, heads * self.d_v, 1)
        self.v = nn.Conv2d(heads * self.d_v, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        for conv in (self.f, self.g, self.h, self.v):  # Xavier-normal (method.md §0)
            nn.init.xavier_normal_(conv.weight)
            assert conv.bias is not None
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, attention (B, heads, N, N))`` with N = H*W; row i sums to 1 over sources j."""
        b, _, hh, ww = x.shape
        n = hh * ww
        q = self.f(x).view(b, self.heads, self.d_k, n).transpose(-1, -2)
        k = self.g(x).view(b, self.heads, self.d_k, n)
        att = torch.softmax((q @ k) / math.sqrt(self.d_k), dim=-1)
        v = self.h(x).view(b, self.heads, self.d_v, n)
        o = (v @ att.transpose(-1, -2)).reshape(b, self.heads * self.d_v, hh, ww)
        return x + self.gamma * self.v(o), att


def attention_mask(att: Tensor, size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``diag(Att)`` as a spatial weight (B, 1, *size), scaled so uniform attention gives 1.

    A position that its neighbours cannot explain attends mostly to itself; its diagonal
    entry is large. Scaling by N makes the mask's mean near 1 for any grid size.
    """
    n = att.shape[-1]
    diag = torch.diagonal(att, dim1=-2, dim2=-1).mean(1) * n
    diag = diag.view(att.shape[0], 1, *grid)
    return F.interpolate(diag, size=size, mode="bilinear", align_corners=False)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.LeakyReLU(0.2),
    )


def _widths(base: int, steps: int, smallest: int) -> list[int]:
    """Channel widths from the coarsest (``base``) to the finest layer, halving per step."""
    return [max(base >> i, smallest) for i in range(steps)]


class ImageEncoder(nn.Module):
    """The encoder half of a stand-alone generator (variants A and C): image -> z.

    Plain strided convolutions; with ``attention`` a self-attention block on the last map.
    """

    def __init__(
        self, latent: int, stride: int, base: int, attention: bool, heads: int = 1
    ) -> None:
        super().__init__()
        steps = int(math.log2(stride))
        widths = list(reversed(_widths(base, steps, 8)))
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers.append(_down(c_in, w))
            c_in = w
        self.body = nn.Sequential(*layers)
        self.attn = SelfAttention(c_in, heads) if attention else None
        self.out = nn.Conv2d(c_in, latent, 1)
        xavier_init(self.body)
        xavier_init(self.out)

    def forward(self, x: Tensor) -> Tensor:
        """The bottleneck z (B, latent, H/stride, W/stride)."""
        y = self.body(x)
        if self.attn is not None:
            y, _ = self.attn(y)
        out: Tensor = self.out(y)
        return out


class Generator(nn.Module):
    """Decodes the image from the bottleneck z; with ``attention`` a self-attention block first.

    In the joint model z is the MDAAE bottleneck, so G learns to render what the feature
    autoencoder kept of a normal surface.
    """

    def __init__(
        self,
        latent: int,
        stride: int,
        base: int,
        attention: bool,
        heads: int = 1,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        steps = int(math.log2(stride))
        widths = _widths(base, steps, 8)
        self.inp = nn.Sequential(nn.Conv2d(latent, widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        self.attn = SelfAttention(widths[0], heads) if attention else None
        layers: list[nn.Module] = []
        c_in = widths[0]
        for w in widths:
            layers.append(_up(c_in, w))
            c_in = w
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c_in, out_channels, 3, padding=1)
        xavier_init(self.inp)
        xavier_init(self.body)
        xavier_init(self.out)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(x^ (B, C, H, W), attention or None)``."""
        y = self.inp(z)
        att = None
        if self.attn is not None:
            y, att = self.attn(y)
        return self.out(self.body(y)), att


class Discriminator(nn.Module):
    """Convolutional D. With ``attention``: self-attention + layer norm on the attended map
    and a BiGAN-style head that also sees the latent z; without: a plain CNN on the image.

    :meth:`features` is all the scorer runs; :meth:`head` is for training only.
    """

    def __init__(
        self, stride: int, base: int, latent: int, attention: bool, heads: int = 1
    ) -> None:
        super().__init__()
        steps = int(math.log2(stride))
        widths = [min(base << i, base * 4) for i in range(steps)]
        blocks: list[nn.Module] = []
        c_in = 3
        for w in widths:
            blocks.append(_down(c_in, w))
            c_in = w
        self.blocks = nn.ModuleList(blocks)
        self.attn = SelfAttention(c_in, heads) if attention else None
        # GroupNorm with one group is layer norm over (C, H, W) of each image.
        self.norm = nn.GroupNorm(1, c_in) if attention else None
        self.z_proj = nn.Conv2d(latent, c_in, 1) if attention else None
        c_head = 2 * c_in if attention else c_in
        self.head_conv = nn.Sequential(
            nn.Conv2d(c_head, c_in, 3, stride=2, padding=1), nn.LeakyReLU(0.2)
        )
        self.head_fc = nn.Linear(c_in, 1)
        xavier_init(self.blocks)
        xavier_init(self.head_conv)
        xavier_init(self.head_fc)
        if self.z_proj is not None:
            xavier_init(self.z_proj)

    def features(self, x: Tensor) -> list[Tensor]:
        """Intermediate maps ``phi_l(x)``; the last is ``LN(SA(.))`` when attention is on."""
        out: list[Tensor] = []
        y = x
        for block in self.blocks:
            y = block(y)
            out.append(y)
        if self.attn is not None and self.norm is not None:
            y, _ = self.attn(y)
            out[-1] = self.norm(y)
        return out

    def head(self, last: Tensor, z: Tensor | None) -> Tensor:
        """Real/fake logit (B,) from the last feature map (and z for the BiGAN head)."""
        y = last
        if self.z_proj is not None and z is not None:
            zp = self.z_proj(z)
            if zp.shape[-2:] != y.shape[-2:]:
                zp = F.interpolate(zp, size=y.shape[-2:], mode="bilinear", align_corners=False)
            y = torch.cat([y, zp], 1)
        y = self.head_conv(y).mean(dim=(2, 3))
        logit: Tensor = self.head_fc(y).squeeze(1)
        return logit


def feature_matching(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    """``sum_l mean||phi_l(x) - phi_l(x^)||^2`` over D's intermediate maps."""
    total = real[0].new_zeros(())
    for r, f in zip(real, fake, strict=True):
        total = total + (r - f).pow(2).mean()
    return total


def disc_loss(real_logit: Tensor, fake_logit: Tensor) -> Tensor:
    """Discriminator BCE of eq. 8/13: real -> 1, reconstructed -> 0."""
    return F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()


def generator_adv_loss(fake_logit: Tensor) -> Tensor:
    """Non-saturating generator loss, eq. 9: ``-E[log D(G(.))]``."""
    return F.softplus(-fake_logit).mean()


def r1_penalty(real_logit: Tensor, real: Tensor) -> Tensor:
    """R1 gradient penalty ``E||grad_x D(x)||^2`` (the ``R(theta_D)`` of eq. 13)."""
    (grad,) = torch.autograd.grad(real_logit.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
