"""Training of the joint model on defect-free images (``linewatch train``).

The backbone is frozen, so its features are computed once per image (and per augmented
copy, method.md eq. 12) and cached in memory as float16; the epochs then run only the small
heads. Order of work, so that a bad input fails in seconds, not after an hour:

1. validate the data set (every file of ``train`` and ``val`` is read);
2. cache backbone features of ``train`` (plus augmented copies) and of ``val/good``;
3. train the heads, with early stopping on the ``val/good`` reconstruction loss (or on a
   held-out share of ``train`` when there is no ``val``), a checkpoint every epoch and
   ``resume`` from it;
4. build the memory bank (on the training images plus exposure-jittered copies, see
   :func:`exposure_batches`), fit the per-term normalisation on the good held-out images,
   write the model file, and calibrate thresholds when ``val`` holds defective images.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from tqdm import tqdm

from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset, Sample
from linewatch.errors import DataError, ModelFileError
from linewatch.log import get_logger
from linewatch.model.aspect import memory_groups
from linewatch.model.backbone import FeatureExtractor
from linewatch.model.joint import JointModel
from linewatch.model.modelfile import (
    ModelMeta,
    fingerprint_images,
    load_model_file,
    save_model_file,
)
from linewatch.model.preprocess import AugmentConfig, augment, jitter_exposure
from linewatch.model.sagan import (
    attention_mask,
    disc_loss,
    feature_matching,
    generator_adv_loss,
    r1_penalty,
)
from linewatch.model.scorer import (
    Prepared,
    Region,
    Scorer,
    build_backbone,
    model_input,
    preprocess_config,
)
from linewatch.model.scorer import resolve_device as _resolve_device
from linewatch.model.settings import ModelSettings, TrainSettings

__all__ = [
    "FeatureCache",
    "TrainData",
    "TrainReport",
    "build_cache",
    "exposure_batches",
    "prepare_data",
    "train",
    "train_on_cache",
]

log = get_logger("train")

_EXTRACT_BATCH = 16


# --------------------------------------------------------------------------- feature cache


@dataclass
class FeatureCache:
    """Model inputs and backbone features of a set of images, in memory as float16.

    ``x`` is kept only when a generator needs pixels; ``feats`` only when the variant uses
    the backbone. ``regions`` says where each image lies in the model input.
    """

    x: Tensor | None
    feats: list[Tensor] | None
    regions: list[Region]
    size: tuple[int, int]
    labels: list[int] = field(default_factory=list)
    originals: int = -1

    def __post_init__(self) -> None:
        if self.originals < 0:
            self.originals = len(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def unaugmented(self) -> FeatureCache:
        """The first ``originals`` rows: the images as the camera gave them, no augmented views.

        Statistics of normal appearance *per position* (memory, residual Gaussians, position
        normalisation) are fitted on these: a rotated or shifted view puts a tile border
        where no test image has one and blurs exactly what those statistics are for.
        """
        n = self.originals
        return FeatureCache(
            x=self.x[:n] if self.x is not None else None,
            feats=[f[:n] for f in self.feats] if self.feats is not None else None,
            regions=self.regions[:n],
            size=self.size,
            labels=self.labels[:n],
        )

    def batch(self, index: Sequence[int] | Tensor | np.ndarray, device: torch.device) -> Prepared:
        """Rows ``index`` as a float32 :class:`Prepared` batch on ``device``."""
        idx = torch.as_tensor(index, dtype=torch.long)
        x = self.x[idx].to(device, torch.float32) if self.x is not None else None
        feats = (
            [f[idx].to(device, torch.float32) for f in self.feats]
            if self.feats is not None
            else None
        )
        if x is None:  # heads without a generator still need the input size (no memory)
            x = torch.zeros(1, 1, 1, 1, device=device).expand(len(idx), 1, *self.size)
        return Prepared(x=x, feats=feats, regions=[self.regions[int(i)] for i in idx])

    def batches(self, size: int, device: torch.device) -> Iterator[Prepared]:
        """All rows in order, in batches of ``size``."""
        for start in range(0, len(self), size):
            yield self.batch(range(start, min(start + size, len(self))), device)


def build_cache(
    images: Sequence[np.ndarray],
    settings: ModelSettings,
    backbone: FeatureExtractor | None,
    device: torch.device,
    keep_pixels: bool,
    labels: Sequence[int] | None = None,
    augment_cfg: AugmentConfig | None = None,
    copies: int = 0,
    rng: np.random.Generator | None = None,
) -> FeatureCache:
    """Pre-process ``images`` (plus ``copies`` augmented views each) and cache features."""
    cfg = preprocess_config(settings)
    views: list[np.ndarray] = list(images)
    view_labels = list(labels) if labels is not None else [0] * len(images)
    if copies and augment_cfg is not None:
        gen = rng if rng is not None else np.random.default_rng(0)
        for _ in range(copies):
            views += augment(images, gen, augment_cfg)
            view_labels += view_labels[: len(images)]
    xs: list[Tensor] = []
    feats: list[list[Tensor]] = []
    regions: list[Region] = []
    for start in range(0, len(views), _EXTRACT_BATCH):
        chunk = views[start : start + _EXTRACT_BATCH]
        x, chunk_regions = model_input(chunk, settings, device)
        regions += chunk_regions
        if keep_pixels:
            xs.append(x.to("cpu", torch.float16))
        if backbone is not None:
            with torch.inference_mode():
                levels = backbone(x)
            feats.append([f.to("cpu", torch.float16) for f in levels])
    return FeatureCache(
        x=torch.cat(xs) if xs else None,
        feats=[torch.cat(level) for level in zip(*feats, strict=True)] if feats else None,
        regions=regions,
        size=cfg.hw,
        labels=view_labels,
        originals=len(images),
    )


def _needs_pixels(settings: ModelSettings) -> bool:
    return settings.generator != "none"


def _feature_stats(cache: FeatureCache) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of every level over the cached training features."""
    assert cache.feats is not None
    means, stds = [], []
    for f in cache.feats:
        flat = f.float().transpose(0, 1).reshape(f.shape[1], -1)
        means.append(flat.mean(1))
        stds.append(flat.std(1))
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------- training steps


