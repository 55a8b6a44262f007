"""Exposure jitter of the normal statistics: the draws, the settings, and what it buys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset
from linewatch.data.synth import write_dataset
from linewatch.errors import DataError
from linewatch.model.joint import JointModel
from linewatch.model.preprocess import ExposureJitter, jitter_exposure
from linewatch.model.scorer import build_backbone, clipped_mask, model_input
from linewatch.model.settings import (
    ModelSettings,
    TrainSettings,
    model_settings_from_dict,
    variant_settings,
)
from linewatch.model.train import _new_model, exposure_batches, finish_model, prepare_data

torch.set_num_threads(1)

SIZE = 64


def _ramp(dtype: type[np.integer]) -> np.ndarray:
    full = np.iinfo(dtype).max
    return np.linspace(0, full, 64 * 64).reshape(64, 64).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_jitter_keeps_dtype_and_applies_one_gain_and_offset_within_range(
    dtype: type[np.integer],
) -> None:
    cfg = ExposureJitter(gain=(0.8, 1.5), offset=(-0.05, 0.1))
    image = _ramp(dtype)
    full = float(np.iinfo(dtype).max)
    for seed in range(20):
        (out,) = jitter_exposure([image], np.random.default_rng(seed), cfg)
        assert out.dtype == dtype and out.shape == image.shape
        inside = (out > 0) & (out < full)  # clipped pixels say nothing about gain / offset
        gain, offset = np.polyfit(image[inside] / full, out[inside] / full, 1)
        assert 0.8 - 1e-2 <= gain <= 1.5 + 1e-2
        assert -0.05 - 1e-2 <= offset <= 0.1 + 1e-2


def test_jitter_clips_at_the_sensor_range_and_is_reproducible() -> None:
    image = _ramp(np.uint8)
    bright = ExposureJitter(gain=(1.5, 1.5), offset=(0.1, 0.1))
    (out,) = jitter_exposure([image], np.random.default_rng(0), bright)
    assert (out == 255).mean() > 0.3  # a plateau at white, as a real over-exposure gives
    cfg = ExposureJitter()
    a = jitter_exposure([image, image], np.random.default_rng(5), cfg)
    b = jitter_exposure([image, image], np.random.default_rng(5), cfg)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1])  # each image draws its own exposure


def test_jitter_refuses_float_images_and_bad_ranges() -> None:
    with pytest.raises(DataError, match="image 0"):
        jitter_exposure([np.zeros((4, 4), np.float32)], np.random.default_rng(0), ExposureJitter())
    with pytest.raises(ValidationError):
        ExposureJitter(gain=(1.5, 0.8))
    with pytest.raises(ValidationError):
        ExposureJitter(gain=(0.0, 1.0))


def test_model_files_without_the_setting_load_with_the_default() -> None:
    stored = variant_settings("E").model_dump(mode="json")
    del stored["memory_exposure"]
    assert model_settings_from_dict(stored).memory_exposure == ExposureJitter()
    assert ModelSettings().memory_exposure.copies == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exposure") / "data"
    write_dataset(root, seed=5, size=SIZE, n_good=24, n_defect=2)
    return root


def _memory_distance(model: JointModel, frames: list[np.ndarray]) -> float:
    """Mean memory distance of ``frames`` over their judged (not clipped) positions."""
    settings = model.settings
    backbone = build_backbone(settings, torch.device("cpu"))
    assert backbone is not None
    x, regions = model_input(frames, settings, "cpu")
    with torch.inference_mode():
        fwd = model(x, backbone(x), ("mem",))
        maps = model.term_maps(fwd, ("mem",))["mem"]
    grid = (int(maps.shape[-2]), int(maps.shape[-1]))
    values = []
    for i, region in enumerate(regions):
        seen = torch.ones(grid, dtype=torch.bool)
        if region.blind is not None:
            blind = torch.from_numpy(region.blind.astype(np.float32))[None, None]
            seen = torch.nn.functional.adaptive_avg_pool2d(blind, grid)[0, 0] < 0.5
        values.append(maps[i, 0][seen])
    return float(torch.cat(values).mean())


def test_jittered_memory_finds_clipped_good_frames_more_normal(data: Path) -> None:
    # A bright jitter range that always clips, so that 24 small images show the effect
    # clearly; the default range clips in about a quarter of the copies.
    bright = {"copies": 3, "gain": (1.45, 1.65), "offset": (0.05, 0.12)}
    settings = variant_settings("E", size=SIZE, memory_exposure=bright)
    ts = TrainSettings(augment_copies=0)
    device = torch.device("cpu")
    backbone = build_backbone(settings, device)
    prepared = prepare_data(data, settings, ts, device, backbone, keep_pixels=True)
    plain = _new_model(settings, backbone, prepared.train_cache).eval()
    finish_model(plain, prepared.train_cache, seed=0)
    jittered = _new_model(settings, backbone, prepared.train_cache).eval()
    extra = exposure_batches(prepared.fit_samples, settings, backbone, device, seed=0)
    finish_model(jittered, prepared.train_cache, seed=0, extra_memory=extra)

    good = [read_image(s.path) for s in MVTecDataset(data).samples("val") if not s.is_defect]
    over_cfg = ExposureJitter(gain=(1.55, 1.55), offset=(0.08, 0.08))
    over = jitter_exposure(good, np.random.default_rng(0), over_cfg)
    assert np.mean([m.mean() for f in over if (m := clipped_mask(f)) is not None]) > 0.2

    def excess(model: JointModel) -> float:
        """How much further from normal the over-exposed frames are than the clean ones."""
        return _memory_distance(model, over) / _memory_distance(model, good)

    assert excess(plain) > 1.3  # clipping alone looks abnormal to a memory of clean frames
    assert excess(jittered) < 0.9 * excess(plain)


def test_variants_without_a_memory_read_no_jittered_images(data: Path) -> None:
    settings = variant_settings("B", size=SIZE)
    samples = MVTecDataset(data).samples("train")
    backbone = build_backbone(settings, torch.device("cpu"))
    assert list(exposure_batches(samples, settings, backbone, torch.device("cpu"), 0)) == []
    off = variant_settings("E", size=SIZE, memory_exposure={"copies": 0})
    assert list(exposure_batches(samples, off, backbone, torch.device("cpu"), 0)) == []
