"""One preprocessing function: training and serving feed the models identical tensors."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.bundle import load_bundle
from station.errors import FrameError
from station.preprocess import (
    Normalisation,
    PreprocessSpec,
    canonical_view,
    locate_mouth,
    polar_view,
    preprocess,
)
from station.sources.folder import FolderReplaySource
from station.synth import _draw_scene, render_bottle

SPEC = PreprocessSpec(900, 512, 128, 1.08, 0.15, 0.6, Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                      Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def bottle(seed: int = 3, defect: str | None = None) -> np.ndarray:
    return render_bottle(np.random.default_rng(seed), defect)[0]


def test_training_and_serving_tensors_are_identical(bundle: Path, synth_root: Path) -> None:
    torch = pytest.importorskip("torch")
    from station.mvtec import BOTTLE_CLASSES, labelled_pool
    from station.training.data import tensors

    spec = load_bundle(bundle).manifest.preprocess_spec()
    items = labelled_pool(synth_root)[:6]
    x_cls, x_ae, _ = tensors(items, spec, BOTTLE_CLASSES)

    # The serving path: the replay source lists, the worker decodes (Frame.load, as Pipeline.process
    # does), the pipeline's preprocess makes tensors.
    served = {}
    for root in {i.path.parent for i in items}:
        for frame in FolderReplaySource(root, BOTTLE_CLASSES).frames(threading.Event()):
            assert frame.image is None, "replay defers decoding to the inspection workers"
            frame.load()
            assert frame.image is not None
            served[frame.meta["path"]] = preprocess(frame.image, spec)
    for n, item in enumerate(items):
        inputs = served[str(item.path)]
        assert torch.equal(torch.from_numpy(inputs.classifier[0]), x_cls[n])
        assert torch.equal(torch.from_numpy(inputs.autoencoder[0]), x_ae[n])


def test_shapes_normalisation_and_rgb_order() -> None:
    image = bottle()
    inputs = preprocess(image, SPEC)
    assert inputs.classifier.shape == (1, 3, 512, 128) and inputs.classifier.dtype == np.float32
    assert inputs.autoencoder.shape == (1, 3, 512, 128)
    # Both come from the same polar view, with each model's normalisation; channel 0 is red.
    red = inputs.autoencoder[0, 0]
    assert np.allclose(inputs.classifier[0, 0], (red - 0.485) / 0.229, atol=1e-5)
    view, _ = canonical_view(image, 900)
    polar = polar_view(view, inputs.mouth, SPEC)
    assert np.allclose(red, polar[:, :, 2] / 255.0, atol=1e-6)


def test_mouth_is_located_where_it_was_drawn() -> None:
    for seed in range(5):
        for defect in (None, "broken_large"):
            rng = np.random.default_rng(seed)
            image, _ = render_bottle(rng, defect)
            truth = _draw_scene(np.random.default_rng(seed), 900)
            mouth = locate_mouth(image, SPEC)
            assert abs(mouth.cx - truth.cx) < 6 and abs(mouth.cy - truth.cy) < 6
            assert abs(mouth.radius - truth.radius) < 8


def test_rotation_becomes_a_circular_shift_of_rows() -> None:
    image = bottle(5, "broken_small")
    mouth = preprocess(image, SPEC).mouth
    rot = cv2.warpAffine(image, cv2.getRotationMatrix2D((mouth.cx, mouth.cy), -90, 1.0), (900, 900))
    a = polar_view(image, mouth, SPEC).astype(np.float32)
    b = polar_view(rot, mouth, SPEC).astype(np.float32)
    # A quarter turn is a shift by a quarter of the angle bins.
    shifted = np.roll(a, SPEC.angle_bins // 4, axis=0)
    assert np.abs(shifted - b)[:, :100].mean() < 4.0
    assert np.abs(a - b)[:, :100].mean() > 2 * np.abs(shifted - b)[:, :100].mean()


def test_conversion_rules_gray_16bit_bgra_nonsquare() -> None:
    bgr = cv2.cvtColor(cv2.cvtColor(bottle(), cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    gray = bgr[:, :, 0].copy()
    ref = preprocess(bgr, SPEC)
    assert np.array_equal(preprocess(gray, SPEC).classifier, ref.classifier)
    assert np.array_equal(preprocess(gray.astype(np.uint16) << 8, SPEC).classifier, ref.classifier)
    assert np.array_equal(preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), SPEC).classifier, ref.classifier)
    wide = np.zeros((900, 1200, 3), np.uint8)
    wide[:, 150:1050] = bgr  # the centre square is the bottle view
    out = preprocess(wide, SPEC)
    assert out.roi == (150, 0, 900)
    assert np.array_equal(out.classifier, ref.classifier)


def test_refuses_tiny_float_and_empty_images() -> None:
    with pytest.raises(FrameError) as tiny:
        preprocess(np.zeros((20, 20, 3), np.uint8), SPEC)
    assert tiny.value.reason == "image_too_small"
    with pytest.raises(FrameError) as flt:
        preprocess(np.zeros((900, 900, 3), np.float32), SPEC)
    assert flt.value.reason == "unsupported_image"
    with pytest.raises(FrameError) as empty:
        preprocess(np.full((900, 900, 3), 40, np.uint8), SPEC)
    assert empty.value.reason == "no_bottle_found"
