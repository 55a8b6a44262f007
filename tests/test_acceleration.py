"""Inference options: parsed and refused clearly, scores kept, applied by the line's loader.

Tolerances are measured, not invented (``bench/README.md``, "Inference options on CPU"):
channels_last gave bit-identical scores; bf16 moved scores by up to 30 % of the operating
threshold on magnetic-tile val (median 4 %) and by up to 22 % on the tiny model of these tests,
and an image's bf16 score did not depend on its batch (within 1e-6).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.bench.report import BenchReport
from linewatch.cli import main
from linewatch.config import InferenceOptions, LineConfig, validate_config
from linewatch.data.images import read_image
from linewatch.data.mvtec import MVTecDataset
from linewatch.errors import ConfigError
from linewatch.inference.worker import load_line_scorer
from linewatch.model.acceleration import (
    AcceleratedBackbone,
    apply_options,
    backend_of,
    load_served_scorer,
    resolve_backend,
)
from linewatch.model.scorer import BackboneOnlyScorer, Scorer

torch.set_num_threads(1)


def _config(model: Path, **inference: object) -> LineConfig:
    return validate_config({
        "line": "acc",
        "cameras": [{"id": "cam0", "source": {"kind": "synth"}}],
        "workers": {"device": "cpu", "inference": inference},
        "model": {"path": str(model)},
    })


@pytest.fixture(scope="module")
def frames(tiny_line_model: tuple[Path, Path]) -> list[np.ndarray]:
    data, _ = tiny_line_model
    return [read_image(s.path) for s in MVTecDataset(data).samples("test")][:8]


def _scores(model: Path, frames: list[np.ndarray], batch: int, **options: object) -> np.ndarray:
    scorer = Scorer.load(model, device="cpu")
    apply_options(scorer, InferenceOptions.model_validate(options))
    starts = range(0, len(frames), batch)
    return np.concatenate([scorer.score_batch(frames[i : i + batch]).scores for i in starts])


def test_defaults_keep_fp32_scores_and_options_parse(tiny_line_model: tuple[Path, Path]) -> None:
    default = _config(tiny_line_model[1]).workers.inference
    assert default == InferenceOptions(
        backend="auto", precision="fp32", channels_last=True, compile=False
    )
    chosen = _config(tiny_line_model[1], precision="bf16", channels_last=True).workers.inference
    assert (chosen.precision, chosen.channels_last) == ("bf16", True)


def test_auto_backend_is_onnxruntime_where_it_runs_and_torch_elsewhere() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend(InferenceOptions(), cpu).backend == "onnxruntime"
    assert resolve_backend(InferenceOptions(), cuda).backend == "torch"
    assert resolve_backend(InferenceOptions(precision="bf16"), cpu).backend == "torch"
    assert resolve_backend(InferenceOptions(compile=True), cpu).backend == "torch"
    assert resolve_backend(InferenceOptions(backend="torch"), cpu).backend == "torch"


@pytest.mark.parametrize(
    ("inference", "named"),
    [
        ({"precision": "int8"}, "workers.inference.precision"),
        ({"channels_last": "sometimes"}, "workers.inference.channels_last"),
        ({"backend": "tensorrt"}, "workers.inference.backend"),
        ({"engine": "tensorrt"}, "workers.inference.engine: unknown key"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_key(
    tiny_line_model: tuple[Path, Path], inference: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        _config(tiny_line_model[1], **inference)


def test_fp16_on_a_cpu_is_refused_at_load(tiny_line_model: tuple[Path, Path]) -> None:
    config = _config(tiny_line_model[1], precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        load_line_scorer(config)


def test_channels_last_keeps_scores(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    model = tiny_line_model[1]
    reference = _scores(model, frames, 4, channels_last=False)
    np.testing.assert_allclose(_scores(model, frames, 4, channels_last=True), reference,
                               rtol=0, atol=1e-5)


def test_bf16_scores_stay_near_fp32_and_do_not_depend_on_the_batch(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    model = tiny_line_model[1]
    reference = _scores(model, frames, 4, channels_last=False)
    batched = _scores(model, frames, 4, precision="bf16", channels_last=True)
    alone = _scores(model, frames, 1, precision="bf16", channels_last=True)
    threshold = Scorer.load(model, device="cpu").threshold()
    assert np.abs(batched - reference).max() <= 0.5 * threshold
    assert not np.array_equal(batched, reference)  # it did run in bf16
    np.testing.assert_allclose(alone, batched, rtol=0, atol=1e-4)


def test_onnxruntime_keeps_scores_and_batch_invariance(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    model = tiny_line_model[1]
    reference = _scores(model, frames, 4, channels_last=False)
    batched = _scores(model, frames, 4, backend="onnxruntime")
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(_scores(model, frames, 1, backend="onnxruntime"), batched,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("options", [{"precision": "bf16"}, {"compile": True}])
def test_onnxruntime_refuses_what_it_does_not_run(
    tiny_line_model: tuple[Path, Path], options: dict[str, object]
) -> None:
    config = _config(tiny_line_model[1], backend="onnxruntime", **options)
    with pytest.raises(ConfigError, match="onnxruntime runs fp32 without compile"):
        load_line_scorer(config)


def test_onnxruntime_missing_is_a_one_line_error_saying_what_to_install(
    tiny_line_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    missing = r"onnxruntime is not installed \(a linewatch dependency; reinstall linewatch\)"
    with pytest.raises(ConfigError, match=missing):
        load_line_scorer(_config(tiny_line_model[1], backend="onnxruntime"))


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="torch.compile on a CPU needs a C++ compiler (none on PATH)",
)
def test_compile_keeps_scores_for_every_batch_size(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    model = tiny_line_model[1]
    reference = _scores(model, frames, 4, channels_last=False)
    scorer = Scorer.load(model, device="cpu")
    apply_options(scorer, InferenceOptions(compile=True))
    for batch in (1, 3, 8):  # the two graphs compiled at load
        got = np.concatenate([scorer.score_batch(frames[i : i + batch]).scores
                              for i in range(0, len(frames), batch)])
        np.testing.assert_allclose(got, reference, rtol=0, atol=1e-4)


def test_the_line_loads_its_scorer_with_the_configured_options(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    model = tiny_line_model[1]
    default = load_line_scorer(_config(model))
    assert isinstance(default, Scorer) and default.backbone is not None
    assert isinstance(default.backbone.net, AcceleratedBackbone)
    assert default.backbone.net.options == InferenceOptions(backend="onnxruntime")
    plain = load_line_scorer(_config(model, backend="torch", channels_last=False))
    assert isinstance(plain, Scorer) and plain.backbone is not None
    assert not isinstance(plain.backbone.net, AcceleratedBackbone)
    np.testing.assert_allclose(default.score_batch(frames[:4]).scores,
                               plain.score_batch(frames[:4]).scores, rtol=0, atol=1e-5)


def test_calibrate_and_evaluate_load_the_model_as_the_line_serves_it(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    model = tiny_line_model[1]
    served = load_served_scorer(model, "cpu")
    assert backend_of(served) == "onnxruntime"
    assert backend_of(Scorer.load(model, "cpu")) == "torch"
    line = load_line_scorer(_config(model))
    np.testing.assert_array_equal(served.score_batch(frames[:4]).scores,
                                  line.score_batch(frames[:4]).scores)


def test_options_are_applied_once_and_fit_the_backbone_only_scorer(
    tiny_line_model: tuple[Path, Path], frames: list[np.ndarray]
) -> None:
    scorer = BackboneOnlyScorer.load(tiny_line_model[1], device="cpu")
    options = InferenceOptions(channels_last=True)
    apply_options(scorer, options)
    assert len(scorer.score_batch(frames[:2]).maps) == 2
    with pytest.raises(ConfigError, match="already applied"):
        apply_options(scorer, options)


def test_bench_runs_the_model_with_the_options_of_its_flags(
    tmp_path: Path, tiny_line_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    flags = ["--log-level", "warning", "bench", "--device", "cpu", "--only", "model",
             "--model", str(tiny_line_model[1]), "--sizes", "64", "--batches", "2",
             "--tiled-frame", "0", "--repeats", "1", "--warmup", "0"]
    assert main([*flags, "--precision", "bf16", "--channels-last", "--json", str(out)]) == 0
    report = BenchReport.model_validate_json(out.read_text())
    assert report.model is not None
    # as run: auto is torch under bf16
    assert report.model.inference == InferenceOptions(backend="torch", precision="bf16",
                                                      channels_last=True)
    assert "--precision bf16 --channels-last --no-compile" in report.command
    assert main([*flags, "--precision", "fp16"]) != 0
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