class _Optimisers:
    """The generator-side and discriminator optimisers with their (CUDA) grad scaler."""

    def __init__(self, model: JointModel, ts: TrainSettings, amp: bool) -> None:
        self.g = torch.optim.Adam(
            model.generator_parameters(),
            lr=ts.lr,
            betas=(0.5, 0.999),
            weight_decay=ts.weight_decay,
        )
        self.d = (
            torch.optim.Adam(
                model.discriminator.parameters(),
                lr=ts.lr_disc,
                betas=(0.5, 0.999),
                weight_decay=ts.weight_decay,
            )
            if model.discriminator is not None
            else None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp)


def _reconstruction_loss(
    model: JointModel, prep: Prepared, ts: TrainSettings, logs: dict[str, float]
) -> tuple[Tensor, Any]:
    """MDAAE loss (eq. 6) + masked L1 of the generator (first term of eq. 14)."""
    fwd = model(prep.x, prep.feats)
    loss = prep.x.new_zeros(())
    if fwd.ae is not None and fwd.targets is not None and model.mdaae is not None:
        rec, _ = model.mdaae.loss(fwd.ae, fwd.targets, model.level_weights, ts.sparsity)
        loss = loss + rec
        logs["rec"] = float(rec.detach())
    if fwd.x_hat is not None and fwd.x_pix is not None:
        residual = (fwd.x_pix - fwd.x_hat).abs().mean(1, keepdim=True)
        if fwd.att is not None and fwd.z is not None:
            size = (int(residual.shape[-2]), int(residual.shape[-1]))
            mask = attention_mask(fwd.att, size, (int(fwd.z.shape[-2]), int(fwd.z.shape[-1])))
            residual = residual * mask.detach()
        pix = residual.mean()
        loss = loss + ts.lambda_rec * pix
        logs["pix"] = float(pix.detach())
    return loss, fwd


