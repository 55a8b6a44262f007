"""Settings of the scorer model and of its training, as pydantic models.

:class:`ModelSettings` says what the model *is* (it travels inside the model file and the
scorer rebuilds the networks from it); :class:`TrainSettings` says how it was trained (also
stored, for provenance). The ablation variants of method.md §3 are presets of
:class:`ModelSettings`, so every variant comes from the same code by configuration alone::

    >>> settings = variant_settings("B")
    >>> settings.mdaae, settings.generator, settings.discriminator
    (True, 'none', 'none')
    >>> variant_settings("E", size=128).size
    128
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from linewatch.errors import ConfigError
from linewatch.model.preprocess import AugmentConfig, ExposureJitter

Variant = Literal["A", "B", "C", "D", "E"]
NetKind = Literal["none", "plain", "sa"]
Illumination = Literal["none", "lcn", "homomorphic"]
FeatureDistance = Literal["l2", "ssim", "mahalanobis"]
Reduce = Literal["max", "topk"]
DeviceChoice = Literal["auto", "cpu", "cuda"]

# Score terms of the joint map (method.md eq. 15 plus the memory bank), in a fixed order.
TERMS: tuple[str, ...] = ("feat", "pix", "disc", "mem")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreWeights(_Strict):
    """Weights of the normalised terms in the joint anomaly map (method.md eq. 15).

    ``feat``: MDAAE feature reconstruction (w_f), ``pix``: attention-weighted image residual
    of the generator (w_p), ``disc``: discriminator feature distance (lambda_D), ``mem``:
    distance to the memory bank of normal fused features.
    """

    feat: float = Field(0.0, ge=0)
    pix: float = Field(0.0, ge=0)
    disc: float = Field(0.0, ge=0)
    mem: float = Field(0.0, ge=0)

    def active(self) -> tuple[str, ...]:
        """Names of the terms with a non-zero weight, in :data:`TERMS` order."""
        return tuple(t for t in TERMS if getattr(self, t) > 0)


class ModelSettings(_Strict):
    """What the model is: pre-processing, networks and the joint score."""

    variant: Variant = "E"
    # -- pre-processing (method.md §0); one function serves training, evaluation and the worker
    size: int = Field(256, ge=32, le=2048, description="square model input side (pixels)")
    keep_aspect: bool = Field(False, description="letterbox instead of stretching")
    illumination: Illumination = "none"
    intensity: Literal["none", "standardise", "standardise_truncated"] = Field(
        "standardise_truncated",
        description="standardise: each frame to a fixed mean and std before pre-processing, "
        "which removes global gain and offset (exposure, lamp ageing), the statistics taken "
        "over the pixels not clipped; standardise_truncated: the same, but the statistics of a "
        "frame with a clipped plateau are corrected for what the clipping cut off (a normal "
        "distribution truncated at the clipped shares), so its texture keeps its contrast; "
        "measured on magnetic-tile (E, seeds 0-2): false alarms under strong light 6.4 % -> "
        "5.9 / 5.9 / 4.9 %, clean image AUROC unchanged (0.978)",
    )
    mask_clipped: bool = Field(
        True,
        description="leave plateaus clipped at the sensor's range (over/under-exposure) out "
        "of the score: they hold no texture to judge",
    )
    clipped_margin: int = Field(12, ge=0, description="margin around them (input pixels)")
    impulse_filter: bool = Field(
        True,
        description="replace isolated pixels at the frame's extreme values (salt-and-pepper, "
        "dead or hot pixels) by their 3x3 median before pre-processing",
    )
    # -- frozen backbone (eq. 2)
    backbone: str = "efficientnet_lite0"
    levels: tuple[str, ...] = ("s4", "s8", "s16")
    # -- MDAAE (eq. 3-7)
    mdaae: bool = True
    fusion_stride: int = Field(8, description="stride of the fused map Phi (a level's stride)")
    proj_channels: int = Field(32, ge=1, description="C of each 1x1 level projection P_l")
    fused_channels: int = Field(64, ge=1, description="channels of Phi")
    latent_channels: int = Field(32, ge=1, description="channels of the bottleneck z")
    latent_stride: int = Field(2, ge=1, le=4, description="extra down-sampling of z below Phi")
    tau: float = Field(1.0, gt=0, description="softmax temperature of the level weights")
    feature_distance: FeatureDistance = "mahalanobis"
    ssim_window: int = Field(3, ge=3, description="odd local window of the feature SSIM")
    level_weights: tuple[float, ...] | None = Field(
        None, description="beta_l = omega_l per level; None = equal"
    )
    # -- SA-GAN (§2)
    generator: NetKind = "sa"
    discriminator: NetKind = "sa"
    gen_channels: int = Field(32, ge=4, description="widest generator/encoder layer")
    disc_channels: int = Field(8, ge=4, description="first discriminator layer")
    pixel_scale: int = Field(
        2, ge=1, le=8, description="G and D work on the image down-sampled by this factor"
    )
    heads: int = Field(1, ge=1, description="self-attention heads (eq. 11)")
    # -- memory of normal fused features (the paper's memory bank of normal samples)
    memory: Literal["none", "gaussian", "knn"] = Field(
        "gaussian",
        description="gaussian: per-position mean/covariance of Phi (Mahalanobis distance); "
        "knn: distance to a coreset of Phi vectors",
    )
    memory_source: Literal["phi", "levels"] = Field(
        "levels", description="phi: the fused map; levels: the standardised levels, concatenated"
    )
    memory_stride: int = Field(16, description="grid of the memory (input pixels per cell)")
    bank_size: int = Field(2048, ge=16, description="knn: coreset size")
    bank_sampler: Literal["greedy", "random"] = "greedy"
    gauss_eps: float = Field(0.01, gt=0, description="gaussian: ridge added to each covariance")
    memory_exposure: ExposureJitter = Field(
        ExposureJitter(),
        description="the memory is fitted on the good training images plus this many "
        "exposure-jittered copies of each (gain, offset, clipping at the sensor's range), so "
        "the clipped and partly clipped texture of a drifting exposure is normal to it; "
        "measured on magnetic-tile: false alarms under strong light 12 % -> 8 %, clean image "
        "AUROC -0.001",
    )
    memory_shape_groups: int = Field(
        3, ge=1, le=8,
        description="gaussian: one memory per group of frame aspect ratio (width / height), "
        "split at quantiles of the training images', each group owning at least 100 of them "
        "(fewer groups with fewer images; one for frames of one shape). Frames of other shapes "
        "are stretched differently to the square input; measured on magnetic-tile (E, seeds "
        "0-2): test image AUROC 0.972 -> 0.978, pixel AUROC 0.804 -> 0.826",
    )
    memory_shape_overlap: float = Field(
        0.1, ge=0, le=0.5,
        description="each group's memory is also fitted on this share of the training images "
        "beyond each of its edges, so a frame near an edge is judged by statistics that saw "
        "its shape",
    )
    # -- joint score (eq. 15) and post-processing (§4)
    position_norm: bool = Field(
        False,
        description="standardise each term per pixel position with training statistics; "
        "needed for Euclidean distances (l2, ssim, knn), redundant for the per-position "
        "Gaussians (measured slightly worse on magnetic-tile)",
    )
    weights: ScoreWeights = Field(
        ScoreWeights(feat=1.0, pix=1.0, disc=1.0, mem=1.0),
        description="candidate terms and their weights before calibration chooses them",
    )
    sigma: float = Field(8.0, ge=0, description="Gaussian smoothing of the map (input pixels)")
    reduce: Reduce = "max"
    topk_fraction: float = Field(0.01, gt=0, le=1, description="share of pixels in top-k mean")
    frame_mean_weight: float = Field(
        1.0, ge=0,
        description="each frame's map is raised by this share of its mean over the judged "
        "pixels before the score is taken, so a change spread over the surface counts beyond "
        "its peak; 0 = the peak alone. On magnetic-tile val (E, seed 0) the image AUROC "
        "rises with it (0.9881 at 0, 0.9907 at 0.5, 0.9919 at 1, 0.9931 at 2) while AUPRO "
        "falls (0.792 at 0.5, 0.761 at 1, 0.702 at 2): at 1 peak and mean count equally. "
        "Model files written before this setting keep 0",
    )
    shape_groups: int = Field(
        2, ge=1, le=8,
        description="calibration standardises image scores per group of frame aspect ratio "
        "(width / height), split at quantiles of val/good's, at least 20 good images a group "
        "(fewer groups when val has fewer); 1 = off. Frames of other shapes are stretched "
        "differently to the square input, and the memory judges them differently; measured "
        "on magnetic-tile (E, seeds 0-2): test image AUROC 0.962 -> 0.972",
    )
    calibration_exposure: ExposureJitter = Field(
        ExposureJitter(),
        description="the operating point's precision also counts this many exposure-jittered "
        "copies of each val image (the memory's gain and offset ranges; its recall stays "
        "val's own), so a threshold that merely falls in a gap of the small clean val set "
        "pays for the false alarms an exposure drift brings; 0 copies = off. Measured on "
        "magnetic-tile (E, seeds 0-2, 2 copies): test false alarms at the operating point "
        "5.9-8.3 % -> 3.9 % clean and 9.3-12.7 % -> 6.4 % under strong light, recall "
        "0.93-0.94 -> 0.90-0.91",
    )
    operating_point_bandwidth: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="the operating point's precision is estimated from the good and "
        "defective scores of val and its exposure copies, each spread by a Gaussian kernel of "
        "this width (normalised score units), so the threshold follows the tails of the two "
        "score distributions instead of landing just above whichever good image a small set "
        "happens to leave below a gap; None = Silverman's rule on the good scores; 0 = counted "
        "(the rule before 2026-11-29). Candidates and recall are counted either way. "
        "Measured on magnetic-tile (E, seeds 0-2): counted, the threshold lay 0.006-0.011 "
        "above a good val score; strong-light false alarms 4.4 / 4.4 / 5.9 % -> 4.4 / 3.9 / "
        "3.9 %, clean recall 0.910 / 0.906 / 0.918 -> 0.901 / 0.906 / 0.901",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSettings:
        if self.size % 32:
            raise ValueError(f"size {self.size} must be a multiple of 32")
        if not self.levels:
            raise ValueError("levels: at least one backbone level is needed")
        if self.level_weights is not None and len(self.level_weights) != len(self.levels):
            raise ValueError("level_weights: one weight per level is needed")
        if self.ssim_window % 2 == 0:
            raise ValueError("ssim_window must be odd")
        needs = {
            "feat": self.mdaae,
            "mem": self.mdaae and self.memory != "none",
            "pix": self.generator != "none",
            "disc": self.discriminator != "none",
        }
        active = self.weights.active()
        if not active:
            raise ValueError("weights: at least one score term needs a positive weight")
        for term in active:
            if not needs[term]:
                raise ValueError(f"weights.{term} > 0 but the network it needs is switched off")
        if (
            self.pixel_scale & (self.pixel_scale - 1)
            or self.pixel_scale >= self.latent_total_stride
        ):
            raise ValueError("pixel_scale must be a power of 2 below the latent stride")
        if self.memory_stride not in (4, 8, 16, 32):
            raise ValueError("memory_stride must be 4, 8, 16 or 32")
        if self.discriminator != "none" and self.generator == "none":
            raise ValueError("a discriminator needs a generator")
        if self.generator == "none" and not self.mdaae:
            raise ValueError("need the MDAAE or a generator")
        return self

    @property
    def latent_total_stride(self) -> int:
        """Stride of the bottleneck z relative to the input image."""
        return (self.fusion_stride if self.mdaae else 8) * self.latent_stride

    @property
    def uses_backbone(self) -> bool:
        """Variants A and C work on pixels alone; the rest need backbone features."""
        return self.mdaae


# Variant presets (paper Table 2). E is the product; A-D switch parts off. Weights of terms
# a variant lacks are zero; the memory bank is an addition of ours, on in E only.
VARIANT_PRESETS: dict[str, dict[str, Any]] = {
    "A": {
        "mdaae": False,
        "generator": "plain",
        "discriminator": "plain",
        "memory": "none",
        "weights": {"pix": 1.0, "disc": 1.0},
    },
    "B": {
        "mdaae": True,
        "generator": "none",
        "discriminator": "none",
        "memory": "none",
        "weights": {"feat": 1.0},
    },
    "C": {
        "mdaae": False,
        "generator": "sa",
        "discriminator": "sa",
        "memory": "none",
        "weights": {"pix": 1.0, "disc": 1.0},
    },
    "D": {
        "mdaae": True,
        "generator": "plain",
        "discriminator": "plain",
        "memory": "none",
        "weights": {"feat": 1.0, "pix": 1.0, "disc": 1.0},
    },
    "E": {},
}


def variant_settings(variant: str = "E", **overrides: Any) -> ModelSettings:
    """The :class:`ModelSettings` of an ablation variant, with ``overrides`` applied on top.

    Raises :class:`ConfigError` naming the problem for an unknown variant or a bad override.
    """
    if variant not in VARIANT_PRESETS:
        raise ConfigError(f"unknown variant {variant!r}; expected one of A, B, C, D, E")
    values: dict[str, Any] = {"variant": variant, **VARIANT_PRESETS[variant]}
    weights = ModelSettings.model_fields["weights"].default.model_dump()
    weights.update(values.pop("weights", {}))
    explicit = dict(overrides.pop("weights", {}))
    values.update(overrides)
    # A part switched off by an override takes its (preset) weight with it; weights given
    # explicitly are kept, so a contradiction there is still reported.
    off = {
        "feat": values.get("mdaae") is False,
        "mem": values.get("mdaae") is False or values.get("memory") == "none",
        "pix": values.get("generator") == "none",
        "disc": values.get("discriminator") == "none" or values.get("generator") == "none",
    }
    weights = {t: (0.0 if off[t] else w) for t, w in weights.items()}
    values["weights"] = {**weights, **explicit}
    return _validated(ModelSettings, values)


class TrainSettings(_Strict):
    """How the model is trained. Stored in the model file next to :class:`ModelSettings`."""

    epochs: int = Field(
        6, ge=1, description="measured: 15 epochs score no better than 5 on magnetic-tile"
    )
    batch: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0, description="generator side (MDAAE + G) learning rate")
    lr_disc: float = Field(2e-4, gt=0)
    seed: int = 0
    device: DeviceChoice = "auto"
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    patience: int = Field(4, ge=1, description="early-stopping epochs without improvement")
    holdout: float = Field(
        0.1, ge=0, lt=1, description="train share held out when there is no val/good"
    )
    # -- loss weights (method.md eq. 6, 13, 14)
    weight_decay: float = Field(1e-5, ge=0, description="lambda of sum ||W||_F^2")
    sparsity: float = Field(1e-3, ge=0, description="gamma of ||z||_1")
    lambda_rec: float = Field(1.0, ge=0, description="masked L1 image reconstruction")
    lambda_fm: float = Field(1.0, ge=0, description="feature matching, generator side")
    lambda_fm_disc: float = Field(
        0.0, ge=0, description="feature matching in D's loss (eq. 13); 0 keeps D sharp"
    )
    lambda_adv: float = Field(0.05, ge=0, description="non-saturating adversarial loss")
    r1: float = Field(1.0, ge=0, description="mu of the R1 penalty on D")
    r1_every: int = Field(4, ge=1, description="lazy R1: every n-th discriminator step")
    augment: AugmentConfig = AugmentConfig()
    augment_copies: int = Field(
        1, ge=0, description="augmented views per training image (features cached once)"
    )
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")


def _validated(kind: type[_Strict], values: dict[str, Any]) -> Any:
    """Build ``kind`` from ``values``, turning validation errors into one-line ConfigErrors."""
    try:
        return kind.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind.__name__
        raise ConfigError(f"{kind.__name__}.{where}: {first['msg']}") from None


# Settings added after model files were first written, with the value that reproduces how
# those files scored: a stored config without the key predates it.
_BEFORE_THE_SETTING: dict[str, Any] = {"frame_mean_weight": 0.0}


def model_settings_from_dict(values: dict[str, Any]) -> ModelSettings:
    """:class:`ModelSettings` from a stored dict (a model file's config), as a ConfigError.

    A key the stored dict lacks because the file predates it takes the value the file was
    scored with, not today's default (``_BEFORE_THE_SETTING``).
    """
    result: ModelSettings = _validated(ModelSettings, {**_BEFORE_THE_SETTING, **values})
    return result


def train_settings(**values: Any) -> TrainSettings:
    """:class:`TrainSettings` from keyword values, with one-line ConfigErrors."""
    result: TrainSettings = _validated(TrainSettings, values)
    return result
