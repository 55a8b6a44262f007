"""MDAAE: multi-level deep-feature adaptive-fusion autoencoder (method.md §1).

Frozen backbone levels ``F_l`` are projected (``P_l``, 1x1), weighted by a softmax attention
over levels (eq. 3), brought to one resolution and fused by a 3x3 convolution (eq. 4) into
``Phi``. A bottleneck autoencoder maps ``Phi`` to ``z`` and back (eq. 5); one decoding head
per level ``psi_l`` turns ``Phi^`` into that level's features.

Our choice where method.md leaves one open: the reconstruction *target* of level ``l`` is the
frozen backbone feature ``F_l`` standardised per channel with training statistics, not the
learned ``Phi`` itself. Reconstructing a learned target lets the network shrink the target
towards a constant and drive the loss to zero without learning anything about normal
surfaces; a frozen target cannot collapse, and standardising keeps every level on one scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MDAAE", "LevelFusion", "MDAAEOutput", "feature_distance_map", "resize_to"]


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv/linear layer (method.md §0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear up-sampling or area down-sampling of ``x`` to ``size`` (no-op when equal)."""
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LevelFusion(nn.Module):
    """Attention-weighted fusion of the backbone levels into ``Phi`` (eq. 3-4).

    ``alpha_l = softmax_l(w^T GAP(P_l F_l) / tau)`` and
    ``Phi = Conv3x3(Concat_l[alpha_l * Up_l(P_l F_l)])``.
    """

    def __init__(self, in_channels: Sequence[int], proj: int, out: int, tau: float) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, proj, 1) for c in in_channels)
        self.w = nn.Parameter(torch.empty(proj))
        self.fuse = nn.Conv2d(len(in_channels) * proj, out, 3, padding=1)
        self.tau = tau
        xavier_init(self)
        nn.init.normal_(self.w, std=proj**-0.5)

    def forward(self, feats: Sequence[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(Phi (B, out, *size), alpha (B, L))``."""
        projected = [p(f) for p, f in zip(self.proj, feats, strict=True)]
        logits = torch.stack([(self.w * p.mean(dim=(2, 3))).sum(1) for p in projected], 1)
        alpha = torch.softmax(logits / self.tau, dim=1)
        weighted = [
            resize_to(p, size) * alpha[:, i, None, None, None] for i, p in enumerate(projected)
        ]
        return self.fuse(torch.cat(weighted, 1)), alpha


class _Bottleneck(nn.Module):
    """``z = E(Phi)``, ``Phi^ = D(z)`` (eq. 5): narrow channels and a stride.

    One strided 3x3 convolution each way (plus a 1x1 mixing layer in D) keeps the heads a
    small fraction of the backbone's cost at inference.
    """

    def __init__(self, channels: int, latent: int, stride: int) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(channels, latent, 3, stride=stride, padding=1)
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=stride, mode="bilinear", align_corners=False)
            if stride > 1
            else nn.Identity(),
            nn.Conv2d(latent, channels, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 1),
            nn.LeakyReLU(0.1),
        )
        xavier_init(self)


@dataclass
class MDAAEOutput:
    """One forward pass: fused features, bottleneck, reconstructions and level weights."""

    phi: Tensor
    z: Tensor
    recon: list[Tensor]
    alpha: Tensor


class MDAAE(nn.Module):
    """The feature autoencoder; holds the per-channel statistics that standardise its targets.

    ``feature_mean``/``feature_std`` are buffers (saved in the model file), filled once from
    the training features by :meth:`set_feature_stats` before training starts.
    """

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(
        self,
        level_channels: Sequence[int],
        level_strides: Sequence[int],
        fusion_stride: int,
        proj_channels: int,
        fused_channels: int,
        latent_channels: int,
        latent_stride: int,
        tau: float,
    ) -> None:
        super().__init__()
        if fusion_stride not in level_strides:
            raise ValueError(f"fusion_stride {fusion_stride} is not a level stride")
        self.level_strides = tuple(level_strides)
        self.fusion_stride = fusion_stride
        self.fusion = LevelFusion(level_channels, proj_channels, fused_channels, tau)
        self.bottleneck = _Bottleneck(fused_channels, latent_channels, latent_stride)
        # psi_l: a 1x1 head per level, applied after resampling Phi^ to the level's grid; a
        # 3x3 head at stride 4 would cost more than the rest of the heads together.
        self.heads = nn.ModuleList(nn.Conv2d(fused_channels, c, 1) for c in level_channels)
        xavier_init(self.heads)
        total = sum(level_channels)
        self.register_buffer("feature_mean", torch.zeros(total))
        self.register_buffer("feature_std", torch.ones(total))
        self.level_channels = tuple(level_channels)

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store the per-channel statistics of the training features (all levels concatenated)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def standardise(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """The reconstruction targets: each level standardised per channel."""
        out: list[Tensor] = []
        start = 0
        for f, c in zip(feats, self.level_channels, strict=True):
            mean = self.feature_mean[start : start + c].view(1, c, 1, 1)
            std = self.feature_std[start : start + c].view(1, c, 1, 1)
            out.append((f - mean) / std)
            start += c
        return out

    def fusion_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Spatial size of ``Phi`` for an input of ``image_size``."""
        s = self.fusion_stride
        return (-(-image_size[0] // s), -(-image_size[1] // s))

    def forward(self, targets: Sequence[Tensor]) -> MDAAEOutput:
        """Encode standardised levels ``targets`` and reconstruct each at its own resolution."""
        fine = targets[self.level_strides.index(self.fusion_stride)]
        size = (fine.shape[-2], fine.shape[-1])
        phi, alpha = self.fusion(targets, size)
        z = self.bottleneck.encoder(phi)
        phi_hat = self.bottleneck.decoder(z)
        phi_hat = resize_to(phi_hat, size)  # odd sizes: the stride-2 round trip may add a pixel
        recon = [
            head(resize_to(phi_hat, (t.shape[-2], t.shape[-1])))
            for head, t in zip(self.heads, targets, strict=True)
        ]
        return MDAAEOutput(phi=phi, z=z, recon=recon, alpha=alpha)

    def loss(
        self,
        out: MDAAEOutput,
        targets: Sequence[Tensor],
        level_weights: Sequence[float],
        sparsity: float,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Multi-level reconstruction loss with bottleneck sparsity (eq. 6).

        ``sum_l beta_l * mean(M_l * (psi_l(Phi^) - F_l)^2) + gamma * mean|z|``; ``valid``
        (B, 1, H, W) marks real image pixels (letterbox padding is 0) and gives ``M_l``.
        Weight decay (lambda) is the optimiser's.
        """
        total = out.z.new_zeros(())
        parts: dict[str, float] = {}
        for i, (r, t, beta) in enumerate(zip(out.recon, targets, level_weights, strict=True)):
            err = (r - t).pow(2).mean(1, keepdim=True)
            if valid is not None:
                m = resize_to(valid, (err.shape[-2], err.shape[-1]))
                term = (err * m).sum() / m.sum().clamp_min(1.0)
            else:
                term = err.mean()
            total = total + beta * term
            parts[f"l{i}"] = float(term.detach())
        sparse = out.z.abs().mean()
        parts["z1"] = float(sparse.detach())
        return total + sparsity * sparse, parts


def _ssim_map(x: Tensor, y: Tensor, window: int) -> Tensor:
    """Local SSIM (eq. 7) per channel between feature maps, averaged over channels."""
    pad = window // 2
    pool = torch.nn.AvgPool2d(window, stride=1, padding=pad, count_include_pad=False)
    mu_x, mu_y = pool(x), pool(y)
    var_x = pool(x * x) - mu_x * mu_x
    var_y = pool(y * y) - mu_y * mu_y
    cov = pool(x * y) - mu_x * mu_y
    # Targets are standardised (unit variance), so the constants are those of a unit range.
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).mean(1, keepdim=True)


def feature_distance_map(
    recon: Sequence[Tensor],
    targets: Sequence[Tensor],
    weights: Sequence[float],
    kind: str,
    size: tuple[int, int],
    window: int = 3,
) -> Tensor:
    """``A_feat = sum_l omega_l * d_l`` up-sampled to ``size`` (B, 1, *size).

    ``kind="ssim"`` uses ``d_l = 1 - SSIM_l`` as eq. 7 writes it; ``kind="l2"`` the mean squared
    error over channels, which keeps the contrast that SSIM divides away.
    """
    total: Tensor | None = None
    for r, t, w in zip(recon, targets, weights, strict=True):
        if kind == "ssim":
            d = 1.0 - _ssim_map(r, t, window)
        else:
            d = (r - t).pow(2).mean(1, keepdim=True)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False) * w
        total = d if total is None else total + d
    assert total is not None
    return total
