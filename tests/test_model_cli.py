"""``linewatch train|calibrate|evaluate|ablation`` end to end through the real CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.cli import main
from linewatch.data.synth import write_dataset

torch.set_num_threads(1)

EVAL_KEYS = {
    "image_auroc",
    "image_pr_auc",
    "pixel_auroc",
    "aupro",
    "f1",
    "precision",
    "recall",
    "false_alarm_rate",
    "ms_per_image",
    "n_images",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    write_dataset(root, seed=5, size=64, n_good=12, n_defect=2)
    return root


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-model") / "line.lwm"
    code = main(
        [
            "--log-level",
            "warning",
            "train",
            str(data),
            "--out",
            str(out),
            "--size",
            "64",
            "--epochs",
            "2",
            "--batch",
            "8",
            "--seed",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0 and out.exists()
    return out


def test_calibrate_then_evaluate_writes_json_and_report(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["--log-level", "warning", "calibrate", str(model), str(data), "--no-progress"]) == 0
    )
    printed = capsys.readouterr().out
    assert "thresholds operating_point" in printed
    assert "one group of frame shapes" in printed  # one frame size: no aspect groups
    assert "over val and 2 exposure-jittered copies of it" in printed
    out_json, report, scores = tmp_path / "out.json", tmp_path / "report", tmp_path / "s.csv"
    code = main(
        [
            "--log-level",
            "warning",
            "evaluate",
            str(model),
            str(data),
            "--split",
            "test",
            "--json",
            str(out_json),
            "--report",
            str(report),
            "--scores",
            str(scores),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads(out_json.read_text())
    rows = list(csv.DictReader(scores.open()))
    assert len(rows) == results["n_images"]
    assert all((data / row["image"]).is_file() for row in rows)
    good = [int(r["alarm"]) for r in rows if r["label"] == "good"]
    found = [int(r["alarm"]) for r in rows if r["label"] != "good"]
    assert len(good) == results["n_good"]
    # The per-image verdicts are the ones the figures were computed from.
    assert sum(good) / len(good) == pytest.approx(results["false_alarm_rate"])
    assert sum(found) / len(found) == pytest.approx(results["recall"])
    alarms = [float(r["score"]) >= results["threshold"] for r in rows]
    assert alarms == [bool(int(r["alarm"])) for r in rows]
    assert all(0 <= float(r["clipped_share"]) <= 1 and 0 < float(r["bright_level"]) <= 1
               for r in rows)
    assert results.keys() >= EVAL_KEYS
    assert results["n_images"] == 12 and results["f1"] is not None
    # Timed and scored as the line's workers run the model by default on this device.
    assert results["backend"] == ("onnxruntime" if results["device"] == "cpu" else "torch")
    assert (report / "index.html").read_text().count("<img") >= 2
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_images"] == 12


def _exposure_columns(model: Path, data: Path, out: Path, *corrupt: str) -> list[list[float]]:
    argv = ["--log-level", "warning", "evaluate", str(model), str(data), "--scores", str(out),
            "--no-progress", *corrupt]
    assert main(argv) == 0
    rows = csv.DictReader(out.open())
    return [[float(r["clipped_share"]), float(r["bright_level"])] for r in rows]


def test_scores_carry_the_exposure_of_the_frames_as_scored(
    model: Path, data: Path, tmp_path: Path
) -> None:
    clean = np.array(_exposure_columns(model, data, tmp_path / "clean.csv"))
    low = np.array(_exposure_columns(model, data, tmp_path / "low.csv", "--corrupt", "light:low"))
    strong = np.array(
        _exposure_columns(model, data, tmp_path / "strong.csv", "--corrupt", "light:strong"))
    assert (low[:, 1] < 0.5 * clean[:, 1]).all()  # light:low: gain 0.2-0.35
    assert (strong[:, 1] >= clean[:, 1]).all()  # gain 1.2-1.4 and an offset
    assert strong[:, 0].mean() > 2 * clean[:, 0].mean()  # and more of each frame clips


@pytest.mark.parametrize("kind", ["snp:0.25", "light:strong", "light:low", "shadow"])
def test_evaluate_under_corruption(model: Path, data: Path, tmp_path: Path, kind: str) -> None:
    out_json = tmp_path / "c.json"
    code = main(
        [
            "--log-level",
            "warning",
            "evaluate",
            str(model),
            str(data),
            "--corrupt",
            kind,
            "--json",
            str(out_json),
            "--no-progress",
        ]
    )
    assert code == 0
    assert json.loads(out_json.read_text())["corrupt"] == kind


def test_bad_inputs_give_one_line_errors(
    model: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "m.lwm")],
        ["train", str(data), "--out", str(tmp_path / "m.pt")],
        ["train", str(data), "--out", str(tmp_path / "m.lwm"), "--set", "size=100"],
        ["evaluate", str(model), str(data), "--corrupt", "fog"],
        ["evaluate", str(tmp_path / "none.lwm"), str(data)],
        ["calibrate", str(model), str(tmp_path / "missing")],
    ]
    for args in cases:
        code = main(["--log-level", "error", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0, args
        assert len(err) == 1 and err[0].startswith("linewatch: error:"), (args, err)


def test_ablation_writes_the_table(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    code = main(
        [
            "--log-level",
            "warning",
            "ablation",
            str(data),
            "--out",
            str(out),
            "--seeds",
            "1",
            "--variants",
            "BE",
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch",
            "8",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    table = (out / "ablation.md").read_text()
    assert "| B (MDAAE)" in table and "| E (MDAAE + SA-GAN (product))" in table
    payload = json.loads((out / "ablation.json").read_text())
    assert set(payload["summary"]) == {"B", "E"}
    assert payload["summary"]["E"]["image_auroc"]["n"] == 1
