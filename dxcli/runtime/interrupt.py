"""Stopping a training loop cleanly: Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to
finish its current step, save a resumable checkpoint and exit; a second signal stops at once.

Ranks must stop after the same step (a checkpoint is a collective), so the request is agreed
on with one tiny all-reduce per step; a timer asks for a checkpoint every N minutes the same way.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

from dxcli.runtime.dist import Dist, all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Installed around a loop with `with StopRequest(dist, save_every_minutes) as stop:`."""

    def __init__(self, dist: Dist, save_every_minutes: float = 0.0):
        self.dist = dist
        self.interval = save_every_minutes * 60.0
        self.requested = False
        self.signal_name: str | None = None
        self._last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # asked twice: the user does not want to wait for the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if self.dist.main:
            print(f"\n{self.signal_name}: finishing this step and saving a checkpoint "
                  "(press Ctrl-C again to stop at once)", flush=True)

    def after_step(self) -> tuple[bool, bool]:
        """(stop now, save a checkpoint now), agreed by every rank."""
        due = self.interval > 0 and time.monotonic() - self._last_save >= self.interval
        stop, save = all_reduce_sum([float(self.requested), float(due)], self.dist)
        return stop > 0, stop > 0 or save > 0

    def saved(self) -> None:
        self._last_save = time.monotonic()
