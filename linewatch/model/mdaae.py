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

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linewatch.model.aspect import MemoryGroups

__all__ = [
    "MDAAE",
    "GaussianAccumulator",
    "LevelFusion",
    "MDAAEOutput",
    "NormalMemory",
    "build_memory_bank",
    "feature_distance_map",
    "nearest_distance",
    "pack_symmetric",
    "resize_to",
    "unpack_symmetric",
]

# Name (after the memory's prefix) of the packed precision in a model file.
PACKED_PRECISION = "precision_packed"


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
        # Per-level, per-position Gaussian of the reconstruction residual (feature_distance
        # "mahalanobis"); empty until fitted after training.
        self.residual_memory = nn.ModuleList(NormalMemory("gaussian", c) for c in level_channels)
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

    @property
    def residual_memories(self) -> list[NormalMemory]:
        """The residual Gaussians, one per level (typed view of the module list)."""
        return [m for m in self.residual_memory if isinstance(m, NormalMemory)]

    def fit_residuals(self, batches: Iterable[Sequence[Tensor]], eps: float) -> None:
        """Fit the residual Gaussians from batches of standardised targets (normal images)."""
        accs = [GaussianAccumulator() for _ in self.level_channels]
        for targets in batches:
            out = self(targets)
            for acc, r, t in zip(accs, out.recon, targets, strict=True):
                acc.add(r - t)
        for memory, acc in zip(self.residual_memories, accs, strict=True):
            memory.set_gaussian(*acc.finish(eps))

    def residual_distance(
        self,
        recon: Sequence[Tensor],
        targets: Sequence[Tensor],
        weights: Sequence[float],
        size: tuple[int, int],
    ) -> Tensor:
        """``sum_l omega_l * Mahalanobis(psi_l(Phi^) - F_l)`` per position, at ``size``.

        What the autoencoder cannot rebuild, measured against what it typically fails to
        rebuild at that position: the residual of a normal surface is not white noise (exposure
        shifts all channels together, tile borders reconstruct worse), and the per-position
        covariance discounts exactly those normal failures.
        """
        total: Tensor | None = None
        for memory, r, t, w in zip(self.residual_memories, recon, targets, weights, strict=True):
            if not memory.ready:
                raise ValueError("residual Gaussians are not fitted (fit_residuals)")
            d = resize_to(memory.distance(r - t), size) * w
            total = d if total is None else total + d
        assert total is not None
        return total

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


