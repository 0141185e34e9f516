"""Both models of a bundle → class probabilities, anomaly score and anomaly map."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from station.core import map_classifier
from station.core.anomaly import AnomalyParams, image_score, mask_unseen, smooth
from station.core.backends import BackendSpec, ModelRunner, load_models
from station.core.bundle import Bundle
from station.core.preprocess import ModelInputs, Mouth
from station.errors import BackendError


@dataclass
class Scores:
    probabilities: np.ndarray  # (n_classes,), sums to 1
    anomaly_score: float
    anomaly_map: np.ndarray  # (angle_bins, radius_bins) smoothed error map of the polar view
    mouth: Mouth
    latency_ms: dict[str, float] = field(default_factory=dict)


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softened by a temperature: softmax(log p / T), the same as dividing the logits by T."""
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out: np.ndarray = np.exp(logp)
    out /= out.sum(axis=-1, keepdims=True)
    return out


class Inspector:
    """A bundle's two models, loaded on one backend: model inputs in, ``Scores`` out.

    Contract: ``inspect`` takes one bottle's preprocessed inputs and returns its class probabilities
    (summing to 1, from the source the bundle's ``decision.classes_from`` names: the map classifier on
    the anomaly map, the CNN averaged over the bottle's turns with its temperature, or the geometric
    mean of both; the CNN is run only when named), its anomaly map (smoothed,
    polar) and image score, scored exactly as the bundle was calibrated; it decides nothing. It raises
    BackendError when a model's output does not fit the bundle. Several threads may call ``inspect``
    at once: it keeps no per-call state (the inspection workers share one, through their Pipeline).
    """

    def __init__(self, bundle: Bundle, backend: BackendSpec | str = "onnxruntime") -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.classes = m.classes
        spec = backend if isinstance(backend, BackendSpec) else BackendSpec(backend)
        choice, models = load_models(bundle, spec)
        self.backend = choice.name
        self.backend_reason = choice.reason
        self.params = AnomalyParams(m.anomaly.smoothing_sigma, m.anomaly.top_k_fraction,
                                    m.anomaly.mask_radius, m.view.radius_margin)
        self.preprocess_spec = m.preprocess_spec()
        self.classifier: ModelRunner = models["classifier"]
        self.autoencoder: ModelRunner = models["autoencoder"]
        # The classifier may take the anomaly map as evidence beside the image.
        self._classifier_takes_map = len(m.models["classifier"].inputs) == 2
        self.rotations = m.models["classifier"].rotations
        self.temperature = m.decision.temperature
        self.classes_from = m.decision.classes_from
        mc = m.decision.map_classifier
        self._map = None if mc is None or self.classes_from == "cnn" else (
            mc.threshold, mc.feature_set,
            (np.asarray(mc.mean), np.asarray(mc.std), np.asarray(mc.weights), np.asarray(mc.bias)))

    def warm_up(self, runs: int = 2) -> None:
        """Run both models on blank inputs so the first bottle does not pay for lazy init."""
        spec = self.preprocess_spec
        blank = np.zeros((1, 3, spec.angle_bins, spec.radius_bins), np.float32)
        mouth = Mouth(spec.canonical_size / 2, spec.canonical_size / 2, spec.canonical_size / 3)
        for _ in range(runs):
            self.inspect(ModelInputs(blank, blank, mouth, (0, 0, spec.canonical_size)))

    def classifier_batches(self, inputs: ModelInputs, error_map: np.ndarray) -> list[np.ndarray]:
        """The classifier's inputs for one bottle: one batch row per turn it is seen at."""
        batches = [inputs.classifier, error_map] if self._classifier_takes_map else [inputs.classifier]
        if self.rotations == 1:
            return batches
        # A turned bottle is a circular shift of the angle rows: the same bottle, seen turned.
        return [np.concatenate([np.roll(b, k * b.shape[2] // self.rotations, axis=2)
                                for k in range(self.rotations)]) for b in batches]

    def cnn_probabilities(self, inputs: ModelInputs, error_map: np.ndarray) -> np.ndarray:
        """(n_classes,) the CNN classifier's probabilities, averaged over the turns, temperature applied."""
        probs = self.classifier.run(*self.classifier_batches(inputs, error_map)).mean(axis=0, keepdims=True)
        if probs.shape != (1, len(self.classes)):
            raise BackendError(
                f"classifier output shape {probs.shape} does not match {len(self.classes)} classes"
            )
        if self.temperature != 1.0:
            probs = temper(probs, self.temperature)
        out: np.ndarray = probs[0].astype(np.float64)
        return out

    def map_probabilities(self, inputs: ModelInputs, smoothed: np.ndarray, score: float) -> np.ndarray:
        """(n_classes,) the map classifier's probabilities (station/core/map_classifier.py)."""
        assert self._map is not None
        unit, feature_set, fitted = self._map
        features = map_classifier.map_features(smoothed, score, unit, inputs.autoencoder, feature_set,
                                               self.preprocess_spec.radius_margin)
        out: np.ndarray = map_classifier.map_probabilities(features, *fitted)
        return out

    def anomaly(self, inputs: ModelInputs) -> tuple[np.ndarray, np.ndarray, float]:
        """The autoencoder's map as it comes out, the map smoothed and masked, and the image score."""
        error_map = self.autoencoder.run(inputs.autoencoder)
        return (error_map, *self._score(error_map, inputs))

    def _score(self, error_map: np.ndarray, inputs: ModelInputs) -> tuple[np.ndarray, float]:
        smoothed = mask_unseen(smooth(error_map.reshape(error_map.shape[-2:]), self.params), inputs.unseen)
        return smoothed, image_score(smoothed, self.params)

    def inspect(self, inputs: ModelInputs) -> Scores:
        t0 = time.perf_counter()
        error_map = self.autoencoder.run(inputs.autoencoder)
        t1 = time.perf_counter()
        smoothed, score = self._score(error_map, inputs)
        t2 = time.perf_counter()
        if self.classes_from == "cnn":
            probs = self.cnn_probabilities(inputs, error_map)
        elif self.classes_from == "map":
            probs = self.map_probabilities(inputs, smoothed, score)
        else:  # fused: the geometric mean, so either model's confident "no" counts
            both = np.log(np.clip(self.cnn_probabilities(inputs, error_map), 1e-12, None)) \
                + np.log(np.clip(self.map_probabilities(inputs, smoothed, score), 1e-12, None))
            probs = map_classifier.softmax_rows(both / 2)
        t3 = time.perf_counter()
        return Scores(
            probabilities=probs,
            anomaly_score=score,
            anomaly_map=smoothed,
            mouth=inputs.mouth,
            latency_ms={
                "autoencoder": (t1 - t0) * 1e3,
                "anomaly_map": (t2 - t1) * 1e3,
                "classifier": (t3 - t2) * 1e3,
            },
        )
