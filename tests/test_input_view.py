"""The residual input view: what the networks see is what differs between angles of the mouth.

A renderer, a lamp or a glass colour changes each radius column's level and the image's contrast;
the residual view takes both away inside the exported graphs, so the bundle's models answer the same
for a bottle and the same bottle lit brighter, whatever the serving backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from station.training.nets import angular_residual, make_classifier  # noqa: E402


def _mouth(gen: torch.Generator) -> torch.Tensor:
    """(1, 3, 64, 32): a profile that is the same at every angle, a little noise, and a speck."""
    profile = torch.rand(1, 3, 1, 32, generator=gen).expand(1, 3, 64, 32)
    x = profile + 0.01 * torch.randn(1, 3, 64, 32, generator=gen)
    x[:, :, 20:23, 10:13] += 0.5
    return x


def test_the_residual_keeps_the_speck_and_drops_the_light() -> None:
    gen = torch.Generator().manual_seed(0)
    x = _mouth(gen)
    r = angular_residual(x)
    # Another lamp and another glass: each channel's gain and level changed.
    gain = torch.tensor([0.4, 1.7, 2.5]).reshape(1, 3, 1, 1)
    level = torch.tensor([0.3, -0.2, 0.1]).reshape(1, 3, 1, 1)
    assert torch.allclose(angular_residual(x * gain + level), r, rtol=1e-2, atol=1e-3)
    # Another lip profile (a dome's soft lip for a ring's sharp one): the same residual, on the new contrast's scale.
    other = angular_residual(x + torch.linspace(0, 1, 32).reshape(1, 1, 1, 32))
    for c in range(3):
        assert float(torch.nn.functional.cosine_similarity(other[0, c].flatten(), r[0, c].flatten(), dim=0)) > 0.999
    # The speck stands out by far more than the noise around it; a mouth the same at every angle has none.
    assert float(r[:, :, 20:23, 10:13].mean()) > 20 * float(r[:, :, 40:, :].abs().mean())
    flat = torch.rand(1, 3, 1, 32, generator=gen).expand(1, 3, 64, 32)
    assert float(angular_residual(flat).abs().max()) < 1e-3


def test_a_residual_classifier_sees_only_the_residual() -> None:
    net = make_classifier("resnet18", 4, view="residual").eval()
    torch.nn.init.normal_(net.net.conv1.weight)  # the evidence channel starts at zero: wake it
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([_mouth(gen), torch.rand(1, 1, 64, 32, generator=gen)], dim=1)
    brighter = x.clone()
    brighter[:, :3] = x[:, :3] * 1.8 + 0.4
    with torch.no_grad():
        seen = net(x)
        assert torch.allclose(net(brighter), seen, rtol=1e-2, atol=1e-2)  # within the 1e-3 guard against std 0
        no_map = x.clone()
        no_map[:, 3:] = 0.0  # the evidence channel is not normalised away: it carries the anomaly check
        assert float((net(no_map) - seen).abs().max()) > 20 * float((net(brighter) - seen).abs().max())


def _bottle_pixels(bundle: Path, synth_root: Path) -> np.ndarray:
    """(1, 3, 512, 128) polar view in [0, 1] of a real good bottle, as the station unwraps it for the bundle."""
    import cv2

    from station.core.bundle import load_bundle, preprocess_spec
    from station.core.preprocess import preprocess

    m = load_bundle(bundle).manifest
    image = cv2.imread(str(sorted((synth_root / "train" / "good").iterdir())[0]))
    return preprocess(image, preprocess_spec(m.canonical_size, m.view, m.inputs)).autoencoder


def test_the_bundle_answers_the_same_for_a_brighter_line(bundle: Path, synth_root: Path) -> None:
    """The exported ONNX files, as the station serves them: a gain and level on every pixel change nothing."""
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["models"]["classifier"]["arch"].endswith("+residual")
    assert manifest["models"]["autoencoder"]["arch"].endswith("+residual")
    pixels = _bottle_pixels(bundle, synth_root)
    brighter = pixels * 1.3 + 0.05
    mean = np.asarray(manifest["inputs"]["classifier"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(manifest["inputs"]["classifier"]["std"], np.float32).reshape(1, 3, 1, 1)
    ae = ort.InferenceSession(str(bundle / "autoencoder.onnx"), providers=["CPUExecutionProvider"])
    cls = ort.InferenceSession(str(bundle / "classifier.onnx"), providers=["CPUExecutionProvider"])
    maps = [ae.run(None, {ae.get_inputs()[0].name: p})[0] for p in (pixels, brighter)]
    # Within what the 1e-3 that keeps the spread off zero moves.
    np.testing.assert_allclose(maps[0], maps[1], rtol=2e-2, atol=2e-2)
    probs = [cls.run(None, {cls.get_inputs()[0].name: (p - mean) / std, cls.get_inputs()[1].name: maps[0]})[0]
             for p in (pixels, brighter)]
    np.testing.assert_allclose(probs[0], probs[1], atol=5e-3)


def test_the_raw_view_stays_available_and_is_not_invariant(synth_root: Path, tmp_path: Path) -> None:
    """`--input-view raw` trains the networks as before the residual view: a brighter line changes their answer."""
    from tests.conftest import run_station

    out = tmp_path / "raw"
    proc = run_station("train", "--data", str(synth_root), "--out", str(out), "--epochs", "1", "--ae-steps", "4",
                       "--seed", "1", "--input-view", "raw", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["models"]["classifier"]["arch"] == "mobilenet_v3_small"
    assert manifest["models"]["autoencoder"]["arch"] == "polar_conv_ae3"
    mean = np.asarray(manifest["inputs"]["classifier"]["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(manifest["inputs"]["classifier"]["std"], np.float32).reshape(1, 3, 1, 1)
    cls = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    pixels = _bottle_pixels(out, synth_root)
    evidence = np.zeros((1, 1, 256, 64), np.float32)
    probs = [cls.run(None, {cls.get_inputs()[0].name: (p - mean) / std, cls.get_inputs()[1].name: evidence})[0]
             for p in (pixels, pixels * 1.3 + 0.05)]
    assert np.abs(probs[0] - probs[1]).max() > 1e-3
