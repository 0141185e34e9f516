"""The map classifier: the bottle's class from what the anomaly map shows of its defect.

A network taught from scratch on 16 images a class learns the renderer: on the project's dome-lit
line it named 75 % of bottles right, against 99 % on the ring-lit line it was tuned on. What tells
the classes apart is the same on every line: how large the anomalous region is, how far it reaches
round the mouth and across it, where it sits between the opening and the rim, how many pieces it is
in and how strongly it stands out. These are a few numbers measured on the autoencoder's map,
which is already in units of good bottles' error; a multinomial logistic regression on them needs
few images and, measured on the same dome line, names 92.5 % right (docs/models.md).

Every feature is measured in units of a threshold of the training's good scores (recorded with the
fitted weights: the 95 % tolerance bound of station/tools/calibrate.py, whichever threshold the
decision uses), so the features do not depend on the scale of one autoencoder's map. A later
`station calibrate` moves the threshold the decision uses, not these units: measured on bundles
judged on a renderer style they never saw, recalibrating the units too cost 2.5–15 points of
accuracy (docs/models.md).

`map-v2` adds what the map's shape and the view's colours say of the same region: how compact and how
elongated it is (a speck is round, a fibre long, a chip a wedge), and whether its pixels look like
another part of the mouth's radial profile. A chip replaces glass with what lies behind it (the
background, or the bottle's inside), a colour found elsewhere along the radius; contamination is a
colour found nowhere on a good mouth. On the project's three styles, each trained on 16 images a class
and judged on the rest (30 random splits), it names 95.1 % right against map-v1's 93.4 %.

`map-v3` adds whether the region breaks the lip's edges. Glass missing is missing from an edge: a chip bites
in from the rim's outer edge (or out from the inner one), so at its angles the view departs from the mouth's
profile right at that edge. Matter lying on the lip or in the opening leaves both edges as they are at every
other angle, however dark it is; map-v2's colour test cannot tell a dark blob from the dark belt seen through
a gap. Six numbers, about 1.5 ms a frame (docs/models.md has the figures).
"""

from __future__ import annotations

import cv2
import numpy as np

from station.core.preprocess import RADIUS_MARGIN

#: the feature list training fits; a bundle records the one it was fitted on and is served with it
FEATURE_SET = "map-v3"
#: every feature list this station computes, and how many numbers each gives
FEATURE_COUNTS = {"map-v1": 28, "map-v2": 34, "map-v3": 40}
#: a view pixel departs from the mouth's radial profile when its distance to it is this many times the typical
#: distance at its radius, and the lip's edge is touched when such a pixel lies this many bins from it
LIP_DEPARTURE = 3.0
LIP_EDGE_BINS = 3
PROFILE_STRIDE = 4
#: regions are where the map reaches these fractions of its own maximum, and these fractions of the threshold
RELATIVE_LEVELS = (0.5, 0.25)
THRESHOLD_LEVELS = (0.5, 1.0)
RADIAL_BANDS = 8


def _region_shape(m: np.ndarray, weights: np.ndarray, radius: np.ndarray) -> list[float]:
    """Size, angular and radial extent, radial centre, innermost and outermost radius, pieces."""
    rows, cols = m.any(axis=1), m.any(axis=0)
    if not cols.any():
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    total = float(weights.sum()) + 1e-6
    pieces, _ = cv2.connectedComponents(m.astype(np.uint8))
    return [float(np.log1p(m.sum())), float(rows.mean()), float(cols.mean()),
            float((weights.sum(axis=0) * radius).sum() / total), float(radius[cols].min()),
            float(radius[cols].max()), float(np.log1p(pieces - 1))]


