"""One frame → one verdict: preprocess, inspect, decide. Never raises for a bad frame."""

from __future__ import annotations

import time

from station.core.backends import BackendSpec
from station.core.bundle import Bundle
from station.core.decide import PASS, Policy, decide
from station.core.defect_rule import DefectRule
from station.core.drift import DriftWatch, Sample, view_measures, watch_for
from station.core.folders import GOOD
from station.core.frame import Frame
from station.core.inspector import Inspector
from station.core.preprocess import preprocess
from station.core.verdict import Verdict, error_verdict
from station.errors import FrameError, StationError

REASON_INFERENCE = "inference_error"


class Pipeline:
    """One frame in, one verdict out: preprocess → Inspector → decide, for serving and offline tools alike.

    Contract: ``process`` never raises for a bad frame: an unreadable image, no bottle found or a
    model failure becomes an error verdict (which fails the bottle). The policy is the bundle's
    unless overridden at construction; with a ``drift_window`` it also feeds the drift watch from the
    bottles that pass. The station's inspection workers share one Pipeline and call ``process`` at
    once: it keeps no per-frame state of its own (the model runners and the drift watch allow it).
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: BackendSpec | str = "onnxruntime",
        class_confidence: float | None = None,
        anomaly_threshold: float | None = None,
        classifier_min_anomaly: float | None = None,
        defect_rule: DefectRule | None = None,
        drift_window: int | None = None,
    ) -> None:
        """``drift_window``: compare what the bundle was trained on with what this pipeline sees, over
        this many bottles (station/core/drift.py); None (training, evaluation, benchmarks): no drift watch."""
        m = bundle.manifest
        self.bundle = bundle
        self.inspector = Inspector(bundle, backend)
        self.policy = Policy(
            classes=m.classes,
            class_confidence=class_confidence if class_confidence is not None else m.decision.class_confidence,
            anomaly_threshold=anomaly_threshold if anomaly_threshold is not None else m.anomaly.threshold,
            canonical_size=m.canonical_size,
            radius_margin=m.view.radius_margin,
            classifier_min_anomaly=(classifier_min_anomaly if classifier_min_anomaly is not None
                                    else m.decision.classifier_min_anomaly),
            defect_rule=defect_rule if defect_rule is not None else m.decision.defect_rule,
        )
        self.model = {"name": m.name, "version": m.version}
        self.drift: DriftWatch | None = (
            watch_for(m.drift, drift_window, bundle.label) if drift_window is not None else None
        )

    def warm_up(self) -> None:
        self.inspector.warm_up()

    def process(self, frame: Frame) -> Verdict:
        frame.load()
        if frame.error is not None:
            return error_verdict(frame, frame.error.reason, frame.error.detail, self.model)
        if frame.image is None:
            return error_verdict(frame, "unreadable_image", "source delivered no image", self.model)
        latency = dict(frame.latency_ms)
        try:
            t0 = time.perf_counter()
            inputs = preprocess(frame.image, self.inspector.preprocess_spec)
            t1 = time.perf_counter()
            scores = self.inspector.inspect(inputs)
            t2 = time.perf_counter()
            decision = decide(scores, self.policy)
            t3 = time.perf_counter()
        except FrameError as exc:
            return error_verdict(frame, exc.reason, exc.detail, self.model)
        except (StationError, ValueError, RuntimeError) as exc:
            # Fail-safe: an inspection that breaks is a failed bottle, not a crashed line.
            return error_verdict(frame, REASON_INFERENCE, str(exc), self.model)
        if self.drift is not None:
            passed = decision.verdict == PASS
            offset, radius, brightness, contrast = view_measures(inputs, self.inspector.preprocess_spec)
            self.drift.observe(Sample(offset, radius, brightness, contrast,
                                      decision.anomaly_score if passed else None,
                                      decision.scores.get(GOOD) if passed else None))
        latency["preprocess"] = (t1 - t0) * 1e3
        latency.update(scores.latency_ms)
        latency["decide"] = (t3 - t2) * 1e3
        return Verdict(
            frame=frame,
            verdict=decision.verdict,
            reasons=decision.reasons,
            model=self.model,
            decision=decision,
            threshold=self.policy.anomaly_threshold,
            latency_ms=latency,
            scores=scores,
        )
