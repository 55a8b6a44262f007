"""The joint MDAAE / SA-GAN model and its anomaly map (method.md §3, eq. 15).

``A(x) = w_f norm(A_feat) + w_p norm(diag(Att) . |x - G(x)|) + lambda_D norm(A_disc)
+ w_m norm(A_mem)``, Gaussian-smoothed; the image score is its max (or top-k mean).

- ``A_feat``: MDAAE feature reconstruction distance (eq. 7: per-position Mahalanobis of the
  residual by default, or L2, or 1 - SSIM).
- ``A_pix``: the generator's image residual weighted by the diagonal of its self-attention.
- ``A_disc``: distance between D's attended features of ``x`` and ``G(x)`` (the feature
  matching term of eq. 13 read per position), so only D's feature layers run at scoring.
- ``A_mem``: distance of the multi-level features at each position to the memory of normal
  samples (a per-position Gaussian by default, or a kNN coreset).

``norm`` is an affine map per term fitted on defect-free validation images (see
:class:`TermNorm`), so that no term dominates by its units and the joint map is in "standard
deviations above the typical good image"; the weights are chosen on validation data by
calibration. The same :class:`JointModel` serves every ablation variant; parts a variant
switches off are simply absent.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from linewatch.model.mdaae import (
    MDAAE,
    MDAAEOutput,
    NormalMemory,
    feature_distance_map,
    resize_to,
)
from linewatch.model.sagan import Discriminator, Generator, ImageEncoder, attention_mask
from linewatch.model.settings import TERMS, ModelSettings, ScoreWeights

if TYPE_CHECKING:  # the scorer imports this module
    from linewatch.model.scorer import Region

__all__ = [
    "JointForward",
    "JointModel",
    "Normalisation",
    "ShapeGroups",
    "TermNorm",
    "gaussian_blur",
    "judged_pixels",
    "raise_by_frame_mean",
    "reduce_map",
]


class TermNorm(BaseModel):
    """``norm(A) = (A - offset) / scale`` for one term."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offset: float = 0.0
    scale: float = Field(1.0, gt=0)


class ShapeGroups(BaseModel):
    """Joint maps centred per group of frame aspect ratio (width / height).

    Frames of every shape are stretched to the square model input, so a narrow frame's
    texture is stretched twice as much as a square one's, and the per-position statistics
    judge the two differently: on magnetic-tile, good frames narrower than 1:2 scored higher
    and wide frames' defects lower. Each group's maps are shifted by the median of its good
    images' joint scores, and all of them divided by one scale (the MAD x 1.4826 of the
    centred good scores), so that one threshold fits every group. Centring only, not a scale
    per group: per-group scales cost pixel AUROC (0.800 against 0.804) for no image AUROC.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    edges: list[float] = Field(min_length=1, description="aspect ratios between groups, rising")
    centre: list[float] = Field(description="median joint score of each group's good images")
    scale: float = Field(gt=0, description="MAD x 1.4826 of the good images' centred scores")

    @model_validator(mode="after")
    def _consistent(self) -> ShapeGroups:
        if len(self.centre) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges) + 1} groups need as many centres")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must rise")
        return self

    def group(self, aspect: float) -> int:
        """The group of a frame of ``aspect`` = width / height."""
        return bisect.bisect_right(self.edges, aspect)

    def standardise(self, maps: Tensor, aspects: Sequence[float]) -> Tensor:
        """``(map - centre) / scale`` with each frame's group's centre; maps (B, 1, H, W)."""
        centre = torch.tensor([self.centre[self.group(a)] for a in aspects], dtype=maps.dtype)
        return (maps - centre.to(maps.device).view(-1, 1, 1, 1)) / self.scale


class Normalisation(BaseModel):
    """Per-term normalisation, fitted on defect-free images; stored in the model file.

    ``offset``/``scale`` are the mean/std over good images of the term's per-image score
    (max or top-k mean of its smoothed map), so a joint score of 3 reads "three standard
    deviations above a typical good image" whatever the term's own units.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    terms: dict[str, TermNorm] = Field(default_factory=dict)
    source: str = Field("none", description="which images the statistics came from")
    n_images: int = Field(0, ge=0)
    weights: ScoreWeights | None = Field(
        None, description="term weights chosen on validation data; None = the settings'"
    )
    shape_groups: ShapeGroups | None = Field(
        None, description="per aspect-ratio standardisation of the joint map; None = none"
    )

    def get(self, term: str) -> TermNorm:
        """The normalisation of ``term``; identity when not fitted."""
        return self.terms.get(term, TermNorm())


