"""Run a finetune job on N processes of this machine: torchrun, with the job as a JSON file.

`run_under_torchrun(job, n)` writes `dump_job(job)` to a temporary file and starts
`torchrun --standalone --nproc-per-node=n -m reciprune.pipelines.launch FILE`; every worker
reads the same job back, so no command line is rebuilt and a new option needs nothing here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from reciprune.core.distributed import launched_by_torchrun
from reciprune.errors import ReciPruneError
from reciprune.pipelines.jobs import FinetuneJob, dump_job, load_job


def run_under_torchrun(job: FinetuneJob, nproc: int) -> int:
    """Run `job` on `nproc` processes (FSDP2); returns torchrun's exit status."""
    if launched_by_torchrun():
        raise ReciPruneError(
            "--nproc-per-node is for starting torchrun; this process already runs under torchrun. "
            "Drop --nproc-per-node (torchrun's own --nproc-per-node sets the processes)."
        )
    handle, name = tempfile.mkstemp(suffix=".json", prefix=".reciprune-job-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(dump_job(job), f, default=str)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "reciprune.pipelines.launch", name,
        ]  # fmt: skip
        return subprocess.call(command)
    finally:
        Path(name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """A torchrun worker: run the finetune job in the JSON file named on the command line."""
    from reciprune.pipelines.finetune_job import run_finetune_job

    (path,) = sys.argv[1:] if argv is None else argv
    try:
        job = load_job(json.loads(Path(path).read_text(encoding="utf-8")))
        run_finetune_job(job)
    except ReciPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
