"""Training: a tiny model learns to separate defects; checkpoints resume; bad data fails early."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.data.mvtec import MVTecDataset
from linewatch.data.synth import write_dataset
from linewatch.errors import DataError, ModelFileError
from linewatch.model.backbone import FeatureExtractor
from linewatch.model.evaluate import evaluate_scorer
from linewatch.model.modelfile import read_model_meta
from linewatch.model.scorer import Scorer, build_backbone
from linewatch.model.settings import TrainSettings, variant_settings
from linewatch.model.train import (
    FeatureCache,
    _new_model,
    checkpoint_path,
    prepare_data,
    train,
    train_on_cache,
)

torch.set_num_threads(1)

SIZE = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train") / "data"
    write_dataset(root, seed=3, size=SIZE, n_good=24, n_defect=3)
    return root


def test_tiny_model_separates_obvious_defects(data: Path, tmp_path: Path) -> None:
    model = tmp_path / "e.lwm"
    report = train(
        data,
        model,
        variant_settings("E", size=SIZE),
        TrainSettings(epochs=3, batch=8),
        progress=False,
    )
    assert report.calibrated and report.train_images == 24
    assert not checkpoint_path(model).exists()  # a finished run leaves no checkpoint behind
    result = evaluate_scorer(Scorer.load(model, "cpu"), MVTecDataset(data), progress=False)
    assert result.image_auroc > 0.75
    assert result.pixel_auroc is not None and result.pixel_auroc > 0.75


def _small_caches(data: Path) -> tuple[FeatureCache, FeatureCache, FeatureExtractor | None]:
    settings = variant_settings("B", size=SIZE)
    ts = TrainSettings(epochs=3, batch=8, augment_copies=0)
    device = torch.device("cpu")
    backbone = build_backbone(settings, device)
    prepared = prepare_data(data, settings, ts, device, backbone, keep_pixels=False)
    return prepared.train_cache, prepared.hold_cache, backbone


def test_resume_from_checkpoint_continues_the_same_run(data: Path, tmp_path: Path) -> None:
    settings = variant_settings("D", size=SIZE)
    device = torch.device("cpu")
    backbone = build_backbone(settings, device)
    ts3 = TrainSettings(epochs=3, batch=8, augment_copies=0, patience=10)
    prepared = prepare_data(data, settings, ts3, device, backbone, keep_pixels=True)
    tr, hold = prepared.train_cache, prepared.hold_cache
    config = {"run": "resume-test"}

    torch.manual_seed(0)
    straight = _new_model(settings, backbone, tr)
    train_on_cache(straight, tr, hold, ts3, device, progress=False)

    ckpt = tmp_path / "run.ckpt.lwm"
    torch.manual_seed(0)
    first = _new_model(settings, backbone, tr)
    ts1 = ts3.model_copy(update={"epochs": 1})
    train_on_cache(first, tr, hold, ts1, device, ckpt, config=config, progress=False)
    assert read_model_meta(ckpt).config["checkpoint"]["state"]["epoch"] == 1

    torch.manual_seed(123)  # a different init: resume must overwrite it from the checkpoint
    resumed = _new_model(settings, backbone, tr)
    state = train_on_cache(
        resumed, tr, hold, ts3, device, ckpt, resume=True, config=config, progress=False
    )
    assert state.epoch == 3
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_of_other_settings_is_refused(data: Path, tmp_path: Path) -> None:
    tr, hold, backbone = _small_caches(data)
    settings = variant_settings("B", size=SIZE)
    ts = TrainSettings(epochs=1, batch=8, augment_copies=0)
    ckpt = tmp_path / "x.ckpt.lwm"
    model = _new_model(settings, backbone, tr)
    train_on_cache(model, tr, hold, ts, torch.device("cpu"), ckpt, config={"a": 1}, progress=False)
    again = _new_model(settings, backbone, tr)
    with pytest.raises(ModelFileError, match="other settings"):
        train_on_cache(
            again,
            tr,
            hold,
            ts,
            torch.device("cpu"),
            ckpt,
            resume=True,
            config={"a": 2},
            progress=False,
        )


def test_bad_image_stops_training_before_it_starts(data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    victim = sorted((broken / "train" / "good").iterdir())[5]
    victim.write_bytes(b"\x89PNG truncated")
    model = tmp_path / "never.lwm"
    with pytest.raises(DataError, match=victim.name):
        train(
            broken, model, variant_settings("B", size=SIZE), TrainSettings(epochs=1), progress=False
        )
    assert not model.exists() and not checkpoint_path(model).exists()


def test_without_val_a_train_share_is_held_out_and_nothing_calibrated(
    data: Path, tmp_path: Path
) -> None:
    no_val = tmp_path / "noval"
    shutil.copytree(data, no_val, ignore=shutil.ignore_patterns("val"))
    model = tmp_path / "b.lwm"
    report = train(
        no_val,
        model,
        variant_settings("B", size=SIZE),
        TrainSettings(epochs=1, batch=8, holdout=0.25),
        progress=False,
    )
    assert not report.calibrated
    assert report.train_images == 18  # 24 minus the 6 held out
    meta = read_model_meta(model)
    assert meta.thresholds is None and meta.normalisation is not None
    scores = Scorer.load(model, "cpu").score_batch([np.zeros((64, 64), np.uint8)]).scores
    assert np.isfinite(scores).all()
