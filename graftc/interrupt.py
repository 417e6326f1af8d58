"""SIGINT and SIGTERM without tracebacks or half-written files.

Under the CLI (`interruptible`) both raise `Interrupted`, so every `finally` removes its temporary files (SIGTERM
would otherwise end the process at once). Inside a training loop (`deferred`) a signal is only noted; the loop
takes it (`take_pending`) at its next step boundary, saves a checkpoint and stops, so `--resume` continues exactly
where the run was interrupted. A second signal stops at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM. A KeyboardInterrupt, so `except Exception` lets it through and cleanups run.
    `where` says what a training loop saved before stopping ("stage 1 at step 7"), if it saved anything."""

    def __init__(self, signum: int, where: str = ""):
        self.signum, self.where = signum, where
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f" in {where}; checkpoint saved" if where else ""))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _Signals:
    installed = False
    deferring = False
    pending: int | None = None

    @staticmethod
    def handler(signum, frame) -> None:
        if _Signals.deferring and _Signals.pending is None:
            _Signals.pending = signum  # the loop saves and stops at its next step boundary
            return
        raise Interrupted(signum)  # outside a loop, or a second signal: stop now


@contextmanager
def interruptible():
    """While inside, SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise end the process at once,
    leaving temporary files behind). Only in the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _Signals.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _Signals.installed, _Signals.pending = True, None
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _Signals.installed, _Signals.pending = False, None


@contextmanager
def deferred():
    """Inside a training loop: a signal is noted, and `take_pending` hands it to the loop at a step boundary.
    One that arrives after the loop's last boundary stops the run when the loop returns (the last periodic
    checkpoint stands)."""
    if not _Signals.installed:
        yield
        return
    _Signals.deferring = True
    try:
        yield
    finally:
        _Signals.deferring = False
    signum, _Signals.pending = _Signals.pending, None
    if signum is not None:
        raise Interrupted(signum)


def take_pending() -> int | None:
    signum, _Signals.pending = _Signals.pending, None
    return signum