class GaussianAccumulator:
    """Streaming per-position mean and covariance of feature maps (float64 sums)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.outer: Tensor | None = None
        self.n = 0

    def add(self, maps: Tensor) -> None:
        """Add a batch (B, C, h, w)."""
        v = maps.double().flatten(2).permute(2, 0, 1)  # (P, B, C)
        s1 = v.sum(1)
        s2 = v.transpose(1, 2) @ v
        self.total = s1 if self.total is None else self.total + s1
        self.outer = s2 if self.outer is None else self.outer + s2
        self.n += maps.shape[0]

    def finish(self, eps: float) -> tuple[Tensor, Tensor]:
        """``(mean (P, C), precision (P, C, C))`` with ``eps`` added to each covariance."""
        n = self.n
        if self.total is None or self.outer is None or n < 2:
            raise ValueError("a Gaussian needs at least 2 training images")
        mean = self.total / n
        cov = (self.outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        cov = cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))


class NormalMemory(nn.Module):
    """What normal fused features look like, kept as buffers in the model file.

    ``gaussian``: per position of the fused grid, the mean and (ridge-regularised) inverse
    covariance of ``Phi`` over the training images; the distance is Mahalanobis. Exposure
    changes move all channels of a position together; the covariance learns that direction
    and discounts it, which a per-channel or Euclidean distance cannot (measured in README).
    ``knn``: a coreset of ``Phi`` vectors; the distance is to the nearest one.
    """

    bank: Tensor
    mean: Tensor
    precision: Tensor
    aspect_edges: Tensor

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("bank", torch.zeros(0, channels))
        # Gaussian: one (P, C) mean and (P, C, C) precision per group of frame shape.
        self.register_buffer("mean", torch.zeros(1, 0, channels))
        self.register_buffer("precision", torch.zeros(1, 0, channels, channels))
        self.register_buffer("aspect_edges", torch.zeros(0, dtype=torch.float64))

    @property
    def ready(self) -> bool:
        """True once fitted (or loaded)."""
        if self.kind == "knn":
            return self.bank.shape[0] > 0
        return self.kind == "gaussian" and self.mean.shape[1] > 0

    @property
    def groups(self) -> int:
        """Groups of frame shape with a Gaussian of their own (1: one for every shape)."""
        return int(self.aspect_edges.numel()) + 1

    def take_shapes(self, tensors: dict[str, Tensor], prefix: str) -> None:
        """Resize the buffers to the shapes stored in ``tensors`` before loading them.

        A model file holds the precision packed (:meth:`pack_for_file`); it is unpacked here.
        A file written before the memory had shape groups holds one (P, C) mean and (P, C, C)
        precision and no edges; they are read as the one group they are.
        """
        packed = tensors.pop(prefix + PACKED_PRECISION, None)
        if packed is not None:
            tensors[prefix + "precision"] = unpack_symmetric(packed)
        if tensors.get(prefix + "mean", torch.zeros(1, 0, 0)).dim() == 2:
            tensors[prefix + "mean"] = tensors[prefix + "mean"][None]
            tensors[prefix + "precision"] = tensors[prefix + "precision"][None]
            tensors.setdefault(prefix + "aspect_edges", torch.zeros(0, dtype=torch.float64))
        for name in ("bank", "mean", "precision", "aspect_edges"):
            key = prefix + name
            if key in tensors:
                current = getattr(self, name)
                setattr(self, name, torch.zeros_like(tensors[key], device=current.device))

    @staticmethod
    def pack_for_file(tensors: dict[str, Tensor], prefix: str) -> None:
        """Replace the memory's precision in a state dict by its packed upper triangle: the
        inverse of a covariance is symmetric, so a model file needs half of it."""
        tensors[prefix + PACKED_PRECISION] = pack_symmetric(tensors.pop(prefix + "precision"))

    def fit_gaussian(self, batches: Iterable[Tensor], eps: float) -> None:
        """Mean and inverse covariance per position from batches of ``Phi`` (B, C, h, w)."""
        self.fit_gaussian_per_shape(((b, None) for b in batches), eps, MemoryGroups.single())

    def fit_gaussian_per_shape(
        self, batches: Iterable[tuple[Tensor, np.ndarray | None]], eps: float,
        groups: MemoryGroups,
    ) -> None:
        """One Gaussian per group of ``groups`` from batches of ``(Phi, aspects (B,))``.

        Aspects may be None with a single group. Each group takes the views of its window.
        """
        accs = [GaussianAccumulator() for _ in range(len(groups))]
        for phi, aspects in batches:
            if len(groups) == 1:
                accs[0].add(phi)
                continue
            if aspects is None:
                raise ValueError("a memory per frame shape needs each view's aspect ratio")
            for g, acc in enumerate(accs):
                rows = groups.members(aspects, g)
                if rows.any():
                    acc.add(phi[torch.from_numpy(rows).to(phi.device)])
        fitted = [acc.finish(eps) for acc in accs]
        self.set_gaussian(torch.stack([m for m, _ in fitted]),
                          torch.stack([p for _, p in fitted]), groups.edges)

    def set_gaussian(self, mean: Tensor, precision: Tensor, edges: Sequence[float] = ()) -> None:
        """Take a fitted mean and precision: (P, C) and (P, C, C) for one group, or
        (G, P, C) and (G, P, C, C) with the ``G - 1`` aspect ``edges`` between the groups."""
        if mean.dim() == 2:
            mean, precision = mean[None], precision[None]
        if mean.shape[0] != len(edges) + 1:
            raise ValueError(f"{mean.shape[0]} Gaussians need {mean.shape[0] - 1} aspect edges")
        device = self.mean.device
        self.mean = mean.float().to(device)
        # Exactly symmetric (a no-op for cholesky_inverse's output), so a model file can keep
        # one triangle of it without changing a score.
        precision = precision.float().to(device)
        self.precision = (precision + precision.transpose(-1, -2)) / 2
        self.aspect_edges = torch.tensor(list(edges), dtype=torch.float64, device=device)

    def fit_knn(self, features: Tensor, size: int, sampler: str, seed: int) -> None:
        """The coreset from all training vectors ``features`` (N, C)."""
        self.bank = build_memory_bank(features, size, sampler, seed).to(self.bank.device)

    def group_of(self, aspects: Tensor | None, batch: int) -> Tensor:
        """Which group's Gaussian scores each frame (B,), from the frames' aspect ratios."""
        if self.groups == 1:
            return torch.zeros(batch, dtype=torch.long, device=self.mean.device)
        if aspects is None:
            raise ValueError(
                f"this memory has {self.groups} groups of frame shape; pass the frames' aspects"
            )
        return torch.bucketize(aspects.to(self.aspect_edges), self.aspect_edges, right=True)

    def distance(self, phi: Tensor, aspects: Tensor | None = None) -> Tensor:
        """Distance map (B, 1, h, w) of ``Phi`` to the normal memory.

        ``aspects`` (B,): each frame's width / height, needed when the Gaussian memory has
        groups of frame shape.
        """
        b, _, h, w = phi.shape
        if self.kind == "knn":
            vectors = phi.flatten(2).transpose(1, 2)  # (B, P, C)
            bank_sq = self.bank.pow(2).sum(1)
            rows = [nearest_distance(v, self.bank, bank_sq) for v in vectors]
            return torch.stack(rows).view(b, 1, h, w)
        if self.mean.shape[1] != h * w:
            raise ValueError(
                f"Gaussian memory was fitted on a {self.mean.shape[1]}-position grid, got {h}x{w}"
            )
        # Contiguous (P, B, C): the permuted view made the batched product copy and select
        # per position, 1.9-2.1x its time (4.0 vs 1.7 ms for 8 frames, 176 channels, 2 cores).
        e = phi.flatten(2).permute(2, 0, 1).contiguous()
        group = self.group_of(aspects, b)
        if b == 0 or bool((group == group[0]).all()):  # the usual batch: one camera, one shape
            d2 = self._squared(e, int(group[0]) if b else 0)
        else:
            d2 = e.new_empty(h * w, b)
            for g in group.unique().tolist():
                members = torch.nonzero(group == g).squeeze(1)
                d2[:, members] = self._squared(e[:, members], g)
        return d2.clamp_min(0.0).sqrt().T.reshape(b, 1, h, w)

    def _squared(self, e: Tensor, group: int) -> Tensor:
        """Squared Mahalanobis distances (P, B) of the (P, B, C) rows to ``group``'s Gaussian."""
        e = e - self.mean[group][:, None]
        # One matrix product per position over the batch: each image's row is computed by
        # itself (no reduction runs across images), so batch neighbours cannot change it.
        return (torch.bmm(e, self.precision[group]) * e).sum(-1)


