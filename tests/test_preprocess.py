"""One preprocessing function: training and serving feed the models identical tensors."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.core.anomaly import UNSEEN_REACH_BINS, mask_unseen
from station.core.bundle import load_bundle
from station.core.preprocess import (
    Lighting,
    Mouth,
    Normalisation,
    PreprocessSpec,
    canonical_view,
    fill_unseen,
    locate_mouth,
    polar_view,
    preprocess,
    unseen_samples,
)
from station.errors import FrameError
from station.sources.folder import FolderReplaySource
from station.tools.synth import _draw_scene, render_bottle

SPEC = PreprocessSpec(900, 512, 128, 1.08, 0.15, 0.6, Normalisation((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                      Normalisation((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def bottle(seed: int = 3, defect: str | None = None) -> np.ndarray:
    return render_bottle(np.random.default_rng(seed), defect)[0]


def test_training_and_serving_tensors_are_identical(bundle: Path, synth_root: Path) -> None:
    torch = pytest.importorskip("torch")
    from station.core.folders import BOTTLE_CLASSES, labelled_pool
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
            served[str(frame.path)] = preprocess(frame.image, spec)
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


def test_polar_view_samples_the_radius_and_angle_it_is_meant_to() -> None:
    """A ring drawn at 60 % of the outer radius lands in column 0.6 × radius_bins on every row,
    and a spot at angle 90° (image y down) in row angle_bins / 4, as cv2.warpPolar lays them out."""
    mouth = Mouth(431.0, 467.0, 300.0)
    outer = mouth.radius * SPEC.radius_margin
    image = np.zeros((900, 900, 3), np.uint8)
    cv2.circle(image, (431, 467), round(0.6 * outer), (255, 255, 255), 3)
    polar = polar_view(image, mouth, SPEC)[:, :, 0].astype(np.float32)
    assert polar.shape == (SPEC.angle_bins, SPEC.radius_bins)
    peaks = polar.argmax(axis=1)
    assert np.all(np.abs(peaks - 0.6 * SPEC.radius_bins) <= 1.5)

    spot = np.zeros((900, 900, 3), np.uint8)
    cv2.circle(spot, (431, 467 + round(0.5 * outer)), 6, (255, 255, 255), -1)
    row, col = np.unravel_index(polar_view(spot, mouth, SPEC)[:, :, 0].argmax(), polar.shape)
    assert abs(row - SPEC.angle_bins / 4) <= 2 and abs(col - 0.5 * SPEC.radius_bins) <= 2


def test_polar_view_beyond_the_image_edge_is_black() -> None:
    image = np.full((900, 900, 3), 200, np.uint8)
    mouth = Mouth(150.0, 450.0, 250.0)  # the outer circle reaches past the left edge
    polar = polar_view(image, mouth, SPEC)[:, :, 0]
    left = SPEC.angle_bins // 2  # angle 180°: towards x = 0
    assert polar[left, -5:].max() == 0
    assert polar[0, : SPEC.radius_bins // 2].min() == 200  # towards the centre of the image: all inside


def test_samples_past_the_frame_edge_are_filled_from_their_radius_and_marked_unseen() -> None:
    # A backlit-like frame: bright all round, a dark ring whose outer circle reaches past the left edge.
    image = np.full((900, 900, 3), 200, np.uint8)
    cv2.circle(image, (220, 450), 200, (40, 40, 40), 40)
    mouth = Mouth(220.0, 450.0, 240.0)
    unseen = unseen_samples(image.shape, mouth, SPEC)
    assert unseen is not None and unseen.shape == (SPEC.angle_bins, SPEC.radius_bins)
    left, right = SPEC.angle_bins // 2, 0  # angle 180°: towards x = 0; angle 0°: well inside
    assert unseen[left, -5:].all() and not unseen[right].any() and not unseen[:, : SPEC.radius_bins // 2].any()
    filled = fill_unseen(polar_view(image, mouth, SPEC), unseen)
    # What reads black past the edge now shows what the same radius shows where it is seen.
    assert filled[left, -5:].min() == 200
    assert filled[unseen].min() > 0
    inputs = preprocess(image, dataclasses.replace(SPEC, lighting="back"))
    assert inputs.unseen is not None and inputs.unseen.any()
    # A mouth the frame holds whole (with room for the sampling's blend at the edge) has none.
    assert unseen_samples(image.shape, Mouth(450.0, 450.0, 240.0), SPEC) is None
    assert preprocess(bottle(), SPEC).unseen is None


def test_a_rim_the_frame_cuts_off_is_located_on_the_rest_of_its_outline() -> None:
    from station.tools.perturb import ImageDrift, apply_image
    from station.tools.synth import scene_of

    back = dataclasses.replace(SPEC, lighting="back")
    shift = 0.14  # of the frame: the backlit style's large mouths then run past the top edge
    cut = 0
    for seed in range(2, 6):
        image = render_bottle(np.random.default_rng([seed, 40]), None, style="backlit")[0]
        cx, cy, radius = scene_of(np.random.default_rng([seed, 40]), "backlit")
        cy -= shift * image.shape[0]
        moved = apply_image(image, ImageDrift(0.0, -shift, 1.0, 1.0, 1.0), None, "moved")
        cut += cy - radius < 10
        mouth = locate_mouth(moved, back)
        # The enclosing circle of what is left was 4-5 px off in centre and radius on these bottles.
        assert abs(mouth.cx - cx) <= 2 and abs(mouth.cy - cy) <= 2 and abs(mouth.radius - radius) <= 2, (seed, mouth)
    assert cut >= 3  # most of these rims do leave the frame


def test_the_anomaly_map_never_scores_what_the_camera_did_not_see() -> None:
    unseen = np.zeros((SPEC.angle_bins, SPEC.radius_bins), bool)
    unseen[250:262, 120:] = True  # a patch past the frame's edge, in polar samples
    smoothed = np.full((256, 64), 5.0, np.float32)  # a map at half the view's resolution
    masked = mask_unseen(smoothed, unseen)
    assert (masked[125:131, 60:] == 0).all()  # the bins over the patch
    assert (masked[125 - UNSEEN_REACH_BINS:131 + UNSEEN_REACH_BINS, 60 - UNSEEN_REACH_BINS:] == 0).all()
    assert masked[:100].min() == 5.0 and masked[:, :50].min() == 5.0  # the rest is scored as it was
    # Angles wrap: a patch at angle 0 reaches the last rows too.
    wrap = np.zeros_like(unseen)
    wrap[:2, 100:] = True
    assert (mask_unseen(smoothed, wrap)[-UNSEEN_REACH_BINS:, 60] == 0).all()
    assert mask_unseen(smoothed, None) is smoothed


def test_a_bundle_is_served_with_the_sampling_it_was_trained_with(bundle: Path) -> None:
    import dataclasses

    from station.core.bundle import ViewManifest, preprocess_spec

    manifest = load_bundle(bundle).manifest
    assert manifest.view.interpolation == "area-block"  # what station train writes now
    assert manifest.view.lighting == "front"  # ring-lit data under station train's default --lighting auto
    assert manifest.preprocess_spec().sampling == "area-block"
    # A manifest from before the field had a second value says "area" (or nothing): served as trained.
    older = ViewManifest(angle_bins=512, radius_bins=128, radius_margin=1.08)
    assert preprocess_spec(900, older, manifest.inputs).sampling == "area"

    image = bottle(4, "contamination")
    legacy = dataclasses.replace(SPEC, sampling="area")
    mouth = locate_mouth(image, SPEC)
    old_mouth = locate_mouth(image, legacy)
    assert abs(mouth.cx - old_mouth.cx) < 1.5 and abs(mouth.radius - old_mouth.radius) < 1.5
    new, old = (polar_view(image, m, s).astype(np.float32) for m, s in ((mouth, SPEC), (old_mouth, legacy)))
    # The same picture, sampled differently: close, but not the same pixels.
    assert 0.1 < np.abs(new - old).mean() < 4.0


# -- lighting ---------------------------------------------------------------------------------------

OWN_LIGHTING: dict[str, Lighting] = {"ring": "front", "dome": "front", "backlit": "back"}


@pytest.mark.parametrize("style", ["ring", "dome", "backlit"])
def test_every_style_is_located_where_it_was_drawn_under_its_lighting_and_auto(style: str) -> None:
    import dataclasses

    from station.tools.synth import render_novel, scene_of

    for seed in range(3):
        for defect in (None, "broken_large", "broken_small", "contamination", "crack"):
            rng = np.random.default_rng([seed, 40])
            image = (render_novel(rng, defect, style=style)[0] if defect == "crack"
                     else render_bottle(rng, defect, style=style)[0])
            cx, cy, radius = scene_of(np.random.default_rng([seed, 40]), style)
            lightings: tuple[Lighting, ...] = (OWN_LIGHTING[style], "auto")
            for lighting in lightings:
                mouth = locate_mouth(image, dataclasses.replace(SPEC, lighting=lighting))
                assert mouth.lighting == OWN_LIGHTING[style], (style, defect, seed)
                assert abs(mouth.cx - cx) < 6 and abs(mouth.cy - cy) < 6, (style, defect, seed, mouth)
                assert abs(mouth.radius - radius) < 8, (style, defect, seed, mouth)


def test_auto_lighting_finds_what_front_finds_on_a_front_lit_frame() -> None:
    import dataclasses

    for seed in range(4):
        image = bottle(seed, "broken_large")
        assert locate_mouth(image, dataclasses.replace(SPEC, lighting="auto")) == locate_mouth(image, SPEC)


def test_a_backlit_frame_under_front_lighting_says_why_it_has_no_mouth() -> None:
    import dataclasses

    image = render_bottle(np.random.default_rng(2), None, style="backlit")[0]
    with pytest.raises(FrameError) as front:
        preprocess(image, SPEC)
    assert front.value.reason == "no_bottle_found"
    assert "backlit" in front.value.detail and "view.lighting is front" in front.value.detail
    ring = bottle(2)
    with pytest.raises(FrameError) as back:
        preprocess(ring, dataclasses.replace(SPEC, lighting="back"))
    assert "front-lit" in back.value.detail and "view.lighting is back" in back.value.detail
    # Neither lighting finds a mouth in a uniform frame: auto says what each found.
    with pytest.raises(FrameError) as neither:
        preprocess(np.full((900, 900, 3), 40, np.uint8), dataclasses.replace(SPEC, lighting="auto"))
    assert neither.value.reason == "no_bottle_found" and "either lighting" in neither.value.detail


def test_a_manifest_without_lighting_is_front_lit() -> None:
    from station.core.bundle import InputManifest, ViewManifest, preprocess_spec

    inputs = {role: InputManifest(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) for role in ("classifier", "autoencoder")}
    older = ViewManifest(angle_bins=512, radius_bins=128, radius_margin=1.08)
    assert older.lighting == "front" and preprocess_spec(900, older, inputs).lighting == "front"
    backlit = ViewManifest.model_validate({"angle_bins": 512, "radius_bins": 128, "radius_margin": 1.08,
                                           "lighting": "back"})
    assert preprocess_spec(900, backlit, inputs).lighting == "back"
    with pytest.raises(ValueError, match="lighting"):
        ViewManifest.model_validate({"angle_bins": 512, "radius_bins": 128, "radius_margin": 1.08,
                                     "lighting": "sideways"})


def test_agreed_lighting() -> None:
    from station.core.preprocess import agreed_lighting

    assert agreed_lighting(["back", "back"]) == "back"
    assert agreed_lighting(["front", "back", "front"]) == "auto"
    assert agreed_lighting([]) == "auto"


def test_the_training_path_names_the_file_without_a_mouth(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from station.errors import DatasetError
    from station.training.data import load_inputs

    path = tmp_path / "backlit.png"
    cv2.imwrite(str(path), render_bottle(np.random.default_rng(2), None, style="backlit")[0])
    with pytest.raises(DatasetError) as err:
        load_inputs(path, SPEC)
    assert str(path) in str(err.value) and "view.lighting is front" in str(err.value)