def _train_step(
    model: JointModel, prep: Prepared, ts: TrainSettings, opt: _Optimisers, step: int, amp: bool
) -> dict[str, float]:
    """One step: a discriminator update (if any), then one generator-side update."""
    logs: dict[str, float] = {}
    device_type = prep.x.device.type
    with torch.autocast(device_type, enabled=amp):
        loss_g, fwd = _reconstruction_loss(model, prep, ts, logs)
    d = model.discriminator
    if d is not None and opt.d is not None and fwd.x_hat is not None and fwd.x_pix is not None:
        z = fwd.z.detach() if fwd.z is not None else None
        d.requires_grad_(True)
        opt.d.zero_grad(set_to_none=True)
        lazy_r1 = ts.r1 > 0 and step % ts.r1_every == 0
        real = fwd.x_pix.detach().requires_grad_(lazy_r1)
        with torch.autocast(device_type, enabled=amp):
            f_real = d.features(real)
            f_fake = d.features(fwd.x_hat.detach())
            logit_real = d.head(f_real[-1], z)
            loss_d = disc_loss(logit_real, d.head(f_fake[-1], z))
            if ts.lambda_fm_disc > 0:
                loss_d = loss_d + ts.lambda_fm_disc * feature_matching(f_real, f_fake)
        if lazy_r1:
            loss_d = loss_d + ts.r1 * ts.r1_every * r1_penalty(logit_real.float(), real)
        opt.scaler.scale(loss_d).backward()
        opt.scaler.step(opt.d)
        logs["d"] = float(loss_d.detach())
        # The generator's adversarial and feature-matching terms (eq. 14); D is frozen here.
        d.requires_grad_(False)
        with torch.autocast(device_type, enabled=amp):
            f_gen = d.features(fwd.x_hat)
            adv = generator_adv_loss(d.head(f_gen[-1], fwd.z))
            fm = feature_matching([f.detach() for f in f_real], f_gen)
            loss_g = loss_g + ts.lambda_adv * adv + ts.lambda_fm * fm
        logs["adv"] = float(adv.detach())
        logs["fm"] = float(fm.detach())
    opt.g.zero_grad(set_to_none=True)
    opt.scaler.scale(loss_g).backward()
    opt.scaler.step(opt.g)
    opt.scaler.update()
    return logs


def _validation_loss(
    model: JointModel, cache: FeatureCache, ts: TrainSettings, device: torch.device
) -> float:
    """Mean reconstruction loss over good held-out images (the early-stopping criterion)."""
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for prep in cache.batches(ts.batch, device):
            logs: dict[str, float] = {}
            loss, _ = _reconstruction_loss(model, prep, ts, logs)
            total += float(loss) * prep.x.shape[0]
            n += prep.x.shape[0]
    model.train()
    return total / max(n, 1)


# --------------------------------------------------------------------------- checkpoints


class _CheckpointState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    elapsed_s: float = 0.0


def checkpoint_path(out: Path) -> Path:
    """Where ``train`` keeps its checkpoint next to the model file ``out``."""
    return out.with_name(f"{out.stem}.ckpt.lwm")


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], Any]:
    state = opt.state_dict()
    tensors = {
        f"{prefix}.{pid}.{key}": value
        for pid, entry in state["state"].items()
        for key, value in entry.items()
        if isinstance(value, Tensor)
    }
    return tensors, state["param_groups"]


