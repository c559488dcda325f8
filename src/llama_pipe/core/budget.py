"""Time limits on untrusted work: a record, a regular expression or a model's Jinja template that
may never finish is given a wall-time budget and interrupted with :class:`TooSlow`."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

class TooSlow(BaseException):
    """A record used up its time budget (:func:`within_budget`). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in the code it interrupts can swallow it."""


_fired = False


def _alarm(signum: int, frame: Any) -> None:
    # Re-armed before raising: an exception raised where Python cannot propagate it (inside a gc
    # callback or a __del__) is swallowed, so another one follows 10 ms later.
    global _fired
    _fired = True
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    raise TooSlow()


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def within_budget(seconds: float, func: Callable[..., R], *args: Any) -> R:
    """``func(*args)``, interrupted with :class:`TooSlow` after ``seconds`` of wall time.

    A SIGALRM timer on the calling (main) thread: Python code and regular-expression matching are
    interrupted; the few microseconds of setting the timer are all a normal record pays. ``0``
    means no limit, and so does a call from another thread (signals reach only the main thread).
    A timer set by someone else (a test timeout) is put back afterwards, less the time used.
    """
    if seconds <= 0 or not _can_alarm():
        return func(*args)
    global _fired
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    started = time.monotonic()
    old = signal.signal(signal.SIGALRM, _alarm)
    _fired = False
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        result = func(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - started)))
    if _fired:  # the budget ran out, but the exception was swallowed before the work ended
        raise TooSlow()
    return result
