"""How a loaded scorer runs its networks: backend, precision, memory layout, compilation.

:func:`apply_options` changes how the frozen backbone of a loaded scorer computes, never what
the scorer does with its features; the line's loader applies ``workers.inference``::

    scorer = Scorer.load("line.lwm", device="cpu")
    apply_options(scorer, InferenceOptions(backend="onnxruntime"))

Measured on the development CPU (2 shared cores, 1 thread; ``bench/README.md``, "Inference
options on CPU"), scorer time per batch against fp32 eager torch, and the largest score change
on magnetic-tile val as a share of the operating threshold:

- ``channels_last`` (default on): the backbone on NHWC tensors; 1.1-1.7x, scores unchanged
  (bit-identical).
- ``backend = "onnxruntime"``: the backbone exported to ONNX at load (under a second) and run
  by ONNX Runtime on the CPU, fp32; 2.0-7.3x, scores within 1e-5. What ``backend = "auto"``
  (the default) picks wherever it can run: a CPU, fp32, no compile.
- ``compile``: :func:`torch.compile` of the backbone, compiled at load on dummy batches (one
  graph for a batch of one, one for 2 to 15; 16 and more compile once more on first use);
  1.3-3.7x, scores within 1e-5, but 2-37 s more per load (each hot reload too) and a C++
  compiler on the line PC.
- ``precision = "bf16"``: the backbone under :func:`torch.autocast`; 1.7-4.5x with
  ``channels_last`` on a CPU with AVX512-BF16, but scores move by up to 30 % of the
  threshold (median 4 %; AUROC unchanged), so thresholds calibrated in fp32 do not fit it.
  ``fp16`` is CUDA only. The features go on to the heads as float32 either way: the
  Mahalanobis terms need float32's range and resolution.

The heads (``scorer.model``) run as they are: they cost a fraction of the backbone (README,
``scorer_over_backbone``) and their memory-bank search runs image by image.

The scorer's batch invariance holds under every option: an image scored alone and in a batch
of eight differed by at most 4e-6 on magnetic-tile val (317 images) with each of them.

The CUDA paths (autocast fp16/bf16, channels_last, compile on a GPU) are written but have not
run: the development machine has no GPU.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from linewatch.config import InferenceOptions
from linewatch.errors import ConfigError
from linewatch.log import get_logger
from linewatch.model.backbone import FeatureExtractor, LevelBackbone
from linewatch.model.scorer import Scorer

__all__ = [
    "AcceleratedBackbone",
    "InferenceOptions",
    "OnnxRuntimeLevels",
    "apply_options",
    "backend_of",
    "check_options",
    "load_served_scorer",
    "resolve_backend",
]

log = get_logger("acceleration")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Options under which the backbone runs exactly as loaded: nothing to wrap.
_AS_LOADED = InferenceOptions(backend="torch", precision="fp32", channels_last=False,
                              compile=False)


class _HasBackbone(Protocol):
    """A scorer as :func:`apply_options` sees it (both scorers of ``scorer.py``)."""

    @property
    def backbone(self) -> FeatureExtractor | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def size(self) -> int: ...


def resolve_backend(options: InferenceOptions, device: torch.device) -> InferenceOptions:
    """``options`` with ``backend = "auto"`` made concrete for ``device``: ONNX Runtime where
    it can run (a CPU, fp32, no compile), torch elsewhere."""
    if options.backend != "auto":
        return options
    ort_runs = device.type == "cpu" and options.precision == "fp32" and not options.compile
    return options.model_copy(update={"backend": "onnxruntime" if ort_runs else "torch"})


def check_options(options: InferenceOptions, device: torch.device) -> None:
    """Refuse options ``device`` cannot run, with a one-line error naming the setting."""
    options = resolve_backend(options, device)
    if options.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "workers.inference.precision fp16 needs a CUDA device; use bf16 or fp32 on a CPU"
        )
    if options.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "workers.inference.precision bf16: this GPU has no bf16 support; use fp16"
        )
    if options.precision == "bf16" and device.type == "cpu" and not _cpu_has_fast_bf16():
        # Runs, but emulated: slower than fp32. Say so rather than refuse a working setting.
        log.warning("bf16_emulated", note="no AVX512-BF16/AMX on this CPU; fp32 is faster")
    if options.backend == "onnxruntime":
        _check_onnxruntime(options, device)


def _check_onnxruntime(options: InferenceOptions, device: torch.device) -> None:
    """ONNX Runtime runs the fp32 backbone on a CPU; anything else is a one-line error."""
    if device.type != "cpu":
        raise ConfigError("workers.inference.backend onnxruntime runs on a CPU; on "
                          f"{device.type} use backend torch")
    if options.precision != "fp32" or options.compile:
        raise ConfigError("workers.inference.backend onnxruntime runs fp32 without compile; "
                          "set precision = \"fp32\" and compile = false")


def _cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


Levels = Callable[[Tensor, tuple[str, ...]], list[Tensor]]


class AcceleratedBackbone(LevelBackbone):
    """``net`` run with :class:`InferenceOptions`: same levels, float32 NCHW features out.

    ``run`` (for another backend) replaces ``net.forward_levels``; layout, autocast and
    compile then do not apply.
    """

    def __init__(
        self,
        net: LevelBackbone,
        options: InferenceOptions,
        device: torch.device,
        run: Levels | None = None,
    ) -> None:
        super().__init__()
        self.inner = net
        self.levels = net.levels
        self.options = options
        self.device_type = device.type
        channels_last = options.channels_last and run is None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast_dtype = _DTYPES.get(options.precision)
        if channels_last:
            # Documented (Module.to(memory_format=...)) but missing from torch's type stubs.
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._run: Any = net.forward_levels if run is None else run
        if options.compile:
            # Static sizes with only the batch left free: dynamic=True makes every size
            # symbolic (TF "SAME" padding then guards on each) and compiled >6 min here.
            self._run = torch.compile(net.forward_levels, dynamic=False)

    def forward_levels(self, x: Tensor, names: Sequence[str]) -> list[Tensor]:
        """Feature maps at ``names`` as float32 in the standard (NCHW) layout."""
        x = x.contiguous(memory_format=self.memory_format)
        if self.options.compile:
            torch._dynamo.maybe_mark_dynamic(x, 0)  # one graph for every batch size > 1
        with torch.autocast(
            self.device_type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            feats: list[Tensor] = self._run(x, tuple(names))
        # The heads expect what the fp32 eager backbone gives: float32, NCHW-contiguous.
        return [f.float().contiguous() for f in feats]


def apply_options(scorer: _HasBackbone, options: InferenceOptions) -> None:
    """Run ``scorer``'s backbone with ``options`` (in place); compiles at once if asked.

    Options are set once, right after :meth:`Scorer.load`; applying options to a scorer that
    runs with some already is refused. Options that ``scorer.device`` cannot run are a
    :class:`ConfigError` naming the setting. fp32 without ``channels_last`` or ``compile``
    leaves the scorer as it was loaded.
    """
    options = resolve_backend(options, scorer.device)
    check_options(options, scorer.device)
    backbone = scorer.backbone
    if backbone is None or options == _AS_LOADED:
        return
    if isinstance(backbone.net, AcceleratedBackbone):
        raise ConfigError("inference options are already applied to this scorer")
    run = OnnxRuntimeLevels(backbone, scorer.size) if options.backend == "onnxruntime" else None
    backbone.net = AcceleratedBackbone(backbone.net, options, scorer.device, run)
    if options.compile:
        _compile_now(backbone, scorer.size, scorer.device)
    if options.precision != "fp32":
        log.warning("reduced_precision_scores", precision=options.precision,
                    note="scores move (magnetic-tile: up to 30 % of the threshold); "
                         "thresholds calibrated in fp32 may not fit")
    log.info(
        "inference_options",
        backend=options.backend,
        precision=options.precision,
        channels_last=options.channels_last,
        compile=options.compile,
        device=str(scorer.device),
    )


def load_served_scorer(
    path: str | Path, device: str = "auto", options: InferenceOptions | None = None
) -> Scorer:
    """The model file at ``path``, run as the line's workers run it by default (or with
    ``options``): what ``calibrate`` fits thresholds on and ``evaluate`` times is then what
    the line serves, ONNX Runtime on a CPU included."""
    scorer = Scorer.load(path, device)
    try:
        apply_options(scorer, options or InferenceOptions())
    except BaseException:
        scorer.close()
        raise
    return scorer


def backend_of(scorer: _HasBackbone) -> str:
    """What runs ``scorer``'s backbone: ``onnxruntime`` or ``torch`` (``none`` without one)."""
    backbone = scorer.backbone
    if backbone is None:
        return "none"
    net = backbone.net
    return net.options.backend if isinstance(net, AcceleratedBackbone) else "torch"


