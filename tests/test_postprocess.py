"""Smoothing and connected-component regions on synthetic anomaly maps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from linewatch.decision.postprocess import (
    Region,
    find_regions,
    render_heatmap,
    smooth_maps,
    smoothed_regions,
)


def _two_blobs_and_a_speck() -> np.ndarray:
    amap = np.zeros((64, 64), np.float32)
    amap[5:15, 5:25] = 2.0   # 10 x 20 = 200 px
    amap[8, 8] = 3.0         # its peak
    amap[40:50, 40:46] = 1.5  # 10 x 6 = 60 px
    amap[60, 2] = 9.0        # 1 px speck
    return amap


def test_two_blobs_make_two_regions_and_a_speck_is_dropped() -> None:
    regions = find_regions(_two_blobs_and_a_speck(), threshold=1.0, min_area=4)
    assert regions == [
        Region(x=5, y=5, w=20, h=10, area=200, max_score=3.0, mean_score=(199 * 2 + 3) / 200),
        Region(x=40, y=40, w=6, h=10, area=60, max_score=1.5, mean_score=1.5),
    ]


def test_min_area_keeps_the_speck_when_allowed() -> None:
    regions = find_regions(_two_blobs_and_a_speck(), threshold=1.0, min_area=1)
    assert [r.area for r in regions] == [1, 200, 60]  # highest max_score first


def test_diagonal_neighbours_are_one_region() -> None:
    amap = np.zeros((8, 8), np.float32)
    for i in range(5):
        amap[i, i] = 2.0
    (region,) = find_regions(amap, threshold=1.0, min_area=1)
    assert (region.x, region.y, region.w, region.h, region.area) == (0, 0, 5, 5, 5)


def test_threshold_is_inclusive_and_nan_is_never_a_region() -> None:
    amap = np.full((8, 8), np.nan, np.float32)
    amap[2:4, 2:4] = 1.0
    (region,) = find_regions(amap, threshold=1.0, min_area=1)
    assert region.area == 4


def test_smoothing_matches_a_gaussian_blur_per_map_and_keeps_the_batch() -> None:
    maps = np.stack([_two_blobs_and_a_speck(), np.eye(64, dtype=np.float32)])
    smoothed = smooth_maps(maps, sigma=2.0)
    assert smoothed.shape == maps.shape and smoothed.dtype == np.float32
    expected = cv2.GaussianBlur(maps[1], (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)
    np.testing.assert_allclose(smoothed[1], expected)
    assert smoothed[0, 60, 2] < 9.0 / 4  # the speck is spread out
    np.testing.assert_array_equal(smooth_maps(maps, 0.0), maps)
    with pytest.raises(ValueError, match="B, H, W"):
        smooth_maps(maps[0], 1.0)


def test_smoothing_takes_wire_maps_float16_or_uint8_with_their_scale() -> None:
    amap = _two_blobs_and_a_speck()
    reference = smooth_maps(amap[None], sigma=2.0)[0]
    from_half = smooth_maps(amap.astype(np.float16)[None], sigma=2.0)[0]
    np.testing.assert_allclose(from_half, reference, atol=1e-3)
    as_bytes = np.rint(amap * 20).astype(np.uint8)  # value = stored x 0.05
    from_bytes = smooth_maps(as_bytes[None], sigma=2.0, scale=0.05)[0]
    np.testing.assert_allclose(from_bytes, reference, atol=1e-3)


_MAPS = hnp.arrays(np.float32, st.tuples(st.integers(4, 40), st.integers(4, 40)),
                   elements=st.floats(0.0, 8.0, width=32))


@settings(max_examples=200, deadline=None)
@given(amap=_MAPS, sigma=st.sampled_from([0.0, 0.8, 2.0, 4.0]),
       where=st.floats(0.5, 1.5), min_area=st.integers(1, 6))
def test_skipping_the_blur_below_the_threshold_never_changes_the_regions(
    amap: np.ndarray, sigma: float, where: float, min_area: int
) -> None:
    # Thresholds around the smoothed peak, where a skipped blur would show.
    peak = float(smooth_maps(amap[None], sigma)[0].max())
    threshold = max(peak * where, 1e-3)
    expected = find_regions(smooth_maps(amap[None], sigma)[0], threshold, min_area)
    _, found = smoothed_regions(amap.copy(), sigma, threshold, min_area)
    assert found == expected


def test_a_map_below_the_threshold_comes_back_unsmoothed_without_regions() -> None:
    amap = _two_blobs_and_a_speck()
    same, found = smoothed_regions(amap.copy(), sigma=4.0, threshold=9.5, min_area=1)
    assert found == [] and np.array_equal(same, amap)
    smoothed, found = smoothed_regions(amap.copy(), sigma=4.0, threshold=0.5, min_area=1)
    np.testing.assert_allclose(smoothed, smooth_maps(amap[None], 4.0)[0])
    assert found


def test_non_finite_values_stay_non_finite_through_the_smoothing() -> None:
    for bad in (np.inf, -np.inf, np.nan):
        amap = np.zeros((16, 16), np.float16)
        amap[3, 12] = bad
        assert not np.isfinite(smooth_maps(amap[None], sigma=4.0)[0]).all()


def test_regions_are_the_same_as_labelling_the_whole_map() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        amap = cv2.GaussianBlur(rng.random((48, 64)).astype(np.float32), (0, 0), 1.5)
        threshold = float(np.quantile(amap, 0.9))
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            (amap >= threshold).astype(np.uint8), connectivity=8)
        expected = sorted(
            (int(s[0]), int(s[1]), int(s[2]), int(s[3]), int(s[4]),
             float(amap[labels == i].max()))
            for i, s in enumerate(stats) if i > 0 and s[4] >= 2
        )
        found = sorted((r.x, r.y, r.w, r.h, r.area, r.max_score)
                       for r in find_regions(amap, threshold, min_area=2))
        assert found == expected


def test_a_map_below_threshold_has_no_regions() -> None:
    assert find_regions(np.full((8, 8), 0.5, np.float32), threshold=1.0, min_area=1) == []


def test_smoothing_removes_the_speck_but_keeps_the_blobs() -> None:
    smoothed = smooth_maps(_two_blobs_and_a_speck()[None], sigma=2.0)[0]
    assert len(find_regions(smoothed, threshold=1.0, min_area=4)) == 2


def test_scaled_region_maps_to_frame_pixels() -> None:
    region = Region(x=10, y=4, w=6, h=3, area=15, max_score=2.0, mean_score=1.5)
    assert region.scaled(2.0, 4.0, ox=100, oy=50) == Region(
        x=120, y=66, w=12, h=12, area=120, max_score=2.0, mean_score=1.5
    )


def test_heatmap_is_a_colour_png_of_the_region_and_its_margin() -> None:
    amap = _two_blobs_and_a_speck()
    region = find_regions(amap, threshold=1.0, min_area=4)[1]
    png = render_heatmap(amap, region, margin=3)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.shape == (10 + 6, 6 + 6, 3)
