"""The ablation study (``linewatch ablation``): variants A-E, same budget, same seeds.

Every variant is trained with the same :class:`TrainSettings` (epochs, batch, learning rates,
augmentation) and seed, calibrated on ``val`` and evaluated on ``test``; the table gives the
mean ± sample std over seeds, like the paper's Table 2. Backbone features are extracted once
per seed and shared by every variant of that seed (the backbone is frozen).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from linewatch.log import get_logger
from linewatch.model.acceleration import load_served_scorer
from linewatch.model.evaluate import EvalResult, evaluate_scorer
from linewatch.model.scorer import build_backbone, resolve_device
from linewatch.model.settings import TrainSettings, variant_settings
from linewatch.model.train import TrainReport, prepare_data, train

__all__ = ["METRICS", "AblationRow", "run_ablation", "write_table"]

log = get_logger("ablation")

# Columns of the table: (key in the row, heading).
METRICS: tuple[tuple[str, str], ...] = (
    ("image_auroc", "image AUROC"),
    ("image_pr_auc", "PR-AUC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("f1", "F1 @ op"),
    ("false_alarm_rate", "false alarms @ op"),
    ("best_f1", "best F1"),
    ("ms_per_image", "ms/img"),
    ("train_seconds", "train s"),
)

VARIANT_NAMES = {
    "A": "baseline GAN",
    "B": "MDAAE",
    "C": "SA-GAN",
    "D": "MDAAE + baseline D",
    "E": "MDAAE + SA-GAN (product)",
}


class AblationRow(BaseModel):
    """One variant trained and evaluated with one seed."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    seed: int
    model_path: str
    train: TrainReport
    result: EvalResult

    def value(self, key: str) -> float | None:
        """A metric by table key (``train_seconds`` comes from the training report)."""
        if key == "train_seconds":
            return self.train.seconds
        value = getattr(self.result, key)
        return float(value) if value is not None else None


def run_ablation(
    data: str | Path,
    out: str | Path,
    variants: Sequence[str] = ("A", "B", "C", "D", "E"),
    seeds: int = 3,
    overrides: dict[str, Any] | None = None,
    ts: TrainSettings | None = None,
    batch: int = 8,
    progress: bool = True,
) -> list[AblationRow]:
    """Train, calibrate and evaluate each variant for seeds ``0..seeds-1``; write the table.

    ``overrides`` are model settings applied to every variant (e.g. ``size``); a part an
    override switches off drops out of that variant's score.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ts = ts or TrainSettings()
    overrides = dict(overrides or {})
    device = resolve_device(ts.device)
    rows: list[AblationRow] = []
    for seed in range(seeds):
        seed_ts = ts.model_copy(update={"seed": seed})
        reference = variant_settings("E", **overrides)
        backbone = build_backbone(reference, device)
        prepared = prepare_data(data, reference, seed_ts, device, backbone, keep_pixels=True)
        for variant in variants:
            settings = variant_settings(variant, **overrides)
            path = out / f"{variant}-seed{seed}.lwm"
            report = train(data, path, settings, seed_ts, progress=progress, prepared=prepared)
            torch.manual_seed(seed)
            scorer = load_served_scorer(path, str(device))
            result = evaluate_scorer(
                scorer, prepared.dataset, "test", batch=batch, progress=progress
            )
            scorer.close()
            rows.append(
                AblationRow(
                    variant=variant, seed=seed, model_path=str(path), train=report, result=result
                )
            )
            log.info(
                "ablation_row",
                variant=variant,
                seed=seed,
                image_auroc=round(result.image_auroc, 4),
            )
            write_table(out, rows)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(rows: Sequence[AblationRow]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> {mean, std, n} over seeds (metrics with a value only)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for variant in dict.fromkeys(r.variant for r in rows):
        mine = [r for r in rows if r.variant == variant]
        table[variant] = {}
        for key, _ in METRICS:
            values = [v for r in mine if (v := r.value(key)) is not None and math.isfinite(v)]
            if values:
                mean, std = _mean_std(values)
                table[variant][key] = {"mean": mean, "std": std, "n": len(values)}
    return table


def write_table(out: Path, rows: Sequence[AblationRow]) -> tuple[Path, Path]:
    """``ablation.json`` (every row and the summary) and ``ablation.md`` (the table)."""
    summary = summarise(rows)
    payload = {"summary": summary, "rows": [r.model_dump(mode="json") for r in rows]}
    json_path = out / "ablation.json"
    md_path = out / "ablation.md"
    json_path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    lines = [
        "| variant | " + " | ".join(h for _, h in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for variant, metrics in summary.items():
        cells = []
        for key, _ in METRICS:
            m = metrics.get(key)
            if m is None:
                cells.append("-")
            elif key in ("ms_per_image", "train_seconds"):
                cells.append(f"{m['mean']:.1f} ± {m['std']:.1f}")
            else:
                cells.append(f"{m['mean']:.3f} ± {m['std']:.3f}")
        name = f"{variant} ({VARIANT_NAMES.get(variant, variant)})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = sorted({r.seed for r in rows})
    lines.append("")
    lines.append(f"mean ± std over seeds {seeds}; op = the stored operating point.")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
