"""Overlays, PNG encoding and the HTML/JSON evaluation report."""

from __future__ import annotations

import base64
import doctest
import json
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch import visualize
from linewatch.errors import DataError
from linewatch.metrics import ThresholdSet, auroc, pr_auc, roc_curve
from linewatch.report import ReportImage, write_report
from linewatch.visualize import draw_regions, encode_png, heatmap_overlay


def test_doctests() -> None:
    result = doctest.testmod(visualize, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------- visualize


def _decode_rgb(png: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr is not None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else bgr


def test_overlay_is_red_where_the_map_is_high_and_blue_where_low() -> None:
    image = np.full((40, 60), 128, np.uint8)
    amap = np.zeros((10, 15), np.float32)
    amap[:, 8:] = 1.0  # right half hot, given at a quarter of the image size
    out = heatmap_overlay(image, amap, vmax=1.0, alpha=1.0)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    r, _, b = out[20, 55].astype(int)
    assert r > 100 and b < 50  # JET top is dark red
    r, _, b = out[20, 2].astype(int)
    assert b > 100 and r < 50  # JET bottom is dark blue


def test_overlay_alpha_zero_is_the_image_and_uint16_is_scaled_by_bit_depth() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = heatmap_overlay(rgb, np.random.default_rng(1).random((8, 8)), alpha=0.0)
    np.testing.assert_array_equal(out, rgb)
    twelve_bit = np.array([[0, 4095], [2048, 16]], dtype=np.uint16)
    out = heatmap_overlay(twelve_bit, np.zeros((2, 2)), alpha=0.0)
    assert out[:, :, 0].tolist() == [[0, 255], [128, 1]]


def test_overlay_rejects_bad_inputs() -> None:
    with pytest.raises(DataError, match="dtype"):
        heatmap_overlay(np.zeros((4, 4), np.float32), np.zeros((4, 4)))
    with pytest.raises(DataError, match="H x W"):
        heatmap_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4, 2)))
    # A NaN map and a flat map do not fail: they show as the low end.
    out = heatmap_overlay(np.zeros((4, 4), np.uint8), np.full((4, 4), np.nan), alpha=1.0)
    assert (out[:, :, 2] > 100).all()


@dataclass(frozen=True)
class _Region:
    x: int
    y: int
    w: int
    h: int


def test_draw_regions_outlines_boxes_from_tuples_and_region_objects() -> None:
    rgb = np.zeros((20, 20, 3), np.uint8)
    out = draw_regions(rgb, [(2, 3, 5, 4), _Region(10, 10, 3, 3)], color=(0, 255, 0))
    assert rgb.max() == 0  # the input is not drawn on
    outline = np.zeros((20, 20), bool)
    outline[3, 2:7] = outline[6, 2:7] = outline[3:7, 2] = outline[3:7, 6] = True
    outline[10, 10:13] = outline[12, 10:13] = outline[10:13, 10] = outline[10:13, 12] = True
    np.testing.assert_array_equal(out[:, :, 1] == 255, outline)
    with pytest.raises(DataError, match="no area"):
        draw_regions(rgb, [(0, 0, 0, 3)])


def test_encode_png_round_trips_rgb_and_gray() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_rgb(encode_png(rgb)), rgb)
    gray16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    np.testing.assert_array_equal(_decode_rgb(encode_png(gray16)), gray16)
    with pytest.raises(DataError, match="uint8 or uint16"):
        encode_png(np.zeros((2, 2), np.float32))


# ----------------------------------------------------------------------- report


