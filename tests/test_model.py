"""The networks of the joint model: variants A-E, attention, memory, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.errors import ConfigError
from linewatch.model.aspect import memory_groups
from linewatch.model.joint import JointModel, gaussian_blur, reduce_map
from linewatch.model.mdaae import NormalMemory, build_memory_bank, unpack_symmetric
from linewatch.model.sagan import SelfAttention, attention_mask
from linewatch.model.scorer import Prepared, Region
from linewatch.model.settings import TERMS, ModelSettings, TrainSettings, variant_settings
from linewatch.model.train import (
    FeatureCache,
    _feature_stats,
    _Optimisers,
    _train_step,
    finish_model,
)

torch.set_num_threads(1)

# EfficientNet-Lite0's s4/s8/s16 levels, so no backbone weights are needed here.
CHANNELS = (24, 40, 112)
STRIDES = (4, 8, 16)
SIZE = 64


def _batch(n: int = 2, seed: int = 0) -> Prepared:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    feats = [
        torch.randn(n, c, SIZE // s, SIZE // s, generator=g)
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]
    regions = [Region(box=(0, 0, SIZE, SIZE), shape=(SIZE, SIZE))] * n
    return Prepared(x=x, feats=feats, regions=regions)


def _model(variant: str, **overrides: object) -> JointModel:
    torch.manual_seed(0)
    return JointModel(variant_settings(variant, size=SIZE, **overrides), CHANNELS, STRIDES)


@pytest.mark.parametrize(
    ("variant", "parts"),
    [
        ("A", {"image_encoder", "generator", "discriminator"}),
        ("B", {"mdaae"}),
        ("C", {"image_encoder", "generator", "discriminator"}),
        ("D", {"mdaae", "generator", "discriminator"}),
        ("E", {"mdaae", "generator", "discriminator"}),
    ],
)
def test_variants_build_their_parts_only(variant: str, parts: set[str]) -> None:
    model = _model(variant)
    present = {
        name
        for name in ("mdaae", "image_encoder", "generator", "discriminator")
        if getattr(model, name) is not None
    }
    assert present == parts
    attention = any(isinstance(m, SelfAttention) for m in model.modules())
    assert attention == (variant in ("C", "E"))


@pytest.mark.parametrize("variant", list("ABCDE"))
def test_each_variant_trains_one_step(variant: str) -> None:
    model = _model(variant)
    ts = TrainSettings(batch=2, r1_every=1)
    opt = _Optimisers(model, ts, amp=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs = _train_step(model, _batch(), ts, opt, step=0, amp=False)
    assert logs and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if model.mdaae is not None:
        assert any(k.startswith("mdaae.") for k in changed)
    if model.generator is not None:
        assert any(k.startswith("generator.") for k in changed)
    if model.discriminator is not None:
        assert any(k.startswith("discriminator.") for k in changed)
        assert "d" in logs and "adv" in logs


@pytest.mark.parametrize("variant", list("ABCDE"))
def test_each_variant_scores_every_term_it_has(variant: str) -> None:
    model = _model(variant).eval()
    prep = _batch()
    if model.memory is not None:
        with torch.inference_mode():
            feats = model.memory_features(model(prep.x, prep.feats))
        model.memory.fit_gaussian([feats, feats + 0.1], 0.01)
    if model.mdaae is not None:
        assert prep.feats is not None
        with torch.inference_mode():
            model.mdaae.fit_residuals([model.mdaae.standardise(prep.feats)] * 2, 0.01)
    with torch.inference_mode():
        fwd = model(prep.x, prep.feats)
        maps = model.term_maps(fwd, model.available_terms())
        joint = model.joint_map(maps, prep.regions)
    assert set(maps) == set(model.available_terms())
    for m in maps.values():
        assert m.shape == (2, 1, SIZE // 4, SIZE // 4)
        assert torch.isfinite(m).all()
    assert joint.shape == (2, 1, SIZE, SIZE) and torch.isfinite(joint).all()


def test_inconsistent_settings_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"weights\.mem"):
        variant_settings("B", weights={"mem": 1.0})
    with pytest.raises(ConfigError, match="variant"):
        variant_settings("F")
    with pytest.raises(ConfigError, match="size"):
        variant_settings("E", size=100)
    for bandwidth in (-0.1, float("inf")):  # else refused only at the end of calibration
        with pytest.raises(ConfigError, match="operating_point_bandwidth"):
            variant_settings("E", operating_point_bandwidth=bandwidth)


def test_default_settings_are_the_product_variant() -> None:
    assert ModelSettings() == variant_settings("E")


def test_self_attention_starts_as_identity_with_row_stochastic_attention() -> None:
    block = SelfAttention(16, heads=2)
    x = torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        y, att = block(x)
        mask = attention_mask(att, (8, 10), (4, 5))
    assert torch.equal(y, x)  # gamma starts at 0
    assert att.shape == (2, 2, 20, 20)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 20))
    assert mask.shape == (2, 1, 8, 10)
    assert 0.3 < float(mask.mean()) < 3.0


def test_gaussian_memory_flags_a_vector_off_the_normal_correlation() -> None:
    g = torch.Generator().manual_seed(0)
    # Normal features: channel 1 follows channel 0 (an exposure-like shared direction).
    base = torch.randn(200, 1, 2, 2, generator=g)
    normal = torch.cat([base, base + 0.05 * torch.randn(200, 1, 2, 2, generator=g)], 1)
    memory = NormalMemory("gaussian", 2)
    memory.fit_gaussian([normal[:100], normal[100:]], eps=1e-3)
    along = torch.full((1, 2, 2, 2), 2.0)  # far along the normal direction
    across = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # off it
    assert float(memory.distance(across).min()) > 5 * float(memory.distance(along).max())


def _two_shape_features(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Narrow frames (aspect 0.5) whose channel 1 follows channel 0, wide ones (2.0) whose
    channel 1 opposes it: each shape has its own normal direction."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 2, 2, generator=g)
    aspects = np.repeat([0.5, 2.0], n // 2)
    sign = torch.from_numpy(np.where(aspects < 1, 1.0, -1.0)).float().view(n, 1, 1, 1)
    noise = 0.05 * torch.randn(n, 1, 2, 2, generator=g)
    return torch.cat([base, sign * base + noise], 1), aspects


def test_memory_per_shape_judges_a_frame_by_the_statistics_of_its_own_shape() -> None:
    feats, aspects = _two_shape_features(400, seed=0)
    groups = memory_groups(aspects, 2, overlap=0.0, min_images=100)
    assert groups.edges == (1.25,)
    memory = NormalMemory("gaussian", 2)
    memory.fit_gaussian_per_shape([(feats[:200], aspects[:200]), (feats[200:], aspects[200:])],
                                  1e-3, groups)
    assert memory.groups == 2
    along = torch.tensor([2.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # narrow frames' way
    narrow, wide = (torch.tensor([a], dtype=torch.float64) for a in (0.5, 2.0))
    assert float(memory.distance(along, wide).min()) > 5 * float(
        memory.distance(along, narrow).max())
    # One memory over both shapes finds both directions normal and cannot tell them apart.
    single = NormalMemory("gaussian", 2)
    single.fit_gaussian([feats], 1e-3)
    assert float(single.distance(along).max()) < float(memory.distance(along, wide).min()) / 5
    # A frame's distance does not depend on the shapes of its batch neighbours.
    batch = torch.cat([along, along, -along])
    mixed = memory.distance(batch, torch.tensor([2.0, 0.5, 2.0], dtype=torch.float64))
    alone = torch.cat([memory.distance(batch[i : i + 1], a)
                       for i, a in enumerate([wide, narrow, wide])])
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, dtype=torch.float64)
    assert memory.distance(feats[:0], empty).shape == (0, 1, 2, 2)
    with pytest.raises(ValueError, match="aspects"):
        memory.distance(along)


def test_memory_groups_spill_over_their_edges_and_shrink_to_what_the_images_allow() -> None:
    aspects = np.repeat([0.5, 1.0, 2.0], 100)
    tight, spilled = memory_groups(aspects, 3, 0.0), memory_groups(aspects, 3, 0.1)
    assert tight.edges == spilled.edges == (0.75, 1.5)
    assert [int(tight.members(aspects, g).sum()) for g in range(3)] == [100, 100, 100]
    assert [int(spilled.members(aspects, g).sum()) for g in range(3)] == [200, 300, 200]
    assert len(memory_groups(aspects[:250], 3, 0.1)) == 2  # 250 images: two groups of 100+
    assert len(memory_groups(aspects[:150], 3, 0.1)) == 1
    assert len(memory_groups(np.ones(600), 3, 0.1)) == 1  # one shape: one memory
    assert len(memory_groups(aspects, 1, 0.1)) == 1  # asked for one


def test_a_memory_written_before_shape_groups_loads_as_one_group() -> None:
    feats, _ = _two_shape_features(200, seed=1)
    memory = NormalMemory("gaussian", 2)
    memory.fit_gaussian([feats], 1e-3)
    old = {"bank": memory.bank, "mean": memory.mean[0], "precision": memory.precision[0]}
    loaded = NormalMemory("gaussian", 2)
    loaded.take_shapes(old, "")
    loaded.load_state_dict(old, strict=True)
    assert loaded.groups == 1
    torch.testing.assert_close(loaded.distance(feats[:4]), memory.distance(feats[:4]))


def test_a_packed_precision_loads_back_exactly() -> None:
    feats, aspects = _two_shape_features(300, seed=2)
    memory = NormalMemory("gaussian", 2)
    memory.fit_gaussian_per_shape([(feats, aspects)], 1e-3, memory_groups(aspects, 2, 0.1))
    stored = dict(memory.state_dict())
    NormalMemory.pack_for_file(stored, "")
    assert "precision" not in stored and stored["precision_packed"].shape[-1] == 3  # 2 x 2
    loaded = NormalMemory("gaussian", 2)
    loaded.take_shapes(stored, "")
    loaded.load_state_dict(stored, strict=True)
    assert torch.equal(loaded.precision, memory.precision)
    with pytest.raises(ValueError, match="not the upper triangle"):
        unpack_symmetric(torch.zeros(4))


def test_training_fits_one_memory_per_shape_and_scoring_needs_the_frames_aspects() -> None:
    model = _model("E", memory_shape_groups=2, memory_shape_overlap=0.1)
    n, g = 240, torch.Generator().manual_seed(0)
    feats = [torch.randn(n, c, SIZE // s, SIZE // s, generator=g).half()
             for c, s in zip(CHANNELS, STRIDES, strict=True)]
    shapes = [(SIZE, SIZE // 2) if i % 2 else (SIZE, 2 * SIZE) for i in range(n)]
    regions = [Region(box=(0, 0, SIZE, SIZE), shape=shape) for shape in shapes]
    cache = FeatureCache(x=None, feats=feats, regions=regions, size=(SIZE, SIZE))
    assert model.mdaae is not None
    model.mdaae.set_feature_stats(*_feature_stats(cache))
    finish_model(model, cache, seed=0)
    assert model.memory is not None and model.memory.groups == 2
    assert float(model.memory.aspect_edges[0]) == pytest.approx(1.25)
    prep = cache.batch(range(4), torch.device("cpu"))
    maps = model.term_maps(model(prep.x, prep.feats, ("mem",), prep.aspects), ["mem"])
    assert maps["mem"].shape == (4, 1, *model.grid)
    with pytest.raises(ValueError, match="aspects"):
        model.term_maps(model(prep.x, prep.feats, ("mem",)), ["mem"])


def test_greedy_coreset_keeps_the_rare_pattern_random_may_drop() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([0.01 * torch.randn(999, 4, generator=g), torch.full((1, 4), 10.0)])
    bank = build_memory_bank(feats, 8, "greedy", seed=0)
    assert bank.shape == (8, 4)
    assert float(bank.max()) == 10.0
    memory = NormalMemory("knn", 4)
    memory.fit_knn(feats, 8, "greedy", seed=0)
    assert float(memory.distance(torch.full((1, 4, 1, 1), 10.0))) == pytest.approx(0.0, abs=1e-3)


def test_gaussian_blur_keeps_constants_and_reduce_picks_max_or_topk() -> None:
    flat = torch.full((1, 1, 16, 16), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 1, 16, 16)
    spike[0, 0, 8, 8] = 1.0
    blurred = gaussian_blur(spike, 1.0)
    assert float(blurred.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(reduce_map(blurred, "max", 0.01)) == pytest.approx(float(blurred.max()))
    assert float(reduce_map(spike, "topk", 2 / 256)) == pytest.approx(0.5)


def test_position_norm_standardises_each_position() -> None:
    model = _model("B", feature_distance="l2", position_norm=True).eval()
    batches = [_batch(4, seed) for seed in range(3)]
    with torch.inference_mode():
        model.fit_position_norm(model(b.x, b.feats) for b in batches)
        raw = torch.cat(
            [
                model.term_maps(model(b.x, b.feats), ["feat"], position_norm=False)["feat"]
                for b in batches
            ]
        )
        normed = torch.cat(
            [model.term_maps(model(b.x, b.feats), ["feat"])["feat"] for b in batches]
        )
    pooled = torch.nn.functional.adaptive_avg_pool2d(raw, SIZE // 4)[:, 0]
    i = TERMS.index("feat")
    torch.testing.assert_close(model.pos_mean[i], pooled.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.pos_std[i], pooled.std(0), rtol=1e-3, atol=1e-5)
    assert abs(float(normed.mean())) < 0.1
    assert float(normed.std()) == pytest.approx(1.0, abs=0.25)


def test_residual_mahalanobis_flags_what_the_autoencoder_cannot_rebuild() -> None:
    model = _model("B").eval()
    mdaae = model.mdaae
    assert mdaae is not None
    normal = [_batch(8, seed) for seed in range(4)]
    with torch.inference_mode():
        mdaae.fit_residuals((mdaae.standardise(b.feats or []) for b in normal), eps=0.01)
        probe = _batch(2, seed=10)
        assert probe.feats is not None
        clean = model.term_maps(model(probe.x, probe.feats), ["feat"], position_norm=False)
        hit = [f.clone() for f in probe.feats]
        hit[1][1, :, 3:5, 3:5] += 8.0  # a local defect in image 1 at the stride-8 level
        dirty = model.term_maps(model(probe.x, hit), ["feat"], position_norm=False)
    # The spot on the stride-4 grid of the term maps.
    assert float(dirty["feat"][1, 0, 6:10, 6:10].max()) > 2 * float(
        clean["feat"][1, 0, 6:10, 6:10].max()
    )
    torch.testing.assert_close(dirty["feat"][0], clean["feat"][0])  # image 0 is untouched
