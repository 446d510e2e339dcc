"""The data-free pipeline: modifiers that read only the weights (magnitude pruning, RTN)."""

from __future__ import annotations

import time

from reciprune.core.events import EventType
from reciprune.core.session import LifecycleSession
from reciprune.modifiers.base import Modifier
from reciprune.pipelines.calibration.base import Batch, CalibrationPipeline


class DataFreePipeline(CalibrationPipeline):
    """Every layer gets LAYER_START and LAYER_CALIBRATED with no forward pass in between."""

    name = "data_free"
    placement_kind = "memory"

    @classmethod
    def supports(cls, modifiers: list[Modifier]) -> bool:
        return not any(m.requires_data for m in modifiers)

    def calibrate(self, session: LifecycleSession, batches: list[Batch] | None) -> None:
        session.event(EventType.CALIBRATION_START)
        self.timings["compress"] = 0.0
        for step in self.layer_steps(session.model):
            self.placement.fetch(step)
            self.check_finite_weights(step)
            t0 = time.perf_counter()
            session.event(EventType.LAYER_START, **vars(step))
            session.event(EventType.LAYER_CALIBRATED, **vars(step))
            self.timed("compress", t0)
            self.placement.release(step, changed=True)
        session.event(EventType.CALIBRATION_END)
