"""The runtime Scorer: model file round trip, batch invariance, map units and sizes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.data.corrupt import apply_corruption, parse_corruption
from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset
from linewatch.data.synth import write_dataset
from linewatch.errors import ModelFileError
from linewatch.metrics import auroc
from linewatch.model import modelfile
from linewatch.model.calibrate import fit_shape_groups
from linewatch.model.joint import ShapeGroups, raise_by_frame_mean
from linewatch.model.modelfile import (
    load_model_file,
    read_model_meta,
    save_model_file,
    update_model_meta,
)
from linewatch.model.scorer import (
    BackboneOnlyScorer,
    Region,
    Scorer,
    clipped_mask,
    crop_reduce,
    frame_regions,
    model_input,
    remove_impulses,
    standardise_intensity,
    to_frame_maps,
    untruncated_moments,
)
from linewatch.model.settings import ScoreWeights, TrainSettings, variant_settings
from linewatch.model.train import model_tensors, train

torch.set_num_threads(1)

SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic data set and a variant-E model trained and calibrated on it."""
    root = tmp_path_factory.mktemp("scorer")
    data, model = root / "data", root / "model.lwm"
    write_dataset(data, seed=1, size=SIZE, n_good=16, n_defect=3)
    settings = variant_settings("E", size=SIZE)
    train(data, model, settings, TrainSettings(epochs=2, batch=8, seed=0), progress=False)
    return data, model


def _frames(data: Path) -> list[np.ndarray]:
    return [read_image(s.path) for s in MVTecDataset(data).samples("test")]


def test_round_trip_train_calibrate_load(trained: tuple[Path, Path]) -> None:
    data, model = trained
    meta = read_model_meta(model)
    scorer = Scorer.load(model, device="cpu")
    assert meta.checksum is not None and scorer.model_id == meta.checksum[:12]
    assert scorer.size == SIZE
    assert scorer.thresholds is not None
    assert scorer.threshold_version == scorer.thresholds.version
    for rule in ("operating_point", "f1_max", "youden"):
        assert scorer.threshold(rule) == getattr(scorer.thresholds, rule)
    assert meta.config["model"]["variant"] == "E"
    assert meta.data is not None and meta.data.n_images == 16
    assert meta.normalisation is not None and meta.normalisation["source"] == "val/good"
    # The stored threshold separates the calibration split it was fitted on.
    samples = MVTecDataset(data).samples("val")
    scores = scorer.score_batch([read_image(s.path) for s in samples]).scores
    labels = [int(s.is_defect) for s in samples]
    assert auroc(labels, scores) > 0.7


def test_same_frame_same_score_whatever_the_batch(trained: tuple[Path, Path]) -> None:
    data, model = trained
    scorer = Scorer.load(model, device="cpu")
    frames = _frames(data)
    alone = [scorer.score_batch([f]) for f in frames[:3]]
    rng = np.random.default_rng(0)
    for size in (2, 5, 8):
        for target in range(3):
            others = [frames[int(i)] for i in rng.integers(3, len(frames), size - 1)]
            batch = [*others, frames[target]]
            rng.shuffle(batch)
            where = next(i for i, f in enumerate(batch) if f is frames[target])
            got = scorer.score_batch(batch)
            assert abs(float(got.scores[where]) - float(alone[target].scores[0])) < 1e-4
            np.testing.assert_allclose(got.maps[where], alone[target].maps[0], atol=1e-4)


def test_any_dtype_size_and_channels_give_maps_at_frame_size(
    trained: tuple[Path, Path],
) -> None:
    _, model = trained
    scorer = Scorer.load(model, device="cpu")
    rng = np.random.default_rng(0)
    frames: list[np.ndarray] = [
        rng.integers(0, 256, (50, 90), dtype=np.uint8),
        rng.integers(0, 4096, (120, 70), dtype=np.uint16),
        rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
    ]
    out = scorer.score_batch(frames)
    assert out.scores.dtype == np.float32 and out.scores.shape == (3,)
    for frame, amap, score in zip(frames, out.maps, out.scores, strict=True):
        assert amap.dtype == np.float32 and amap.shape == frame.shape[:2]
        # Maps are in score units: the score is the map's max, up to interpolation.
        assert float(amap.max()) <= float(score) + 1e-4
        assert float(amap.max()) > float(score) - 0.5 * abs(float(score)) - 0.5
    assert scorer.score_batch([]).scores.shape == (0,)


