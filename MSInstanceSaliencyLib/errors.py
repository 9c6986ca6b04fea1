"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""

import _thread
import contextlib
import functools
import signal
import sys
import threading
import time


class InputError(ValueError):
    """Bad input from the user: a file, an image, a model or a parameter. The message says what to do."""


class Cancelled(RuntimeError):
    """Raised when a progress callback asks to stop long work."""


class WorkerError(RuntimeError):
    """The worker process failed: it crashed, stopped answering, or a request failed inside it."""


def _interrupt_main_later(active) -> None:
    time.sleep(0.05)
    if active.is_set():  # not after the work has ended: the interrupt would hit the interpreter's exit
        _thread.interrupt_main()


def _redeliver_swallowed_interrupt(previous_hook, active, unraisable) -> None:
    """A Ctrl-C that lands in a weakref callback or __del__ (an import's module-lock callback, say) is
    "ignored" by CPython with a traceback and the run goes on; deliver it again so that it stops the run.
    From another thread and a moment later: raised here, inside the hook, it would be ignored once more."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _thread.start_new_thread(_interrupt_main_later, (active,))
    else:
        previous_hook(unraisable)


@contextlib.contextmanager
def swallowed_interrupts_redelivered():
    """Within: a Ctrl-C that CPython would swallow stops the work like any other (sys.unraisablehook)."""
    previous_hook, active = sys.unraisablehook, threading.Event()
    active.set()
    sys.unraisablehook = functools.partial(_redeliver_swallowed_interrupt, previous_hook, active)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        active.clear()