@dataclass
class JointForward:
    """What one pass of the networks produced; the terms are computed from it."""

    x: Tensor
    targets: list[Tensor] | None = None
    ae: MDAAEOutput | None = None
    z: Tensor | None = None
    x_pix: Tensor | None = None
    x_hat: Tensor | None = None
    att: Tensor | None = None
    aspects: Tensor | None = None  # (B,) width / height of each frame, for the memory's groups


class JointModel(nn.Module):
    """All trainable networks of one variant plus the memories of normal appearance (buffers).

    The frozen backbone is not part of it: its weights ship with the package and it runs once
    per frame outside, so the model file holds only what training produced.
    """

    pos_mean: Tensor
    pos_std: Tensor

    def __init__(
        self,
        settings: ModelSettings,
        level_channels: Sequence[int] = (),
        level_strides: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.settings = s = settings
        self.mdaae: MDAAE | None = None
        self.image_encoder: ImageEncoder | None = None
        self.generator: Generator | None = None
        self.discriminator: Discriminator | None = None
        # G and D see the image at 1/pixel_scale: a full-resolution decoder would cost more
        # than the backbone, and the pixel terms need texture, not sensor-level detail.
        latent_stride = s.latent_total_stride // s.pixel_scale
        if s.mdaae:
            self.mdaae = MDAAE(
                level_channels,
                level_strides,
                s.fusion_stride,
                s.proj_channels,
                s.fused_channels,
                s.latent_channels,
                s.latent_stride,
                s.tau,
            )
        elif s.generator != "none":
            self.image_encoder = ImageEncoder(
                s.latent_channels, latent_stride, s.gen_channels, s.generator == "sa", s.heads
            )
        if s.generator != "none":
            self.generator = Generator(
                s.latent_channels, latent_stride, s.gen_channels, s.generator == "sa", s.heads
            )
        if s.discriminator != "none":
            self.discriminator = Discriminator(
                latent_stride, s.disc_channels, s.latent_channels, s.discriminator == "sa", s.heads
            )
        n_levels = len(s.levels)
        self.level_weights = s.level_weights or tuple(1.0 / n_levels for _ in range(n_levels))
        memory_channels = s.fused_channels if s.memory_source == "phi" else sum(level_channels)
        self.memory = NormalMemory(s.memory, memory_channels) if s.mdaae else None
        # Per-position statistics of each raw term map (TERMS order) on a grid of size/4.
        grid = s.size // 4
        self.register_buffer("pos_mean", torch.zeros(len(TERMS), grid, grid))
        self.register_buffer("pos_std", torch.ones(len(TERMS), grid, grid))
        self.norm = Normalisation()

    # ------------------------------------------------------------------ parameters
    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything the reconstruction side trains (MDAAE, image encoder, G)."""
        parts = (self.mdaae, self.image_encoder, self.generator)
        return [p for m in parts if m is not None for p in m.parameters()]

    def _memories(self) -> Iterator[tuple[str, NormalMemory]]:
        """Every memory of normal features with its state-dict prefix."""
        if self.memory is not None:
            yield "memory.", self.memory
        if self.mdaae is not None:
            for i, memory in enumerate(self.mdaae.residual_memories):
                yield f"mdaae.residual_memory.{i}.", memory

    def file_tensors(self) -> dict[str, Tensor]:
        """The state dict as a model file stores it: memory precisions packed (half size)."""
        tensors = dict(self.state_dict())
        for prefix, _ in self._memories():
            NormalMemory.pack_for_file(tensors, prefix)
        return tensors

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Load a state dict from a model file; memory buffers take the stored shapes."""
        tensors = dict(tensors)  # older memory layouts are rewritten in place
        for prefix, memory in self._memories():
            memory.take_shapes(tensors, prefix)
        self.load_state_dict(tensors, strict=True)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        feats: Sequence[Tensor] | None = None,
        terms: Iterable[str] | None = None,
        aspects: Tensor | None = None,
    ) -> JointForward:
        """Run the reconstruction side: MDAAE on ``feats`` and/or G on ``x``.

        ``terms`` limits the work to what those score terms need (the scorer of a model whose
        calibrated weights switch terms off skips their networks); None runs everything.
        ``aspects`` (B,), each frame's width / height, picks the memory's group of frame
        shape (:attr:`Prepared.aspects`); needed for the memory term when it has groups.
        """
        wanted = set(TERMS if terms is None else terms)
        pixels = bool(wanted & {"pix", "disc"})
        out = JointForward(x=x, aspects=aspects)
        if self.mdaae is not None:
            if feats is None:
                raise ValueError("this variant needs backbone features")
            out.targets = self.mdaae.standardise(feats)
            needs_ae = pixels or "feat" in wanted or self.settings.memory_source == "phi"
            if needs_ae:
                out.ae = self.mdaae(out.targets)
                out.z = out.ae.z
        if self.generator is not None and pixels:
            scale = self.settings.pixel_scale
            out.x_pix = F.avg_pool2d(x, scale) if scale > 1 else x
            if self.image_encoder is not None:
                out.z = self.image_encoder(out.x_pix)
            assert out.z is not None
            out.x_hat, out.att = self.generator(out.z)
        return out

    # ------------------------------------------------------------------ anomaly terms
    @property
    def grid(self) -> tuple[int, int]:
        """Resolution of the term maps: the stride-4 grid of the model input.

        Every term is computed, normalised, combined and smoothed on this grid and only the
        joint map is up-sampled, which costs a sixteenth of doing it at input resolution.
        """
        return (int(self.pos_mean.shape[-2]), int(self.pos_mean.shape[-1]))

    def term_maps(
        self, fwd: JointForward, terms: Iterable[str], position_norm: bool = True
    ) -> dict[str, Tensor]:
        """Maps (B, 1, *grid) of the requested terms, not smoothed.

        With ``position_norm`` (and the setting on) each map is standardised per position with
        :meth:`fit_position_norm`'s statistics; otherwise raw.
        """
        maps = self._raw_term_maps(fwd, terms)
        if position_norm and self.settings.position_norm:
            maps = {t: self._position_normalise(t, m) for t, m in maps.items()}
        return maps

    def fit_position_norm(self, batches: Iterable[JointForward]) -> None:
        """Per-position mean and std of every available raw term over normal images."""
        terms = self.available_terms()
        sums: dict[str, Tensor] = {}
        squares: dict[str, Tensor] = {}
        n = 0
        for fwd in batches:
            for t, m in self._raw_term_maps(fwd, terms).items():
                g = m.double()[:, 0]
                sums[t] = sums.get(t, 0) + g.sum(0)
                squares[t] = squares.get(t, 0) + g.pow(2).sum(0)
            n += fwd.x.shape[0]
        if n < 2:
            raise ValueError("position normalisation needs at least 2 images")
        for t in terms:
            i = TERMS.index(t)
            mean = sums[t] / n
            var = (squares[t] - n * mean.pow(2)) / (n - 1)
            std = var.clamp_min(0).sqrt()
            # A floor: a position that never varies must not turn noise into alarms.
            self.pos_mean[i] = mean.float()
            self.pos_std[i] = std.clamp_min(0.05 * float(std.mean()) + 1e-12).float()

    def _position_normalise(self, term: str, m: Tensor) -> Tensor:
        i = TERMS.index(term)
        return (m - self.pos_mean[i]) / self.pos_std[i]

    def _raw_term_maps(self, fwd: JointForward, terms: Iterable[str]) -> dict[str, Tensor]:
        maps: dict[str, Tensor] = {}
        for term in terms:
            if term == "feat":
                maps[term] = self._feat_map(fwd)
            elif term == "pix":
                maps[term] = self._pix_map(fwd)
            elif term == "disc":
                maps[term] = self._disc_map(fwd)
            elif term == "mem":
                maps[term] = self._mem_map(fwd)
            else:
                raise ValueError(f"unknown score term {term!r}; known: {', '.join(TERMS)}")
        return maps

    def available_terms(self) -> tuple[str, ...]:
        """The terms this variant can compute."""
        have = {
            "feat": self.mdaae is not None,
            "pix": self.generator is not None,
            "disc": self.discriminator is not None,
            "mem": self.memory is not None and self.memory.ready,
        }
        return tuple(t for t in TERMS if have[t])

    def _feat_map(self, fwd: JointForward) -> Tensor:
        assert fwd.ae is not None and fwd.targets is not None
        s = self.settings
        if s.feature_distance == "mahalanobis":
            assert self.mdaae is not None
            return self.mdaae.residual_distance(
                fwd.ae.recon, fwd.targets, self.level_weights, self.grid
            )
        return feature_distance_map(
            fwd.ae.recon,
            fwd.targets,
            self.level_weights,
            s.feature_distance,
            self.grid,
            s.ssim_window,
        )

    def _pix_map(self, fwd: JointForward) -> Tensor:
        assert fwd.x_hat is not None and fwd.x_pix is not None
        residual = resize_to((fwd.x_pix - fwd.x_hat).abs().mean(1, keepdim=True), self.grid)
        if fwd.att is not None and fwd.z is not None:
            latent = (int(fwd.z.shape[-2]), int(fwd.z.shape[-1]))
            residual = residual * attention_mask(fwd.att, self.grid, latent)
        return residual

    def _disc_map(self, fwd: JointForward) -> Tensor:
        assert self.discriminator is not None and fwd.x_hat is not None and fwd.x_pix is not None
        real = self.discriminator.features(fwd.x_pix)[-1]
        fake = self.discriminator.features(fwd.x_hat)[-1]
        return resize_to((real - fake).pow(2).mean(1, keepdim=True), self.grid)

    def memory_features(self, fwd: JointForward) -> Tensor:
        """What the memory of normal features holds, on the memory grid (B, C, h, w)."""
        assert fwd.targets is not None
        s = self.settings
        cells = (s.size // s.memory_stride, s.size // s.memory_stride)
        if s.memory_source == "phi":
            assert fwd.ae is not None
            return resize_to(fwd.ae.phi, cells)
        return torch.cat([resize_to(t, cells) for t in fwd.targets], 1)

    def _mem_map(self, fwd: JointForward) -> Tensor:
        assert self.memory is not None
        distance = self.memory.distance(self.memory_features(fwd), fwd.aspects)
        return resize_to(distance, self.grid)

    # ------------------------------------------------------------------ joint map
    def smooth(self, m: Tensor) -> Tensor:
        """Gaussian smoothing on the grid (sigma given in input pixels), up-sampled to the input."""
        scale = self.settings.size / self.grid[1]
        up = gaussian_blur(m, self.settings.sigma / scale)
        return resize_to(up, (self.settings.size, self.settings.size))

    @property
    def weights(self) -> ScoreWeights:
        """The term weights in force: chosen at calibration, else the settings'."""
        return self.norm.weights or self.settings.weights

    def joint_map(
        self,
        maps: Mapping[str, Tensor],
        regions: Sequence[Region],
        weights: ScoreWeights | None = None,
    ) -> Tensor:
        """``smooth(sum_t w_t norm_t(A_t))`` (B, 1, size, size) over the weighted terms, each
        frame's map raised by ``frame_mean_weight`` x its mean over its ``regions``' judged
        pixels (:func:`raise_by_frame_mean`).

        Smoothing is linear, so smoothing the weighted sum equals summing the smoothed terms
        that :meth:`Normalisation` statistics are fitted on; so is the raise, which comes
        before the offsets, so val's good frames still centre on 0. ``weights`` defaults to
        :attr:`weights`.
        """
        w = weights or self.weights
        total: Tensor | None = None
        offset = 0.0
        for term in w.active():
            n = self.norm.get(term)
            weight = getattr(w, term)
            part = maps[term] * (weight / n.scale)
            offset += weight * n.offset / n.scale
            total = part if total is None else total + part
        if total is None:
            raise ValueError("no score term has a positive weight")
        raised = raise_by_frame_mean(self.smooth(total), regions, self.settings.frame_mean_weight)
        return raised - offset


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps with reflected borders."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3.0 * sigma))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1))


def judged_pixels(amap: Tensor, region: Region) -> Tensor:
    """The values (N,) of one (1, S, S) map that its frame's score looks at: the frame's box
    without its blind pixels (the whole box for a frame blind everywhere)."""
    top, left, h, w = region.box
    crop = amap[0, top : top + h, left : left + w]
    if region.blind is not None and not region.blind.all():
        return crop[torch.from_numpy(~region.blind).to(crop.device)]
    return crop.reshape(-1)


def raise_by_frame_mean(maps: Tensor, regions: Sequence[Region], weight: float) -> Tensor:
    """(B, 1, S, S) ``maps``, each raised by ``weight`` x its mean over its judged pixels.

    The score then weighs how much of the frame looks unusual as well as its worst spot: a
    change spread over the surface (an uneven region) counts beyond its peak. Every pixel
    moves by the same amount, so a map thresholded at the image threshold still shows the
    pixels that made the verdict.
    """
    if weight == 0.0 or len(regions) == 0:
        return maps
    means = torch.stack([judged_pixels(maps[i], r).mean() for i, r in enumerate(regions)])
    return maps + weight * means.view(-1, 1, 1, 1)


def reduce_map(amap: Tensor, reduce: str, topk_fraction: float) -> Tensor:
    """Image scores (B,) from smoothed maps (B, 1, H, W): max or mean of the top-k pixels."""
    flat = amap.flatten(1)
    if reduce == "max":
        return flat.max(1).values
    k = max(1, round(flat.shape[1] * topk_fraction))
    return flat.topk(k, dim=1).values.mean(1)
