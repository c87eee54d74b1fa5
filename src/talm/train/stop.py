"""Stopping a run cleanly: Ctrl-C or SIGTERM becomes a flag the loop reads once per optimizer step.

A signal arriving mid-step would otherwise leave a half-applied optimizer step and no checkpoint; with the flag,
the step in progress finishes, every rank learns of it in the step's one sync, the run saves latest/ and exits.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """Turns Ctrl-C / SIGTERM into a flag checked between steps, so the run can save and exit cleanly.

    A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
