"""An evaluation report: ``results.json`` for machines, ``index.html`` for people.

The HTML page is one self-contained file (no JavaScript, no external fonts,
styles or images): ROC and precision-recall curves as inline SVG, a table of
the figures and the overlay images as base64 PNG. It can be mailed, archived
with a model, or opened on a line PC without network. Its Content-Security-
Policy forbids loading anything, so a stray external link would show broken
rather than leak.

``results.json`` holds ``{"title", "results", "curves"}``: the results as
given (made JSON-safe: NaN and inf become null), and the image-level ROC and
PR curves with their areas (``null`` when the labels hold one class only).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel

from linewatch.errors import DataError
from linewatch.metrics import auroc, pr_auc, pr_curve, roc_curve
from linewatch.metrics.ranking import _binary_inputs

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class ReportImage:
    """One overlay of the report: its section title, a caption and the PNG bytes.

    Images with the same ``title`` are shown together under that heading, in
    the order given (e.g. title "worst false alarms", caption "cam1:4711 score 0.93").
    """

    title: str
    caption: str
    png: bytes

    def __post_init__(self) -> None:
        if not self.png.startswith(_PNG_SIGNATURE):
            raise DataError(f"report image {self.title!r} / {self.caption!r} is not a PNG")


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """Where :func:`write_report` put its files."""

    json: Path
    html: Path


def write_report(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, Any],
    labels: ArrayLike,
    scores: ArrayLike,
    overlays: Sequence[ReportImage] = (),
    title: str = "linewatch evaluation",
) -> ReportPaths:
    """Write ``results.json`` and ``index.html`` into ``out_dir`` (created if missing).

    ``labels``/``scores`` are the image-level ground truth (1 = defect) and
    scores the curves are drawn from. Each file is written whole or not at all.
    """
    out = Path(out_dir)
    y, s = _binary_inputs(labels, scores, both_classes=False)
    curves = _curves(y, s)
    payload = {"title": title, "results": _jsonable(results, "results"), "curves": curves}
    n_good, n_defect = int(np.count_nonzero(~y)), int(np.count_nonzero(y))
    page = _page(title, payload["results"], curves, n_good, n_defect, overlays)
    paths = ReportPaths(json=out / "results.json", html=out / "index.html")
    write_text_atomic(paths.json, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    write_text_atomic(paths.html, page)
    return paths


# ----------------------------------------------------------------------- data


def _curves(y: np.ndarray, s: np.ndarray) -> dict[str, Any] | None:
    """ROC and PR curves with their areas, or None when one class is missing."""
    if y.all() or not y.any():
        return None
    fpr, tpr, roc_thr = roc_curve(y, s)
    precision, recall, pr_thr = pr_curve(y, s)
    return {
        "roc": {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            # The first threshold is inf (nothing flagged); JSON has no inf.
            "thresholds": [None, *roc_thr[1:].tolist()],
            "auroc": auroc(y, s),
        },
        "pr": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "thresholds": pr_thr.tolist(),
            "average_precision": pr_auc(y, s),
        },
    }


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; NaN and inf become None. ``where`` names it in errors."""
    if isinstance(value, BaseModel):
        return _jsonable(value.model_dump(mode="json"), where)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise DataError(f"{where}: a {type(value).__name__} cannot be written to results.json")


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so readers never see half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write ({exc.strerror})") from exc


# ----------------------------------------------------------------------- page

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.curves, .gallery { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; max-width: 360px; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: 12px; color: #555; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""

# Nothing may be fetched: images are data: URLs, styles inline, scripts none.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _page(
    title: str,
    results: Any,
    curves: dict[str, Any] | None,
    n_good: int,
    n_defect: int,
    overlays: Sequence[ReportImage],
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>{n_good} good and {n_defect} defective images.</p>",
        "<h2>Figures</h2>",
        _table(results),
        "<h2>Curves</h2>",
        _curves_html(curves),
    ]
    parts += _gallery(overlays)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, leaf value) rows, in insertion order."""
    if isinstance(value, Mapping):
        rows: list[tuple[str, Any]] = []
        for k, v in value.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix, value)]


def _cell(value: Any) -> str:
    """A table cell: numbers right-aligned to 4 significant digits, the rest as text."""
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    if value is None:
        return "<td>n/a</td>"
    if isinstance(value, list):
        text = json.dumps(value) if len(value) <= 8 else f"[{len(value)} values]"
        return f"<td>{html.escape(text)}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _table(results: Any) -> str:
    rows = _flatten(results)
    if not rows:
        return "<p>No figures.</p>"
    body = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def _curves_html(curves: dict[str, Any] | None) -> str:
    if curves is None:
        return "<p>No curves: the labels hold one class only.</p>"
    roc, pr = curves["roc"], curves["pr"]
    # Average precision is the area under this step curve, so draw the steps.
    recall = np.asarray(pr["recall"])[::-1]
    precision = np.asarray(pr["precision"])[::-1]
    step_x = np.column_stack([recall[:-1], recall[1:]]).ravel()
    step_y = np.repeat(precision[1:], 2)
    return (
        '<div class="curves">'
        + _svg_plot(
            np.asarray(roc["fpr"]), np.asarray(roc["tpr"]),
            f"ROC, AUROC {roc['auroc']:.4f}", "false positive rate", "true positive rate",
            diagonal=True,
        )
        + _svg_plot(
            step_x, step_y,
            f"Precision-recall, AP {pr['average_precision']:.4f}", "recall", "precision",
        )
        + "</div>"
    )


def _svg_plot(
    x: np.ndarray, y: np.ndarray, title: str, xlabel: str, ylabel: str, diagonal: bool = False
) -> str:
    """A unit-square line plot as an inline SVG element."""
    w, h, left, right, top, bottom = 360, 320, 50, 15, 30, 45
    pw, ph = w - left - right, h - top - bottom

    def px(u: float) -> float:
        return left + u * pw

    def py(v: float) -> float:
        return top + (1.0 - v) * ph

    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="{e(title)}">',
        f'<text x="{w / 2}" y="18" text-anchor="middle">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(
            f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + ph}" stroke="#eee"/>'
            f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#eee"/>'
            f'<text x="{px(t):.1f}" y="{top + ph + 15}" text-anchor="middle">{t:g}</text>'
            f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
        )
    if diagonal:
        out.append(
            f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" '
            'stroke="#bbb" stroke-dasharray="4 3"/>'
        )
    points = " ".join(f"{px(u):.1f},{py(v):.1f}" for u, v in zip(x, y, strict=True))
    out += [
        f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="2"/>',
        f'<text x="{left + pw / 2}" y="{h - 8}" text-anchor="middle">{e(xlabel)}</text>',
        f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{e(ylabel)}</text>',
        "</svg>",
    ]
    return "".join(out)


def _gallery(overlays: Sequence[ReportImage]) -> list[str]:
    """One section per distinct title (first-seen order), one figure per image."""
    sections: dict[str, list[ReportImage]] = {}
    for image in overlays:
        sections.setdefault(image.title, []).append(image)
    parts = []
    for section, images in sections.items():
        parts.append(f"<h2>{html.escape(section)}</h2><div class=\"gallery\">")
        for image in images:
            data = base64.b64encode(image.png).decode("ascii")
            parts.append(
                f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(image.caption)}">'
                f"<figcaption>{html.escape(image.caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    return parts
