"""The research scripts in experiments/ run end to end on a tiny synthetic data set."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from linewatch.cli import main
from linewatch.data.synth import write_dataset
from linewatch.model.scorer import Scorer

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exp")
    data = root / "data"
    write_dataset(data, seed=3, size=64, n_good=12, n_defect=2)
    model = root / "m.lwm"
    argv = ["--log-level", "warning", "train", str(data), "--out", str(model), "--size", "64",
            "--epochs", "1", "--batch", "8", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    return model, data


def test_memory_variants_prints_a_row_per_variant(trained: tuple[Path, Path]) -> None:
    model, data = trained
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "memory_variants.py"), str(model), str(data),
         "--variant", "mean=s4,s8,s16", "--variant", "spread=s4:std,s8:max,s16@3:0.1",
         "--corrupt", "light:strong"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]}
    assert set(rows) == {"mean", "spread"}
    assert rows["mean"][0] == "176" and rows["spread"][0] == "176"  # 24 + 40 + 112 channels
    assert rows["spread"][1] == "1"  # frames of one shape: one memory, whatever was asked
    for cells in rows.values():
        # channels, groups, val AUROC, test (AUROC, false alarms, recall, false alarms @ 0.90),
        # strong light (AUROC, false alarms, recall)
        assert len(cells) == 10
        assert all(re.fullmatch(r"\d+(\.\d+)?%?", c) for c in cells)


def test_a_bad_variant_is_refused_in_one_line(trained: tuple[Path, Path]) -> None:
    model, data = trained
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "memory_variants.py"), str(model), str(data),
         "--variant", "x=s4:median"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "pool must be one of" in done.stderr
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "memory_variants.py"), str(model), str(data),
         "--variant", "x=s4@three"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "expected NAME=LEVEL" in done.stderr


def test_operating_point_stability_reproduces_the_calibrated_threshold(
    trained: tuple[Path, Path],
) -> None:
    model, data = trained
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "operating_point_stability.py"), str(model),
         str(data), "--boot", "5"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert len(rows) == 4 and float(rows[0][0]) == 0.0  # counted, then h/2, h, 2h
    silverman = float(done.stdout.split("Silverman's bandwidth ")[1].split()[0])
    assert float(rows[2][0]) == pytest.approx(silverman, abs=1e-3)
    stored = Scorer.load(model, device="cpu").thresholds
    assert stored is not None  # calibrated with the default kernel: Silverman's rule
    assert float(rows[2][1]) == pytest.approx(stored.operating_point, abs=2e-3)