def _load_optimizer(
    opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, Tensor], groups: Any
) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save_checkpoint(
    path: Path,
    model: JointModel,
    best: dict[str, Tensor],
    opt: _Optimisers,
    config: dict[str, Any],
    state: _CheckpointState,
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    g_tensors, g_groups = _optimizer_tensors("opt_g", opt.g)
    tensors.update(g_tensors)
    groups: dict[str, Any] = {"opt_g": g_groups}
    if opt.d is not None:
        d_tensors, groups["opt_d"] = _optimizer_tensors("opt_d", opt.d)
        tensors.update(d_tensors)
    ckpt = {**config, "checkpoint": {"state": state.model_dump(), "optimizers": groups}}
    save_model_file(path, tensors, ModelMeta(config=ckpt))


def _load_checkpoint(
    path: Path, model: JointModel, opt: _Optimisers, config: dict[str, Any]
) -> tuple[dict[str, Tensor], _CheckpointState]:
    tensors, meta = load_model_file(path)
    stored = {k: v for k, v in meta.config.items() if k != "checkpoint"}
    if json.dumps(stored, sort_keys=True) != json.dumps(config, sort_keys=True):
        raise ModelFileError(
            f"{path}: checkpoint was made with other settings or data; delete it or drop --resume"
        )
    ckpt = meta.config["checkpoint"]
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    _load_optimizer(opt.g, "opt_g", tensors, ckpt["optimizers"]["opt_g"])
    if opt.d is not None:
        _load_optimizer(opt.d, "opt_d", tensors, ckpt["optimizers"]["opt_d"])
    return best, _CheckpointState.model_validate(ckpt["state"])


# --------------------------------------------------------------------------- the loop


class TrainReport(BaseModel):
    """What a training run did."""

    model_config = ConfigDict(extra="forbid")

    model_path: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    train_images: int
    cached_views: int
    seconds: float
    feature_seconds: float
    calibrated: bool


def _state_copy(model: JointModel) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_on_cache(
    model: JointModel,
    train_cache: FeatureCache,
    val_cache: FeatureCache,
    ts: TrainSettings,
    device: torch.device,
    checkpoint: Path | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> _CheckpointState:
    """Train ``model`` on cached features; leaves the best weights (lowest val loss) loaded."""
    amp = ts.amp and device.type == "cuda"
    model.to(device).train()
    opt = _Optimisers(model, ts, amp)
    state = _CheckpointState()
    best = _state_copy(model)
    if resume and checkpoint is not None and checkpoint.exists():
        best, state = _load_checkpoint(checkpoint, model, opt, config or {})
        log.info("resumed", checkpoint=str(checkpoint), epoch=state.epoch)
    steps = max(1, len(train_cache) // ts.batch)
    bar = tqdm(
        total=ts.epochs * steps,
        initial=state.epoch * steps,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    start = time.monotonic() - state.elapsed_s
    while state.epoch < ts.epochs and state.bad_epochs < ts.patience:
        order = np.random.default_rng([ts.seed, state.epoch]).permutation(len(train_cache))
        running: dict[str, float] = {}
        for i in range(steps):
            prep = train_cache.batch(order[i * ts.batch : (i + 1) * ts.batch], device)
            logs = _train_step(model, prep, ts, opt, state.epoch * steps + i, amp)
            for k, v in logs.items():
                running[k] = 0.9 * running.get(k, v) + 0.1 * v
            bar.set_description(f"epoch {state.epoch + 1}/{ts.epochs}")
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
            bar.update(1)
        val = _validation_loss(model, val_cache, ts, device)
        state.epoch += 1
        if val < state.best_loss - 1e-6:
            state.best_loss, state.best_epoch, state.bad_epochs = val, state.epoch, 0
            best = _state_copy(model)
        else:
            state.bad_epochs += 1
        state.elapsed_s = time.monotonic() - start
        log.debug("epoch_done", epoch=state.epoch, val_loss=round(val, 6), **running)
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in running.items()}, "val": f"{val:.4f}"})
        if checkpoint is not None and state.epoch % ts.checkpoint_every == 0:
            _save_checkpoint(checkpoint, model, best, opt, config or {}, state)
    bar.close()
    if state.bad_epochs >= ts.patience:
        log.info("early_stop", epoch=state.epoch, best_epoch=state.best_epoch)
    model.load_state_dict(best)
    model.eval()
    return state


def _load_images(samples: Sequence[Sample]) -> list[np.ndarray]:
    return [read_image(s.path) for s in samples]


def _split_holdout(
    samples: list[Sample], share: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    if share <= 0 or len(samples) < 4:
        raise DataError("no val/good images and no train hold-out: set holdout > 0")
    n_hold = max(1, round(len(samples) * share))
    order = np.random.default_rng(seed).permutation(len(samples))
    hold = {int(i) for i in order[:n_hold]}
    return [s for i, s in enumerate(samples) if i not in hold], [samples[i] for i in sorted(hold)]


def model_config(settings: ModelSettings, ts: TrainSettings, fingerprint: str) -> dict[str, Any]:
    """The ``config`` stored in the model file (and compared on ``--resume``)."""
    return {
        "model": settings.model_dump(mode="json"),
        "train": ts.model_dump(mode="json"),
        "data_sha256": fingerprint,
    }


def model_tensors(model: JointModel) -> dict[str, Tensor]:
    """What goes into the model file: every parameter and buffer of the heads."""
    return {k: v.detach() for k, v in model.file_tensors().items()}


@dataclass
class TrainData:
    """A validated data set with its feature caches; reusable across variants and runs
    that share pre-processing, backbone levels, augmentation and seed (the ablation)."""

    dataset: MVTecDataset
    train_samples: list[Sample]
    val_samples: list[Sample]
    fit_samples: list[Sample]
    fingerprint: Any
    train_cache: FeatureCache
    hold_cache: FeatureCache
    feature_seconds: float


def prepare_data(
    data: str | Path,
    settings: ModelSettings,
    ts: TrainSettings,
    device: torch.device,
    backbone: FeatureExtractor | None,
    keep_pixels: bool,
) -> TrainData:
    """Validate ``data`` (every file is read) and cache the features training needs."""
    dataset = MVTecDataset(data)
    train_samples = dataset.validate("train")
    val_samples = dataset.validate("val") if "val" in dataset.splits() else []
    val_good = [s for s in val_samples if not s.is_defect]
    if val_good:
        fit_samples, hold_samples = train_samples, val_good
    else:
        fit_samples, hold_samples = _split_holdout(train_samples, ts.holdout, ts.seed)
    fingerprint = fingerprint_images([s.path for s in train_samples], root=dataset.root)
    started = time.monotonic()
    rng = np.random.default_rng(ts.seed)
    train_cache = build_cache(
        _load_images(fit_samples),
        settings,
        backbone,
        device,
        keep_pixels,
        augment_cfg=ts.augment,
        copies=ts.augment_copies,
        rng=rng,
    )
    hold_cache = build_cache(_load_images(hold_samples), settings, backbone, device, keep_pixels)
    seconds = time.monotonic() - started
    log.info(
        "features_cached",
        train_views=len(train_cache),
        holdout=len(hold_cache),
        seconds=round(seconds, 1),
    )
    return TrainData(
        dataset,
        train_samples,
        val_samples,
        fit_samples,
        fingerprint,
        train_cache,
        hold_cache,
        seconds,
    )


def train(
    data: str | Path,
    out: str | Path,
    settings: ModelSettings,
    ts: TrainSettings,
    resume: bool = False,
    progress: bool = True,
    calibrate: bool = True,
    prepared: TrainData | None = None,
) -> TrainReport:
    """Train a model on ``data``/train and write it to ``out`` (see the module docstring).

    ``prepared`` reuses validated data and cached features of an earlier call.
    """
    from linewatch.model.calibrate import calibrate_scorer, fit_normalisation

    started = time.monotonic()
    out = Path(out)
    device = _resolve_device(ts.device)
    torch.manual_seed(ts.seed)
    backbone = build_backbone(settings, device)
    if prepared is None:
        prepared = prepare_data(data, settings, ts, device, backbone, _needs_pixels(settings))
    d = prepared
    config = model_config(settings, ts, d.fingerprint.sha256)
    model = _new_model(settings, backbone, d.train_cache)
    state = train_on_cache(
        model,
        d.train_cache,
        d.hold_cache,
        ts,
        device,
        checkpoint_path(out),
        resume,
        config,
        progress,
    )
    jittered = exposure_batches(d.fit_samples, settings, backbone, device, ts.seed)
    finish_model(model, d.train_cache, ts.seed, extra_memory=jittered)
    scorer = Scorer(model, backbone, device)
    norm = fit_normalisation(scorer, d.hold_cache.batches(ts.batch, device), source="holdout")
    model.norm = norm
    meta = ModelMeta(config=config, normalisation=norm.model_dump(mode="json"), data=d.fingerprint)
    save_model_file(out, model_tensors(model), meta)
    calibrated = False
    if calibrate and any(s.is_defect for s in d.val_samples):
        calibrate_scorer(out, d.dataset, device=str(device), progress=progress)
        calibrated = True
    checkpoint_path(out).unlink(missing_ok=True)
    report = TrainReport(
        model_path=str(out),
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_loss,
        train_images=len(d.fit_samples),
        cached_views=len(d.train_cache),
        seconds=round(time.monotonic() - started, 1),
        feature_seconds=round(d.feature_seconds, 1),
        calibrated=calibrated,
    )
    log.info("trained", **report.model_dump())
    return report


def _new_model(
    settings: ModelSettings, backbone: FeatureExtractor | None, cache: FeatureCache
) -> JointModel:
    channels = backbone.channels if backbone is not None else ()
    strides = backbone.strides if backbone is not None else ()
    model = JointModel(settings, channels, strides)
    if model.mdaae is not None:
        mean, std = _feature_stats(cache)
        model.mdaae.set_feature_stats(mean, std)
    return model


def finish_model(
    model: JointModel,
    train_cache: FeatureCache,
    seed: int,
    batch: int = 32,
    extra_memory: Iterable[Prepared] = (),
) -> None:
    """Fit the memory of normal features, the residual Gaussians, then the per-position term
    statistics, all on the un-augmented training images (see :meth:`FeatureCache.unaugmented`).

    The memory also takes ``extra_memory``: views that are normal for the line but differ
    photometrically, not geometrically (:func:`exposure_batches`). It is only consumed when
    the model has a memory.
    """
    originals = train_cache.unaugmented()
    device = model.pos_mean.device  # where the memories and statistics are fitted
    aspects = np.array([r.aspect for r in originals.regions])
    _fit_memory(model, itertools.chain(originals.batches(batch, device), extra_memory), seed,
                aspects)
    _fit_residuals(model, originals, batch)
    fit_position_norm(model, originals, batch)


def _fit_residuals(model: JointModel, cache: FeatureCache, batch: int) -> None:
    """The per-position residual Gaussians of the Mahalanobis feature distance."""
    mdaae = model.mdaae
    if mdaae is None or model.settings.feature_distance != "mahalanobis":
        return
    device = mdaae.feature_mean.device

    def targets() -> Iterator[list[Tensor]]:
        for prep in cache.batches(batch, device):
            assert prep.feats is not None
            yield mdaae.standardise(prep.feats)

    with torch.inference_mode():
        mdaae.fit_residuals(targets(), model.settings.gauss_eps)
    log.info("residuals_fitted", levels=len(mdaae.level_channels))


def _fit_memory(
    model: JointModel, batches: Iterable[Prepared], seed: int, aspects: np.ndarray
) -> None:
    """The memory of normal features; ``aspects`` of the training images (not their extra
    views) set its groups of frame shape."""
    s = model.settings
    memory = model.memory
    if memory is None or s.memory == "none" or model.mdaae is None:
        return
    views = 0

    def phis() -> Iterator[tuple[Tensor, np.ndarray]]:
        nonlocal views
        with torch.inference_mode():
            for prep in batches:
                views += prep.x.shape[0]
                fwd = model(prep.x, prep.feats, ("mem",))
                yield model.memory_features(fwd), prep.aspects.numpy()

    if s.memory == "gaussian":
        groups = memory_groups(aspects, s.memory_shape_groups, s.memory_shape_overlap)
        memory.fit_gaussian_per_shape(phis(), s.gauss_eps, groups)
        log.info("memory_fitted", kind=s.memory, views=views, shape_groups=len(groups),
                 aspect_edges=[round(e, 3) for e in groups.edges])
        return
    rows = [p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]).cpu() for p, _ in phis()]
    memory.fit_knn(torch.cat(rows), s.bank_size, s.bank_sampler, seed)
    log.info("memory_fitted", kind=s.memory, views=views)