def _region_form(s: np.ndarray, m: np.ndarray) -> list[float]:
    """How much of its bounding extent the region fills, and how elongated it is (log eigenvalue ratio)."""
    angles, _ = s.shape
    a, r = np.nonzero(m)
    if len(a) < 3:
        return [0.0, 0.0]
    fill = np.log1p(len(a)) - np.log1p(m.any(axis=1).sum()) - np.log1p(m.any(axis=0).sum())
    weights = s[a, r]
    # Angles wrap: measure them from the region's peak, and as arc length at each bin's radius.
    peak_row = a[np.argmax(weights)]
    da = (a - peak_row + angles // 2) % angles - angles // 2
    arc = da * 2 * np.pi * (r + 0.5) / angles
    cov = np.cov(np.stack([arc, r.astype(np.float64)]), aweights=weights) + 1e-3 * np.eye(2)
    small, large = np.linalg.eigvalsh(cov)
    return [float(fill), float(np.log(large / small))]


def _region_against_profile(s: np.ndarray, m: np.ndarray, view: np.ndarray) -> list[float]:
    """Whether the region's pixels look like another radius of this mouth's profile, and which.

    ``view`` is the polar image the autoencoder was given, (3, angles', radii') at any resolution.
    Returns the weighted mean of (distance to the closest profile colour / distance to the profile
    colour at its own radius), the log of the latter in units of the view's spread, and the signed and
    absolute radial shift to the closest profile colour, as a fraction of the radius.
    """
    angles, radii = s.shape
    a, r = np.nonzero(m)
    if len(a) == 0:
        return [1.0, 0.0, 0.0, 0.0]
    # Channel by channel: each is contiguous, and a transposed copy of the view cost more than the resize.
    bins = np.stack([cv2.resize(np.asarray(c, np.float32), (radii, angles), interpolation=cv2.INTER_AREA)
                     for c in view], axis=-1)
    profile = bins.mean(axis=0)  # (radii, channels): a good mouth is the same at every angle
    spread = float(np.abs(bins - profile[None]).mean()) + 1e-3
    distance = np.linalg.norm(bins[a, r][:, None, :] - profile[None], axis=2)  # (pixels, radii)
    rows = np.arange(len(r))
    own = distance[rows, r]
    closest = distance.argmin(axis=1)
    weights = s[a, r] / s[a, r].sum()
    return [float((weights * distance[rows, closest] / (own + 1e-3)).sum()),
            float(np.log((weights * own).sum() / spread + 1e-3)),
            float((weights * (closest - r)).sum() / radii), float((weights * np.abs(closest - r)).sum() / radii)]


def _lip_edges(profile: np.ndarray, radius_margin: float) -> tuple[int, int]:
    """The lip's inner and outer edge, as radius bins of a (channels, radii) profile.

    The outer edge is the located rim, where the view's reach puts it; the inner edge is the strongest step of
    the profile's brightness between a quarter of the radius and the rim: from the lip to the opening, dark to
    bright or bright to dark, whatever the lighting.
    """
    radii = profile.shape[1]
    outer = min(round(radii / radius_margin), radii - 1)
    low = radii // 4
    step = np.abs(np.diff(profile.mean(axis=0)))[low:max(outer - LIP_EDGE_BINS, low + 1)]
    return low + int(np.argmax(step)) + 1, outer


def _region_against_lip(s: np.ndarray, m: np.ndarray, view: np.ndarray, radius_margin: float) -> list[float]:
    """Whether the region breaks the lip's edges, as glass missing does and matter lying on it does not.

    A chip takes glass away from the rim's outer edge inward (or from the inner edge outward), so along each
    angle it covers, the view departs from the mouth's profile right at that edge; a speck, a fibre or a blob
    on the lip or in the opening leaves both edges where they are at every other angle. Measured on the view
    at its own resolution, at the angles the map's region covers (weighted by the map there). Returns how far
    in from the inner edge the region starts and how far short of the outer edge it ends (in lip widths), the
    weighted share of its angles whose view departs at the outer edge, at the inner edge and at either (a
    linear fit cannot make "either" of the two), and the share of the lip's width that departs along them.
    """
    if not m.any():
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    angles, radii = s.shape
    v = np.asarray(view, np.float32)
    view_angles, view_radii = v.shape[1:]
    # The profile and the typical departure from it, from every PROFILE_STRIDE-th angle: a median over a
    # quarter of the angles is as steady and costs a quarter of the time on the station's CPU.
    sample = v[:, ::PROFILE_STRIDE]
    profile = np.median(sample, axis=1)  # (channels, radii): a good mouth is the same at every angle
    inner, outer = _lip_edges(profile, radius_margin)
    width = max(outer - inner, 1)
    cols = np.nonzero(m.any(axis=0))[0]
    starts = (cols.min() * view_radii / radii - inner) / width
    stops_short = (outer - (cols.max() + 1) * view_radii / radii) / width
    sampled = np.linalg.norm(sample - profile[:, None, :], axis=0)  # (angles / stride, radii)
    typical = np.median(sampled, axis=0) + max(float(np.median(sampled)), 1e-3)
    # the view's angles under the region's map rows, each weighted by the map's mass on its row
    map_row = np.arange(view_angles) * angles // view_angles
    under: np.ndarray = np.asarray(m.any(axis=1))[map_row]
    weights = s.sum(axis=1)[map_row][under]
    weights = weights / (weights.sum() + 1e-12)
    departs = np.linalg.norm(v[:, under] - profile[:, None, :], axis=0) / typical > LIP_DEPARTURE
    e = LIP_EDGE_BINS
    at_outer = departs[:, max(outer - e, 0):outer + e].any(axis=1)
    at_inner = departs[:, max(inner - e, 0):inner + e].any(axis=1)
    across = departs[:, max(inner - 2, 0):min(outer + 2, view_radii)].mean(axis=1)
    return [float(np.clip(starts, -1.0, 2.0)), float(np.clip(stops_short, -1.0, 2.0)),
            float((weights * at_outer).sum()), float((weights * at_inner).sum()),
            float((weights * (at_outer | at_inner)).sum()), float((weights * across).sum())]


def map_features(smoothed: np.ndarray, score: float, threshold: float, view: np.ndarray | None = None,
                 feature_set: str = FEATURE_SET, radius_margin: float = RADIUS_MARGIN) -> np.ndarray:
    """(n_features,) float64 description of the anomalous region(s) of one bottle's smoothed polar map.

    Rows of ``smoothed`` are angles, columns radii from the centre out; ``score`` is the bottle's
    image score and ``threshold`` the bundle's anomaly threshold. ``map-v2`` and ``map-v3`` also need
    ``view``, the polar image the autoencoder was given ((1, 3, angles, radii) or (3, angles, radii)), and
    ``map-v3`` the view's reach in rim radii (the bundle's ``view.radius_margin``).
    """
    if feature_set not in FEATURE_COUNTS:
        raise ValueError(f"unknown map feature set {feature_set!r}; this station computes {sorted(FEATURE_COUNTS)}")
    if feature_set != "map-v1" and view is None:
        raise ValueError(f"the {feature_set} features need the polar view the autoencoder was given")
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"the map classifier needs a calibrated anomaly threshold, got {threshold}")
    s = np.clip(np.asarray(smoothed, np.float64), 0.0, None) / threshold
    angles, radii = s.shape
    radius = (np.arange(radii) + 0.5) / radii
    peak = float(s.max())
    features = [float(np.log(max(score / threshold, 1e-3)))]
    for level in RELATIVE_LEVELS:
        m = s > level * peak if peak > 0 else np.zeros_like(s, bool)
        features += _region_shape(m, s * m, radius)
    for level in THRESHOLD_LEVELS:
        m = s > level
        pieces, _ = cv2.connectedComponents(m.astype(np.uint8))
        features += [float(np.log1p(m.sum())), float(np.log1p(pieces - 1))]
    usable = radii - radii % RADIAL_BANDS
    bands = s[:, :usable].reshape(angles, RADIAL_BANDS, -1).sum(axis=(0, 2))
    features += list(bands / (bands.sum() + 1e-6))
    per_angle = s.sum(axis=1)
    features.append(float(per_angle.max() / (per_angle.sum() + 1e-6)))
    if feature_set != "map-v1":
        assert view is not None
        region = s > RELATIVE_LEVELS[0] * peak if peak > 0 else np.zeros_like(s, bool)
        channels_first = np.asarray(view).reshape(-1, *np.shape(view)[-2:])
        features += _region_form(s, region)
        features += _region_against_profile(s, region, channels_first)
        if feature_set == "map-v3":
            features += _region_against_lip(s, region, channels_first, radius_margin)
    return np.asarray(features, np.float64)


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def map_probabilities(features: np.ndarray, mean: np.ndarray, std: np.ndarray, weights: np.ndarray,
                      bias: np.ndarray) -> np.ndarray:
    """Class probabilities of the fitted logistic regression for one bottle's (or a batch's) features."""
    z = ((features - mean) / std) @ weights + bias
    return softmax_rows(z)