def pack_symmetric(full: Tensor) -> Tensor:
    """The upper triangles (diagonal included) of symmetric ``(..., C, C)`` matrices, as
    ``(..., C (C + 1) / 2)``: what a model file stores of a precision matrix (half the bytes).

    >>> m = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    >>> pack_symmetric(m)
    tensor([2., 1., 3.])
    >>> torch.equal(unpack_symmetric(pack_symmetric(m)), m)
    True
    """
    rows, cols = torch.triu_indices(full.shape[-1], full.shape[-1], device=full.device)
    return full[..., rows, cols]


def unpack_symmetric(packed: Tensor) -> Tensor:
    """The symmetric ``(..., C, C)`` matrices whose upper triangles ``packed`` holds."""
    n = packed.shape[-1]
    c = (math.isqrt(8 * n + 1) - 1) // 2
    if c * (c + 1) // 2 != n:
        raise ValueError(f"{n} values are not the upper triangle of a square matrix")
    rows, cols = torch.triu_indices(c, c, device=packed.device)
    full = packed.new_zeros(*packed.shape[:-1], c, c)
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


def nearest_distance(queries: Tensor, bank: Tensor, bank_sq: Tensor, chunk: int = 4096) -> Tensor:
    """Euclidean distance of each query row (N, C) to its nearest bank row (K, C)."""
    q_sq = queries.pow(2).sum(1, keepdim=True)
    best: Tensor | None = None
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk]
        d2 = q_sq - 2.0 * queries @ part.T + bank_sq[start : start + chunk][None]
        m = d2.min(1).values
        best = m if best is None else torch.minimum(best, m)
    assert best is not None
    return best.clamp_min(0.0).sqrt()


def build_memory_bank(
    features: Tensor, size: int, sampler: str, seed: int, pool: int = 65536, proj_dim: int = 32
) -> Tensor:
    """A coreset of ``size`` rows of ``features`` (N, C): greedy k-center or random.

    Greedy k-center (as PatchCore) picks the point farthest from the bank so far, so rare
    normal patterns get a representative; distances are computed in a random projection to
    ``proj_dim`` dimensions over a random pool of at most ``pool`` rows to bound the cost.
    """
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    if n <= size:
        return features.clone()
    if sampler == "random":
        return features[torch.randperm(n, generator=gen)[:size]].clone()
    idx = torch.randperm(n, generator=gen)[: min(pool, n)]
    cand = features[idx]
    if cand.shape[1] > proj_dim:
        proj = torch.randn(cand.shape[1], proj_dim, generator=gen) / math.sqrt(proj_dim)
        reduced = cand @ proj.to(cand.dtype)
    else:
        reduced = cand
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(torch.randint(cand.shape[0], (1,), generator=gen))
    dist = (reduced - reduced[chosen[0]]).pow(2).sum(1)
    for i in range(1, size):
        chosen[i] = int(dist.argmax())
        dist = torch.minimum(dist, (reduced - reduced[chosen[i]]).pow(2).sum(1))
    return cand[torch.from_numpy(chosen)].clone()


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
