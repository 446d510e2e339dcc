"""Progress display: tqdm bars on a terminal, plain log lines everywhere else.

A bar redraws itself with carriage returns, which a log file or a CI console keeps as one long
line per bar; so bars are drawn only when stderr is a terminal and progress was not turned off,
and long loops otherwise print a plain line to stderr every `PLAIN_EVERY_S` seconds.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

#: Seconds between two plain progress lines.
PLAIN_EVERY_S = 30.0


def bars_wanted(progress: bool) -> bool:
    """Whether to draw bars: asked for, and stderr is a terminal."""
    return progress and sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Turn off the bars of transformers ("Loading weights", "Writing model shards"),
    huggingface_hub and datasets, here and in the processes this one starts."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by torchrun workers at import
    # compressed-tensors draws plain tqdm bars ("Compressing model", "Dispatching model") with
    # no switch, some with `disable=False` written out: every tqdm bar is turned off. Workers
    # read TQDM_DISABLE (tqdm's own default for `disable`) when they import tqdm.
    os.environ["TQDM_DISABLE"] = "1"
    import tqdm

    if not getattr(tqdm.tqdm.__init__, "reciprune_quiet", False):
        tqdm.tqdm.__init__ = _always_disabled(tqdm.tqdm.__init__)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


def _always_disabled(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "disable": True})

    quiet_init.reciprune_quiet = True  # type: ignore[attr-defined]
    return quiet_init


class PlainProgress:
    """The part of tqdm's interface reciprune uses, printing `desc: n/total unit` lines."""

    def __init__(
        self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int = 0
    ) -> None:
        self.iterable, self.desc, self.unit, self.n = iterable, desc, unit, initial
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.total = total
        self.postfix = ""
        self._last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= PLAIN_EVERY_S:
            self._last = time.monotonic()
            total = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc}: {self.n}{total} {self.unit}{self.postfix}", file=sys.stderr,
                  flush=True)  # fmt: skip

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " (" + ", ".join(f"{k}={v}" for k, v in values.items()) + ")"

    def close(self) -> None:
        """Nothing to clear: plain lines stay as they are."""


def progress_bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
    progress: bool = True, initial: int = 0,
) -> Any:
    """A tqdm bar when `bars_wanted(progress)`, else a `PlainProgress` of the same loop."""
    if bars_wanted(progress):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial)
    return PlainProgress(iterable, total, desc, unit, initial)
