"""What the steps of one job share: the job, where the model came from, metrics and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from reciprune.data.calibration import load_eval_texts
from reciprune.evaluation.perplexity import perplexity
from reciprune.models import ModelSource
from reciprune.pipelines.jobs import Job


@dataclass(kw_only=True)
class JobRun:
    """One running job's shared state; its steps add metrics and timings as they go."""

    job: Job
    source: ModelSource
    eval_texts: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def load_eval_texts(self) -> None:
        """The held-out text, when perplexity is measured (a bad file fails before weights)."""
        if self.job.evaluation.eval_ppl:
            self.eval_texts = load_eval_texts(self.job.evaluation.ppl_file)

    def timed(self, key: str, since: float) -> None:
        self.timings[key] = time.perf_counter() - since

    def measure_ppl(
        self, model: nn.Module, tokenizer: Any, key: str, timing: str, placement: Any = None
    ) -> None:
        """metrics[key] = perplexity on the held-out text (nothing when it is not measured);
        with a `placement`, layer by layer (`evaluation.perplexity`)."""
        if self.eval_texts is None:
            return
        t0 = time.perf_counter()
        options = self.job.evaluation
        self.metrics[key] = perplexity(
            model,
            tokenizer,
            self.eval_texts,
            max_seq_length=options.ppl_seq_length,
            max_samples=options.ppl_samples,
            progress=self.job.output.progress,
            placement=placement,
        ).ppl
        self.timed(timing, t0)
