"""Metrics, calibration baselines, selective prediction, OOD and failure detection, conformal sets, plots."""
