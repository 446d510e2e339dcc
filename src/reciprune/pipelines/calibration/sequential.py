"""Sequential onloading: weights in CPU memory, one decoder layer at a time on the GPU."""

from __future__ import annotations

from reciprune.pipelines.calibration.layerwise import LayerwisePipeline


class SequentialPipeline(LayerwisePipeline):
    """The layer-wise walk with an `Onload` placement: each layer moves to the execution device
    for its statistics forward, compression and propagation, then back to CPU memory. Peak
    device memory is one layer, its float32 statistics and the calibration activations (kept on
    the device when they fit, else in pinned CPU memory); the embeddings and head are on the
    device only while the first layer's inputs are captured."""

    name = "sequential"
    placement_kind = "onload"