def exposure_batches(
    samples: Sequence[Sample],
    settings: ModelSettings,
    backbone: FeatureExtractor | None,
    device: torch.device,
    seed: int,
) -> Iterator[Prepared]:
    """Exposure-jittered copies of ``samples`` (``settings.memory_exposure``), prepared.

    A generator: images are read and the backbone runs only while the memory consumes it,
    so a variant without a memory pays nothing and the copies are never held all at once.
    The copies go through :func:`model_input` as camera frames would (impulse filter, clipped
    plateaus, intensity standardisation). Draws come from their own stream of ``seed``.
    """
    cfg = settings.memory_exposure
    if cfg.copies == 0 or backbone is None or settings.memory == "none":
        return
    rng = np.random.default_rng([seed, 1])
    images = _load_images(samples)
    for _ in range(cfg.copies):
        for start in range(0, len(images), _EXTRACT_BATCH):
            chunk = jitter_exposure(images[start : start + _EXTRACT_BATCH], rng, cfg)
            x, regions = model_input(chunk, settings, device)
            with torch.inference_mode():
                feats = backbone(x)
            yield Prepared(x=x, feats=feats, regions=regions)


def fit_position_norm(model: JointModel, cache: FeatureCache, batch: int = 32) -> None:
    """Per-position statistics of every term over normal images (after the memory is fit)."""
    if not model.settings.position_norm:
        return
    device = model.pos_mean.device

    def forwards() -> Iterator[Any]:
        with torch.inference_mode():
            for prep in cache.batches(batch, device):
                yield model(prep.x, prep.feats, aspects=prep.aspects)

    with torch.inference_mode():
        model.fit_position_norm(forwards())
