"""The one pre-processing path: layouts, batch independence, illumination, augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from linewatch.errors import DataError
from linewatch.model.backbone import get_backbone_spec
from linewatch.model.preprocess import (
    AugmentConfig,
    PreprocessConfig,
    augment,
    content_box,
    preprocess_batch,
)

torch.set_num_threads(1)

SIZE = 64
CFG = PreprocessConfig(size=SIZE)


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A fixed, smooth-ish random texture in [0.3, 0.7] (float32)."""
    noise = np.random.default_rng(seed).random((h, w), dtype=np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (0.3 + 0.4 * smooth).astype(np.float32)


@pytest.mark.parametrize(
    "image",
    [
        np.full((50, 70), 255, np.uint8),
        np.full((50, 70, 1), 65535, np.uint16),
        np.full((37, 53, 3), 255, np.uint8),
        np.full((301, 199, 3), 65535, np.uint16),
        np.full((20, 30, 3), 1.0, np.float32),
    ],
    ids=["gray_u8", "gray1_u16", "rgb_u8_odd", "rgb_u16_big", "rgb_f32"],
)
def test_any_supported_image_becomes_a_normalised_three_channel_tensor(image: np.ndarray) -> None:
    x = preprocess_batch([image], CFG)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
    # White is 1.0 on the [0, 1] scale whatever the bit depth; (1 - 0.5) / 0.5 = 1.
    torch.testing.assert_close(x, torch.ones_like(x))


def test_bit_depths_and_gray_layouts_agree() -> None:
    gray8 = (_texture(40, 60) * 255).round().astype(np.uint8)
    gray16 = gray8.astype(np.uint16) * 257  # the same intensities on 16 bits
    rgb8 = np.repeat(gray8[:, :, None], 3, axis=2)
    a, b, c, d = preprocess_batch([gray8, gray16, rgb8, gray8[:, :, None]], CFG)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert torch.equal(a, d)
    assert not torch.equal(a[:, :32], a[:, 32:])  # the texture survived


@pytest.mark.parametrize("illumination", ["none", "lcn", "homomorphic"])
def test_an_image_gives_the_same_tensor_in_any_batch(illumination: str) -> None:
    cfg = PreprocessConfig.model_validate({"size": (48, 80), "illumination": illumination})
    rng = np.random.default_rng(1)
    images: list[np.ndarray] = [
        rng.integers(0, 256, (90, 120, 3), dtype=np.uint8),
        rng.integers(0, 65536, (45, 33), dtype=np.uint16),
        rng.integers(0, 256, (200, 100), dtype=np.uint8),
    ]
    together = preprocess_batch(images, cfg)
    for i, image in enumerate(images):
        assert torch.equal(together[i], preprocess_batch([image], cfg)[0])
        assert torch.equal(together[i], preprocess_batch(images[::-1], cfg)[2 - i])


def test_letterbox_keeps_the_aspect_and_pads_with_zero_after_normalisation() -> None:
    cfg = PreprocessConfig(size=64, keep_aspect=True)
    image = np.full((100, 200, 3), 255, np.uint8)
    assert content_box((100, 200), cfg) == (16, 0, 32, 64)
    x = preprocess_batch([image], cfg)[0]
    torch.testing.assert_close(x[:, 16:48], torch.ones(3, 32, 64))
    assert torch.equal(x[:, :16], torch.zeros(3, 16, 64))
    assert torch.equal(x[:, 48:], torch.zeros(3, 16, 64))
    assert content_box((100, 200), CFG) == (0, 0, SIZE, SIZE)


def test_downscaling_averages_instead_of_aliasing() -> None:
    """INTER_AREA: a one-pixel checkerboard shrunk 4x becomes flat mid-gray."""
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    x = preprocess_batch([board], CFG)
    torch.testing.assert_close(x, torch.full_like(x, 0.0), rtol=0, atol=0.01)


def test_channels_last_output_on_request() -> None:
    x = preprocess_batch([np.zeros((10, 10), np.uint8)] * 2, CFG, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert preprocess_batch([np.zeros((10, 10), np.uint8)], CFG).is_contiguous()


def test_empty_batch_has_the_output_shape() -> None:
    assert preprocess_batch([], CFG).shape == (0, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "bad,reason",
    [
        (np.zeros((10, 10, 4), np.uint8), "shape"),
        (np.zeros((10, 10), np.int32), "dtype int32"),
        (np.zeros((0, 10), np.uint8), "empty"),
        (np.zeros((2, 10, 10), np.uint8), "shape"),
    ],
)
def test_unusable_images_are_refused_naming_their_index(bad: np.ndarray, reason: str) -> None:
    with pytest.raises(DataError, match=f"image 1 of the batch: .*{reason}"):
        preprocess_batch([np.zeros((10, 10), np.uint8), bad], CFG)


def test_config_follows_the_backbone_and_rejects_nonsense() -> None:
    spec = get_backbone_spec("efficientnet_lite0")
    cfg = PreprocessConfig.for_backbone("efficientnet_lite0", size=(96, 128))
    assert (cfg.mean, cfg.std, cfg.hw) == (spec.mean, spec.std, (96, 128))
    assert PreprocessConfig().mean == spec.mean
    for bad in ({"lcn_window": 30}, {"size": 4}, {"std": (0.5, 0.0, 0.5)}, {"illumination": "x"}):
        with pytest.raises(ValidationError):
            PreprocessConfig.model_validate(bad)


def _lit_by_a_gradient(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A texture, and the same texture lit from 30 % on the left to 100 % on the right."""
    texture = _texture(size, size, seed=3)
    light = np.linspace(0.3, 1.0, size, dtype=np.float32)[None, :]
    as_u8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
    return as_u8(texture), as_u8(texture * light)


def _illumination_effects(x: torch.Tensor) -> tuple[float, float]:
    """(brightness change left to right relative to the mean, texture contrast left/right).

    Contrast is the std of the texture once each column's mean is removed, in the left third
    over the right third. Both are measured inside a margin so border handling does not count.
    """
    img = x[0, 0].numpy()[16:-16, 16:-16]
    columns = img.mean(axis=0) * 0.5 + 0.5  # back to the [0, 1] scale
    slope = np.polyfit(np.arange(columns.size), columns, 1)[0]
    texture = img - img.mean(axis=0)
    third = img.shape[1] // 3
    contrast = texture[:, :third].std() / texture[:, -third:].std()
    return float(abs(slope) * columns.size / columns.mean()), float(contrast)


@pytest.mark.parametrize(
    "settings,contrast_gap",
    [
        # LCN's local std also sees the light ramp inside its window, so it evens the texture
        # contrast only partly; homomorphic filtering divides the light out.
        ({"illumination": "lcn", "lcn_window": 15}, 0.25),
        ({"illumination": "homomorphic", "homomorphic_sigma": 8}, 0.05),
    ],
    ids=["lcn", "homomorphic"],
)
def test_illumination_normalisation_removes_a_linear_light_gradient(
    settings: dict[str, object], contrast_gap: float
) -> None:
    flat, lit = _lit_by_a_gradient()
    plain = PreprocessConfig(size=128)
    fixed = PreprocessConfig.model_validate({"size": 128, **settings})

    brightness_raw, contrast_raw = _illumination_effects(preprocess_batch([lit], plain))
    brightness, contrast = _illumination_effects(preprocess_batch([lit], fixed))
    _, contrast_even = _illumination_effects(preprocess_batch([flat], fixed))

    # Measured: brightness 0.76 -> 0.013 (lcn) / 0.011 (homomorphic); texture contrast
    # 0.58 -> 0.76 (lcn) / 0.97 (homomorphic), against 0.98 in even light.
    assert brightness_raw > 0.7 and contrast_raw < 0.65
    assert brightness < 0.05 * brightness_raw
    assert abs(contrast - contrast_even) < contrast_gap


def test_augment_is_reproducible_from_the_seed_and_keeps_layouts() -> None:
    images: list[np.ndarray] = [
        (_texture(40, 50) * 255).astype(np.uint8),
        np.zeros((30, 20, 1), np.uint16),
        np.zeros((25, 35, 3), np.uint8),
    ]
    cfg = AugmentConfig(hflip=True, vflip=True)
    a = augment(images, np.random.default_rng(7), cfg)
    b = augment(images, np.random.default_rng(7), cfg)
    c = augment(images, np.random.default_rng(8), cfg)
    assert [x.shape for x in a] == [im.shape for im in images]
    assert all(x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_augment_with_zero_strength_is_the_identity() -> None:
    image = (_texture(40, 50) * 255).astype(np.uint8)
    none = AugmentConfig(rotation_deg=0, scale=0, shear_deg=0, translate=0, noise_sigma=0)
    (out,) = augment([image], np.random.default_rng(0), none)
    np.testing.assert_allclose(out, image / 255.0, atol=1e-6)


def test_augment_warps_without_black_corners_and_adds_the_set_noise() -> None:
    flat = np.full((64, 64), 128, np.uint8)
    strong = AugmentConfig(rotation_deg=30, scale=0.2, shear_deg=10, translate=0.1, noise_sigma=0)
    (warped,) = augment([flat], np.random.default_rng(0), strong)
    np.testing.assert_allclose(warped, 128 / 255, atol=1e-6)  # reflected borders, no black

    noisy = AugmentConfig(rotation_deg=0, scale=0, shear_deg=0, translate=0, noise_sigma=0.02)
    (out,) = augment([flat], np.random.default_rng(0), noisy)
    assert abs(float((out - 128 / 255).std()) - 0.02) < 0.002

    texture = (_texture(64, 64) * 255).astype(np.uint8)
    (moved,) = augment([texture], np.random.default_rng(0), strong)
    assert np.abs(moved - texture / 255.0).mean() > 0.01  # the warp really moved pixels
