"""Stopping a run at a safe point when asked to (SIGTERM, SIGINT / Ctrl-C).

A signal handler must not stop the process where it stands: it could land in the middle of a
checkpoint or results write and leave a ``.tmp`` file or a half-finished run behind. So the handler only
records the request (``StopRequest``); the round loop looks at it between rounds, after the round's row
and checkpoint are on disk, writes a checkpoint of that round if none was due, and raises ``RunStopped``,
which the CLI reports as a resumable stop (exit status 3). A second signal of the same kind means "now":
the previous handler is put back and the signal delivered again (Ctrl-C twice: KeyboardInterrupt; SIGTERM
twice: the default, termination); the last checkpoint still resumes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(RuntimeError):
    """The run stopped on request after round ``round`` (completed and in the checkpoint); it is resumable."""

    def __init__(self, round_num: int, reason: str) -> None:
        super().__init__(f"{reason}: stopped at round {round_num}")
        self.round = round_num
        self.reason = reason


class StopRequest:
    """Set (by a signal handler, or by any caller) to ask the round loop to stop at its next safe point."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


@contextmanager
def stop_on_signals(stop: StopRequest, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """While inside, ``signals`` set ``stop`` instead of ending the process (see the module docstring).
    Python handles signals in the main thread only; elsewhere this installs nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    # getsignal is None for a handler not set from Python; the default is the closest to put back
    previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.requested:
            old = previous[signal.Signals(signum)]
            # Started with the signal ignored (a background job of a script: bash ignores SIGINT there),
            # a second signal must still stop at once: do what Python's own SIGINT handler / the default does.
            if signum == signal.SIGINT and old in (signal.SIG_IGN, signal.SIG_DFL):
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL if old is signal.SIG_IGN else old)
            signal.raise_signal(signum)
            return
        stop.request(name)
        # os.write, not print: a handler may run while the main thread is inside a print to stderr
        os.write(2, f"\nfeddtl: {name} received: stopping after the current round "
                    f"(send it again to stop at once)\n".encode())

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
