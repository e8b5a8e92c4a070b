"""Stopping cleanly on SIGTERM and SIGINT (a scheduler's preemption, Ctrl-C).

Inside `StopRequests()` the two signals only record that a stop was asked for; the work loop looks at the record
at a point where stopping loses nothing (after an optimizer step, after a feature-cache shard), saves, and raises
`Interrupted`, which the command line turns into the conventional exit status (128 + the signal number: 143 for
SIGTERM, 130 for SIGINT). A second signal while the work is being saved is ignored (and said so): the save finishes.
The previous handlers come back when the block ends, so library code outside the loops behaves as before; outside
the main thread (where Python cannot set handlers) nothing is installed and the signals keep their usual effect.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Work stopped on a signal after saving what it had done; `exit_code` is 128 + the signal number.

    A KeyboardInterrupt, so code that already lets Ctrl-C through (or cleans up on it) treats it alike."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequests:
    """While inside the `with` block, SIGTERM / SIGINT set `signum` (the first one received) instead of ending the
    process. `first` / `again` are what the process says (on stderr, at once) on the first and later signals;
    `announce=False` keeps it silent (ranks other than the main one)."""

    def __init__(self, first: str = "finishing the current step, then saving",
                 again: str = "ignored, the work is being saved", announce: bool = True):
        self.first, self.again, self.announce = first, again, announce
        self.signum: Optional[int] = None
        self.received = 0
        self.installed = False
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> bool:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)  # None: set outside Python
        self._previous.clear()
        self.installed = False
        return False

    def _handle(self, signum, frame) -> None:
        self.received += 1
        if self.signum is None:
            self.signum = signum
            line = f"received {signal_name(signum)}: {self.first}"
        else:
            line = f"received {signal_name(signum)} while stopping: {self.again}"
        if self.announce:
            try:  # the handler may run inside another write to stderr (a progress bar): then it stays silent
                sys.stderr.write(f"\n{line}\n")
                sys.stderr.flush()
            except (RuntimeError, OSError, ValueError, AttributeError):  # reentrant call, closed stream ...
                pass
