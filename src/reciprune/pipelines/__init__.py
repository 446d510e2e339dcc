"""Runners that drive a lifecycle session: layer-wise oneshot calibration (and training)."""
