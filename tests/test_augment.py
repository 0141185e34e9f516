"""The mouth-jitter augmentation moves a polar view as unwrapping around a jittered circle would."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from station.core.bundle import preprocess_spec
from station.core.preprocess import canonical_view, locate_mouth, polar_view
from station.tools.synth import render_bottle
from station.training.augment import augment_batch as _augment
from station.training.augment import mouth_jitter, reunwrap
from station.training.options import RADIUS_MARGIN


def _spec():  # type: ignore[no-untyped-def]
    from station.core.bundle import InputManifest, ViewManifest

    view = ViewManifest(angle_bins=512, radius_bins=128, radius_margin=RADIUS_MARGIN, interpolation="area-block")
    norm = InputManifest(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return preprocess_spec(900, view, {"classifier": norm, "autoencoder": norm})


def _as_tensor(polar: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(polar.astype(np.float32)).permute(2, 0, 1)[None]


@pytest.mark.parametrize(("d", "phi", "s"), [(0.03, 0.7, 1.0), (0.0, 0.0, 0.97), (0.025, 4.0, 1.03)])
def test_reunwrap_matches_unwrapping_around_the_moved_circle(d: float, phi: float, s: float) -> None:
    image, _ = render_bottle(np.random.default_rng(5), None)
    spec = _spec()
    view, _ = canonical_view(image, spec.canonical_size)
    mouth = locate_mouth(view, spec)
    moved = dataclasses.replace(mouth, cx=mouth.cx + d * mouth.radius * math.cos(phi),
                                cy=mouth.cy + d * mouth.radius * math.sin(phi), radius=mouth.radius * s)
    expected = _as_tensor(polar_view(view, moved, spec))
    original = _as_tensor(polar_view(view, mouth, spec))
    got = reunwrap(original, torch.tensor([d]), torch.tensor([phi]), torch.tensor([s]), RADIUS_MARGIN)
    # Both resample the same picture (in grey levels 0-255): the warp is right when it sits far
    # closer to the moved unwrap than the unmoved view does, and within resampling noise of it.
    err = (got - expected).abs().mean().item()
    moved_by = (original - expected).abs().mean().item()
    assert err < 2.5
    if d or s != 1.0:
        assert err < 0.35 * moved_by


def test_no_jitter_is_the_identity_and_jitter_is_seeded() -> None:
    x = torch.rand(3, 4, 64, 32)
    same = reunwrap(x, torch.zeros(3), torch.zeros(3), torch.ones(3), RADIUS_MARGIN)
    # Column 0 is the centre, one point for every angle (as in a real view): it reads angle 0's.
    assert torch.allclose(same[..., 1:], x[..., 1:], atol=1e-5)
    a = mouth_jitter(x, torch.Generator().manual_seed(1), RADIUS_MARGIN)
    b = mouth_jitter(x, torch.Generator().manual_seed(1), RADIUS_MARGIN)
    c = mouth_jitter(x, torch.Generator().manual_seed(2), RADIUS_MARGIN)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape


def test_the_classifiers_augmentation_jitters_every_channel_alike() -> None:
    # The anomaly evidence channel must move with the image: a speck's map stays on the speck.
    x = torch.zeros(1, 4, 64, 32)
    x[0, :, 10:14, 12:16] = 1.0
    out = _augment(x, torch.Generator().manual_seed(3), photometric=True)
    evidence = out[0, 3]
    image = out[0, 0]
    assert evidence.max() > 0.5
    assert torch.equal((evidence > 0.5).nonzero(), (image - image.median()).abs().gt(0.5).nonzero())