def test_letterboxed_model_reports_frame_sized_maps(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = trained
    model = tmp_path / "letterbox.lwm"
    settings = variant_settings("B", size=SIZE, keep_aspect=True)
    train(data, model, settings, TrainSettings(epochs=1, batch=8), progress=False)
    scorer = Scorer.load(model, device="cpu")
    frame = np.full((40, 100), 128, np.uint8)
    out = scorer.score_batch([frame])
    assert out.maps[0].shape == (40, 100)
    assert np.isfinite(out.scores).all()


def test_uncalibrated_model_refuses_to_give_a_threshold(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, model = trained
    copy = tmp_path / "uncalibrated.lwm"
    copy.write_bytes(model.read_bytes())
    update_model_meta(copy, thresholds=None)
    scorer = Scorer.load(copy, device="cpu")
    assert scorer.thresholds is None and scorer.threshold_version is None
    with pytest.raises(ModelFileError, match="not calibrated"):
        scorer.threshold()


def test_backbone_only_scorer_has_the_same_interface(trained: tuple[Path, Path]) -> None:
    data, model = trained
    full = Scorer.load(model, device="cpu")
    bare = BackboneOnlyScorer.load(model, device="cpu")
    frames = _frames(data)[:3]
    timings: dict[str, float] = {}
    out = bare.score_batch(frames, timings)
    assert set(timings) == {"preprocess", "backbone"}
    assert out.scores.tolist() == [0.0, 0.0, 0.0]
    assert [m.shape for m in out.maps] == [f.shape[:2] for f in frames]
    assert bare.model_id == full.model_id and bare.threshold() == full.threshold()


def test_broken_model_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lwm"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match=r"bad\.lwm"):
        Scorer.load(bad, device="cpu")


def test_impulse_filter_undoes_salt_and_pepper_and_leaves_clean_frames() -> None:
    rng = np.random.default_rng(0)
    clean = (rng.normal(90, 12, (120, 160)).clip(5, 200)).astype(np.uint8)
    noisy = apply_corruption(clean, parse_corruption("snp:0.25"), rng)
    before = np.abs(noisy.astype(int) - clean).mean()
    after = np.abs(remove_impulses(noisy).astype(int) - clean).mean()
    assert after < before / 5
    assert (remove_impulses(clean) != clean).mean() < 1e-3
    deep = clean.astype(np.uint16) * 16  # a 12-bit camera: same decisions as at 8 bits
    scaled = remove_impulses(clean).astype(np.int64) * 16
    assert np.abs(remove_impulses(deep).astype(np.int64) - scaled).max() <= 16


def test_intensity_standardisation_cancels_gain_and_offset() -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(20, 120, (40, 60)).astype(np.uint8)
    brighter = (frame.astype(np.float32) * 1.3 + 12).astype(np.uint8)
    np.testing.assert_allclose(
        standardise_intensity(frame), standardise_intensity(brighter), atol=0.02
    )


def test_truncated_standardisation_keeps_the_contrast_of_an_overexposed_frame() -> None:
    # Blocks of 3 x 3: clipped areas, not scattered pixels, as a camera's texture has them.
    texture = np.kron(np.random.default_rng(3).normal(0.45, 0.08, (40, 40)), np.ones((3, 3)))
    frame = np.rint(texture * 255).astype(np.uint8)
    over = np.rint(np.clip(texture * 2.0 + 0.05, 0.0, 1.0) * 255).astype(np.uint8)
    clipped = clipped_mask(over)
    assert clipped is not None and 0.3 < clipped.mean() < 0.45
    reference = standardise_intensity(frame, clipped_mask(frame))[~clipped]
    plain = standardise_intensity(over, clipped)[~clipped]
    corrected = standardise_intensity(over, clipped, truncated=True)[~clipped]
    assert np.abs(corrected - reference).mean() < 0.01
    assert np.abs(plain - reference).mean() > 4 * np.abs(corrected - reference).mean()
    # Without a plateau there is nothing to correct.
    np.testing.assert_array_equal(
        standardise_intensity(frame, None, truncated=True), standardise_intensity(frame)
    )


def test_model_input_standardises_as_the_settings_say() -> None:
    texture = np.kron(np.random.default_rng(5).normal(0.45, 0.08, (32, 32)), np.ones((2, 2)))
    clean = np.rint(texture * 255).astype(np.uint8)
    over = np.rint(np.clip(texture * 2.0 + 0.05, 0.0, 1.0) * 255).astype(np.uint8)
    old, new = (variant_settings("B", size=SIZE, intensity=mode)
                for mode in ("standardise", "standardise_truncated"))
    assert variant_settings("B").intensity == "standardise_truncated"  # the default
    assert torch.equal(model_input([clean], old, "cpu")[0], model_input([clean], new, "cpu")[0])
    assert not torch.equal(model_input([over], old, "cpu")[0], model_input([over], new, "cpu")[0])


def test_untruncated_moments_invert_a_truncated_normal() -> None:
    values = np.random.default_rng(4).normal(0.3, 0.05, 200_000)
    low, high = np.quantile(values, [0.1, 0.6])
    kept = values[(values > low) & (values < high)]
    mean, std = untruncated_moments(float(kept.mean()), float(kept.std()), 0.1, 0.4)
    assert mean == pytest.approx(0.3, abs=2e-3) and std == pytest.approx(0.05, rel=0.02)


def test_clipped_plateaus_neither_set_nor_show_the_score() -> None:
    frame = np.random.default_rng(0).integers(80, 120, (64, 64)).astype(np.uint8)
    frame[:, :20] = 255  # an over-exposed band
    frame[40, 50] = 255  # one hot pixel is not a plateau
    clipped = clipped_mask(frame)
    assert clipped is not None and clipped[:, :20].all() and not clipped[40, 50]
    settings = variant_settings("B", size=SIZE, clipped_margin=4)
    (region,) = frame_regions([frame], settings)
    assert (
        region.blind is not None and region.blind[:, :20].all() and not region.blind[:, 30:].any()
    )
    maps = torch.zeros(1, 1, SIZE, SIZE)
    maps[0, 0, :, :10] = 50.0  # the band "looks anomalous"
    maps[0, 0, 5, 40] = 2.0
    assert float(crop_reduce(maps, [region], "max", 0.01)) == 2.0
    (shown,) = to_frame_maps(maps, [region])
    assert shown.shape == (64, 64) and float(shown.max()) <= 2.0 + 1e-6
    assert clipped_mask(np.full((8, 8), 7, np.uint8)) is None


def test_the_score_adds_a_share_of_the_judged_mean_to_the_peak() -> None:
    blind = np.zeros((8, 8), bool)
    blind[:, 6:] = True  # a clipped band: its values must not count in the mean either
    region = Region(box=(0, 0, 8, 8), shape=(8, 8), blind=blind)
    maps = torch.zeros(2, 1, 8, 8)
    maps[:, 0, 1, 1] = 3.0  # the same peak in both frames
    maps[1, 0, 4:, :6] = 1.0  # the second also changed over a third of its judged area
    maps[:, 0, :, 6:] = 50.0
    raised = raise_by_frame_mean(maps, [region, region], 0.5)
    scores = crop_reduce(raised, [region, region], "max", 0.01)
    judged_means = torch.tensor([3.0 / 48, (3.0 + 24.0) / 48])
    torch.testing.assert_close(scores, 3.0 + 0.5 * judged_means)
    assert float(scores[1]) > float(scores[0])
    # The whole map moves with the score: thresholded at it, it marks the peak that set it.
    marked = (raised[1, 0] >= scores[1]) & torch.from_numpy(~blind)
    assert marked.nonzero().tolist() == [[1, 1]]
    assert raise_by_frame_mean(maps, [region, region], 0.0) is maps


def test_a_model_file_from_before_the_frame_mean_keeps_scoring_the_peak_alone(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = trained
    meta = read_model_meta(model)
    assert meta.config["model"]["frame_mean_weight"] > 0  # files written now store it
    config = copy.deepcopy(meta.config)
    del config["model"]["frame_mean_weight"]
    old_file = tmp_path / "before.lwm"
    old_file.write_bytes(model.read_bytes())
    update_model_meta(old_file, config=config)
    old = Scorer.load(old_file, device="cpu")
    assert old.settings.frame_mean_weight == 0.0
    frames = _frames(data)[:4]
    prep = old.prepare(frames)
    maps, scores = old.score_prepared(prep)
    torch.testing.assert_close(scores, crop_reduce(maps, prep.regions, "max", 0.01))
    now = Scorer.load(model, device="cpu").score_batch(frames).scores
    assert not np.allclose(now, scores.numpy(), atol=1e-3)


def test_shape_groups_centre_each_frame_by_its_aspect_and_keep_batch_invariance(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = trained
    plain = Scorer.load(model, device="cpu")
    groups = ShapeGroups(edges=[1.0], centre=[0.5, -0.25], scale=2.0)
    norm = plain.model.norm.model_copy(update={"shape_groups": groups})
    shaped_file = tmp_path / "shaped.lwm"
    shaped_file.write_bytes(model.read_bytes())
    update_model_meta(shaped_file, normalisation=norm.model_dump(mode="json"))
    shaped = Scorer.load(shaped_file, device="cpu")  # the groups travel in the model file
    assert shaped.model.norm.shape_groups == groups

    frame = _frames(data)[0]
    narrow, wide = frame[:, : frame.shape[1] // 2], frame[: frame.shape[0] // 2]
    for view, centre in ((narrow, 0.5), (wide, -0.25)):
        raw = plain.score_batch([view])
        got = shaped.score_batch([view])
        assert abs(float(got.scores[0]) - (float(raw.scores[0]) - centre) / 2.0) < 1e-4
        np.testing.assert_allclose(got.maps[0], (raw.maps[0] - centre) / 2.0, atol=1e-4)
    together = shaped.score_batch([wide, narrow, frame])
    for i, view in enumerate((wide, narrow, frame)):
        assert abs(float(together.scores[i]) - float(shaped.score_batch([view]).scores[0])) < 1e-4


def test_a_memory_per_shape_scores_each_frame_by_its_group_through_the_model_file(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    data, trained_file = trained
    model = tmp_path / "memory-scored.lwm"  # the same model, scored by its memory term alone
    model.write_bytes(trained_file.read_bytes())
    norm = Scorer.load(model, device="cpu").model.norm
    memory_only = norm.model_copy(update={"weights": ScoreWeights(mem=1.0)})
    update_model_meta(model, normalisation=memory_only.model_dump(mode="json"))
    plain = Scorer.load(model, device="cpu")
    assert plain.terms == ("mem",)
    grouped = Scorer.load(model, device="cpu")
    memory = grouped.model.memory
    assert memory is not None and memory.groups == 1  # the synthetic set has one shape
    # Wide frames (aspect above 1) get a Gaussian whose mean is off: they score higher.
    memory.set_gaussian(torch.cat([memory.mean, memory.mean + 0.5]),
                        torch.cat([memory.precision, memory.precision]), edges=[1.0])
    grouped_file = tmp_path / "grouped.lwm"
    save_model_file(grouped_file, model_tensors(grouped.model), read_model_meta(model))
    loaded = Scorer.load(grouped_file, device="cpu")
    assert loaded.model.memory is not None and loaded.model.memory.groups == 2

    frame = _frames(data)[0]
    narrow, wide = frame[:, : frame.shape[1] // 2], frame[: frame.shape[0] // 2]
    assert abs(float(loaded.score_batch([narrow]).scores[0])
               - float(plain.score_batch([narrow]).scores[0])) < 1e-4
    assert float(loaded.score_batch([wide]).scores[0]) > float(
        plain.score_batch([wide]).scores[0]) + 0.1
    together = loaded.score_batch([wide, narrow, frame, wide])
    for i, view in enumerate((wide, narrow, frame, wide)):
        alone = loaded.score_batch([view])
        assert abs(float(together.scores[i]) - float(alone.scores[0])) < 1e-4
        np.testing.assert_allclose(together.maps[i], alone.maps[0], atol=1e-4)


def test_shape_groups_are_refused_when_inconsistent() -> None:
    with pytest.raises(ValueError, match="2 groups need as many centres"):
        ShapeGroups(edges=[1.0], centre=[0.0], scale=1.0)
    with pytest.raises(ValueError, match="edges must rise"):
        ShapeGroups(edges=[1.2, 0.8], centre=[0.0, 0.0, 0.0], scale=1.0)
    with pytest.raises(ValueError, match="greater than 0"):
        ShapeGroups(edges=[1.0], centre=[0.0, 0.0], scale=0.0)


def test_fewer_shape_groups_when_val_has_too_few_good_images_per_group() -> None:
    rng = np.random.default_rng(0)
    aspects = np.repeat([0.5, 1.0, 2.0], [15, 30, 30])  # 75 good images in three shapes
    scores = rng.normal(0.0, 1.0, 75) + np.repeat([1.0, 0.0, -1.0], [15, 30, 30])
    fitted = fit_shape_groups(scores, aspects, 3)  # a group of 15 is too few: two groups
    assert fitted is not None and fitted.edges == [1.5] and len(fitted.centre) == 2
    assert fit_shape_groups(scores[:30], aspects[:30], 3) is None  # 30 images: one group
    assert fit_shape_groups(scores, aspects, 1) is None  # asked for one group: off
    assert fit_shape_groups(scores, np.ones(75), 3) is None  # one shape: one group


def test_a_model_file_keeps_half_of_each_precision_and_scores_as_a_format_1_file(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, packed_file = trained
    scorer = Scorer.load(packed_file, device="cpu")
    tensors, _ = load_model_file(packed_file)
    assert "memory.precision" not in tensors and "memory.precision_packed" in tensors
    whole = {k: v.detach() for k, v in scorer.model.state_dict().items()}  # as format 1 kept it
    assert whole["memory.precision"].numel() > 1.9 * tensors["memory.precision_packed"].numel()
    old_file = tmp_path / "format1.lwm"
    monkeypatch.setattr(modelfile, "FORMAT_VERSION", 1)
    save_model_file(old_file, whole, read_model_meta(packed_file))
    monkeypatch.undo()
    assert read_model_meta(old_file).format_version == 1
    frames = _frames(data)[:4]
    np.testing.assert_array_equal(Scorer.load(old_file, device="cpu").score_batch(frames).scores,
                                  scorer.score_batch(frames).scores)