def _compile_now(backbone: FeatureExtractor, size: int, device: torch.device) -> None:
    """Compile now, on dummy batches, instead of on the line's first frames.

    Two graphs: batches of two and more share one; a batch of one is a graph of its own
    (torch specialises sizes 0 and 1).
    """
    try:
        with torch.inference_mode():
            for batch in (2, 1):
                backbone(torch.zeros(batch, 3, size, size, device=device))
    except Exception as exc:  # inductor failures come from many layers; all mean "cannot"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"workers.inference.compile: torch.compile failed on this machine ({first}); "
            "set compile = false"
        ) from exc


class OnnxRuntimeLevels:
    """A backbone's feature levels computed by ONNX Runtime from its ONNX export.

    Exported at load, in memory, for ``size`` x ``size`` inputs with a free batch dimension
    (under a second for EfficientNet-Lite0). ORT uses as many threads as torch does (the
    worker sets them before loading) and sleeps instead of spinning between calls, so idle
    workers leave the cores to the busy ones.
    """

    def __init__(self, backbone: FeatureExtractor, size: int) -> None:
        ort = _import_onnxruntime()
        self.names = tuple(backbone.level_names)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            _export_onnx(backbone, size, self.names), opts, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: Tensor, names: tuple[str, ...]) -> list[Tensor]:
        """Feature maps at ``names`` (the levels exported) for a normalised CPU batch."""
        if names != self.names:
            raise ValueError(f"exported levels {self.names}, asked for {names}")
        out = self.session.run(None, {"x": x.contiguous().numpy()})
        return [torch.from_numpy(level) for level in out]


def _import_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"workers.inference.backend onnxruntime: {exc.name} is not installed "
            "(a linewatch dependency; reinstall linewatch), or set backend = \"torch\""
        ) from None
    return onnxruntime


def _export_onnx(backbone: FeatureExtractor, size: int, names: tuple[str, ...]) -> bytes:
    """``backbone`` as an ONNX model (bytes) with a dynamic batch dimension."""
    outputs = [f"level_{name}" for name in names]
    dynamic = {name: {0: "batch"} for name in ["x", *outputs]}
    with tempfile.TemporaryDirectory(prefix="linewatch-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes are for model authors
        path = Path(tmp) / "backbone.onnx"
        torch.onnx.export(
            backbone, (torch.zeros(2, 3, size, size),), path, dynamo=False,
            input_names=["x"], output_names=outputs, dynamic_axes=dynamic, opset_version=17,
        )
        return path.read_bytes()
