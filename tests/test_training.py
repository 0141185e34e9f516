"""Training: backbones, pretrained weights, imbalance options, determinism, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_station

torch = pytest.importorskip("torch")

from station.training.classifier import train_classifier  # noqa: E402
from station.training.nets import BACKBONES, CLASSIFIER_CHANNELS, make_classifier  # noqa: E402
from station.training.options import BALANCE_MODES, TrainOptions  # noqa: E402


@pytest.mark.parametrize("arch", BACKBONES)
def test_backbones_take_image_plus_anomaly_map(arch: str) -> None:
    net = make_classifier(arch, 4).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, CLASSIFIER_CHANNELS, 512, 128))
    assert out.shape == (2, 4)


def test_pretrained_weights_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    import torchvision

    good = tmp_path / "resnet18.pth"
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), good)
    net = make_classifier("resnet18", 4, pretrained=good)
    # RGB weights of the first convolution come from the file; the anomaly channel starts at zero.
    assert torch.equal(net.conv1.weight[:, :3], reference.conv1.weight)
    assert torch.count_nonzero(net.conv1.weight[:, 3]) == 0
    assert torch.equal(net.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)

    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), wrong)
    from station.training.nets import PretrainedWeightsError

    with pytest.raises(PretrainedWeightsError, match="do not fit torchvision's resnet18"):
        make_classifier("resnet18", 4, pretrained=wrong)


def test_cli_refuses_missing_pretrained_file(synth_root: Path, tmp_path: Path) -> None:
    proc = run_station("train", "--data", str(synth_root), "--out", str(tmp_path / "m"), "--epochs", "1",
                       "--ae-steps", "2", "--pretrained", str(tmp_path / "absent.pth"))
    assert proc.returncode == 2
    assert "absent.pth" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("mode", BALANCE_MODES)
def test_balance_modes_train(mode: str, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, CLASSIFIER_CHANNELS, 64, 32, generator=gen)
    y = torch.tensor([0] * 9 + [1, 2, 3])
    opts = TrainOptions(data=tmp_path, out=tmp_path, epochs=1, batch_size=4, balance=mode)
    model, history = train_classifier(x, y, 4, opts, x[:4], y[:4])
    assert history["best_epoch"] == 1
    with torch.no_grad():
        assert model(x[:2]).shape == (2, 4)


@pytest.mark.slow
def test_training_is_deterministic_under_seed(synth_root: Path, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = run_station("train", "--data", str(synth_root), "--out", str(out), "--epochs", "1",
                           "--ae-steps", "4", "--seed", "5")
        assert proc.returncode == 0, proc.stderr
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal((1, 3, 512, 128)).astype(np.float32)
        ae = ort.InferenceSession(str(out / "autoencoder.onnx"))
        amap = ae.run(None, {"input": x})[0]
        cls = ort.InferenceSession(str(out / "classifier.onnx"))
        outputs.append((amap, cls.run(None, {"input": x, "anomaly_map": amap})[0]))
        split = json.loads((out / "split.json").read_text())
        outputs.append(split["holdout"])
    assert np.array_equal(outputs[0][0], outputs[2][0])
    assert np.array_equal(outputs[0][1], outputs[2][1])
    assert outputs[1] == outputs[3]


@pytest.mark.slow
def test_sweep_writes_a_markdown_table(synth_root: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  epochs: [1]\n  lr: [0.003, 0.0001]\n  optimizer: [adam, rmsprop]\n"
                    "fixed:\n  batch_size: 4\n")
    out = tmp_path / "sweep"
    proc = run_station("train", "--data", str(synth_root), "--out", str(out), "--ae-steps", "2", "--sweep", str(grid))
    assert proc.returncode == 0, proc.stderr
    table = (out / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert "| 1 | 4 | 0.003 | adam |" in table and "| 1 | 4 | 0.0001 | rmsprop |" in table
    assert not (out / "manifest.yaml").exists()  # a sweep compares settings; it writes no bundle


def test_sweep_file_errors_name_the_key(synth_root: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  epoch: [1]\n")
    proc = run_station("train", "--data", str(synth_root), "--out", str(tmp_path / "s"), "--sweep", str(grid))
    assert proc.returncode == 2
    assert "grid.epoch" in proc.stderr and "Traceback" not in proc.stderr
