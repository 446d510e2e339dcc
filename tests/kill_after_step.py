"""`python tests/kill_after_step.py N ARGS...`: run `reciprune ARGS` in this process and SIGKILL it
right after optimizer step N (0-based) finishes, as kill -9 would: the resume tests' fault."""

from __future__ import annotations

import os
import signal
import sys

from reciprune.pipelines.finetune import FinetuneCallback, add_callback


class KillAfterStep(FinetuneCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    add_callback(KillAfterStep(int(sys.argv[1])))
    from reciprune.cli import main

    raise SystemExit(main(sys.argv[2:]))
