"""Training, calibration and export: the only part of station that imports torch."""