class _Collector(HTMLParser):
    """Tags, attributes and text of a page, failing on unbalanced tags."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})
    SVG_SELF_CLOSING = frozenset({"rect", "line", "polyline"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> in {self.stack}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Collector:
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    return parser


def _labels_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(30, int), np.ones(10, int)]
    return labels, rng.normal(labels * 1.2, 1.0)


def test_report_writes_parsable_self_contained_html_and_round_trip_json(tmp_path: Path) -> None:
    labels, scores = _labels_scores()
    thresholds = ThresholdSet(
        operating_point=0.6, f1_max=0.5, youden=0.4, min_recall=0.9, n_good=30, n_defect=10
    )
    results = {
        "auroc": auroc(labels, scores),
        "pr_auc": pr_auc(labels, scores),
        "camera": "cam<1>&",
        "per_class": {"scratch": {"f1": 0.98}, "dent": {"f1": 0.99}},
        "false_alarm_rate": float("nan"),
        "n_images": np.int64(40),
        "thresholds": thresholds,
    }
    png = encode_png(heatmap_overlay(np.zeros((16, 16), np.uint8), np.eye(16)))
    overlays = [
        ReportImage("worst false alarms", "cam1:17 score 0.93 <good>", png),
        ReportImage("missed defects", "cam2:4 score 0.12", png),
        ReportImage("worst false alarms", "cam1:3 score 0.90", png),
    ]
    paths = write_report(tmp_path / "out", results, labels, scores, overlays, title="Tiles & <co>")

    page = paths.html.read_text(encoding="utf-8")
    doc = _parse(page)
    text = " ".join(doc.text)
    # Escaped text reads back as given; no raw markup from the data leaks into tags.
    assert "Tiles & <co>" in text and "cam<1>&" in text and "cam1:17 score 0.93 <good>" in text
    assert not any(tag in ("co", "good", "script", "link") for tag, _ in doc.tags)
    # The figures, nested ones under dotted keys, NaN as n/a.
    for shown in (f"{results['auroc']:.4g}", "per_class.scratch.f1", "0.98", "n/a", "40"):
        assert shown in text
    assert "thresholds.version" in text and thresholds.version in text
    # Two curves inline; one <img> per overlay, each a data: PNG; sections by title.
    assert [tag for tag, _ in doc.tags].count("svg") == 2
    images = [attrs for tag, attrs in doc.tags if tag == "img"]
    assert len(images) == len(overlays)
    for attrs in images:
        src = attrs["src"] or ""
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")) == png
    assert text.index("worst false alarms") < text.index("missed defects")
    assert text.count("worst false alarms") == 1
    # Self-contained: nothing refers outside the page.
    for _, attrs in doc.tags:
        for name in ("src", "href"):
            assert (attrs.get(name) or "data:").startswith("data:")

    stored = json.loads(paths.json.read_text(encoding="utf-8"))
    assert stored["title"] == "Tiles & <co>"
    assert stored["results"]["per_class"] == results["per_class"]
    assert stored["results"]["camera"] == "cam<1>&"
    assert stored["results"]["false_alarm_rate"] is None
    assert stored["results"]["n_images"] == 40
    assert ThresholdSet.model_validate(stored["results"]["thresholds"]) == thresholds
    fpr, tpr, thr = roc_curve(labels, scores)
    assert stored["curves"]["roc"]["fpr"] == fpr.tolist()
    assert stored["curves"]["roc"]["tpr"] == tpr.tolist()
    assert stored["curves"]["roc"]["thresholds"] == [None, *thr[1:].tolist()]
    assert stored["curves"]["roc"]["auroc"] == results["auroc"]
    assert stored["curves"]["pr"]["average_precision"] == results["pr_auc"]


def test_report_with_one_class_has_no_curves(tmp_path: Path) -> None:
    paths = write_report(tmp_path, {"n": 3}, [0, 0, 0], [0.1, 0.2, 0.3], [])
    assert json.loads(paths.json.read_text())["curves"] is None
    doc = _parse(paths.html.read_text())
    assert "one class only" in " ".join(doc.text)
    assert not any(tag == "svg" for tag, _ in doc.tags)


def test_report_rejects_unwritable_results_and_non_png(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"results\.model: a object"):
        write_report(tmp_path, {"model": object()}, [0, 1], [0.1, 0.9])
    with pytest.raises(DataError, match="not a PNG"):
        ReportImage("t", "c", b"GIF89a")
    assert not any(tmp_path.iterdir())  # nothing half-written
