"""Streaming: decoder layers read from the input safetensors and written to the output ones."""

from __future__ import annotations

from reciprune.pipelines.calibration.layerwise import LayerwisePipeline


class StreamingPipeline(LayerwisePipeline):
    """The layer-wise walk with a `Streamed` placement: layer i is read from the input
    checkpoint's shards when its turn comes, compressed on the execution device and written
    into the output shards before layer i + 1 is read, so the whole model is never in memory
    (only the embeddings, head and one layer). The output is the same checkpoint the in-memory
    pipeline saves (tested bit for bit)."""

    name = "streaming"
    placement_kind = "stream"
