"""One preprocessing function: training and serving feed the models identical tensors."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.bundle import load_bundle
from station.errors import FrameError
from station.preprocess import InputSpec, PreprocessSpec, preprocess
from station.sources.folder import FolderReplaySource

SPEC = PreprocessSpec(900, InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                      InputSpec(256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def test_training_and_serving_tensors_are_identical(bundle: Path, synth_root: Path) -> None:
    torch = pytest.importorskip("torch")
    from station.mvtec import BOTTLE_CLASSES, labelled_pool
    from station.training.data import tensors

    spec = load_bundle(bundle).manifest.preprocess_spec()
    items = labelled_pool(synth_root)[:6]
    x_cls, x_ae, _ = tensors(items, spec, BOTTLE_CLASSES)

    # The serving path: the replay source decodes, the pipeline's preprocess makes tensors.
    served = {}
    for root in {i.path.parent for i in items}:
        for frame in FolderReplaySource(root, BOTTLE_CLASSES).frames(threading.Event()):
            assert frame.image is not None
            served[frame.meta["path"]] = preprocess(frame.image, spec)
    for n, item in enumerate(items):
        inputs = served[str(item.path)]
        assert torch.equal(torch.from_numpy(inputs.classifier[0]), x_cls[n])
        assert torch.equal(torch.from_numpy(inputs.autoencoder[0]), x_ae[n])


def test_shapes_normalisation_and_rgb_order() -> None:
    image = np.zeros((900, 900, 3), np.uint8)
    image[:, :, 2] = 255  # pure red in BGR
    inputs = preprocess(image, SPEC)
    assert inputs.classifier.shape == (1, 3, 224, 224) and inputs.classifier.dtype == np.float32
    assert inputs.autoencoder.shape == (1, 3, 256, 256)
    # Channel 0 is red after BGR→RGB: (1 − 0.485) / 0.229
    assert inputs.classifier[0, 0].mean() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert inputs.autoencoder[0, 0].mean() == pytest.approx(1.0)
    assert inputs.autoencoder[0, 2].mean() == pytest.approx(0.0)


def test_conversion_rules_gray_16bit_bgra_nonsquare() -> None:
    gray = np.full((900, 900), 128, np.uint8)
    bgr = np.full((900, 900, 3), 128, np.uint8)
    ref = preprocess(bgr, SPEC)
    assert np.array_equal(preprocess(gray, SPEC).classifier, ref.classifier)
    assert np.array_equal(preprocess((gray.astype(np.uint16) << 8), SPEC).classifier, ref.classifier)
    assert np.array_equal(preprocess(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), SPEC).classifier, ref.classifier)
    wide = np.zeros((900, 1200, 3), np.uint8)
    wide[:, 150:1050] = 128  # the centre square is the bottle view
    out = preprocess(wide, SPEC)
    assert out.roi == (150, 0, 900)
    assert np.array_equal(out.classifier, ref.classifier)


def test_refuses_tiny_and_float_images() -> None:
    with pytest.raises(FrameError) as tiny:
        preprocess(np.zeros((20, 20, 3), np.uint8), SPEC)
    assert tiny.value.reason == "image_too_small"
    with pytest.raises(FrameError) as flt:
        preprocess(np.zeros((900, 900, 3), np.float32), SPEC)
    assert flt.value.reason == "unsupported_image"
