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


_SIGINT_SEEN = threading.Event()  # set by the handler that swallowed_interrupts_redelivered installs
_DEFERRING = threading.Event()  # within interrupts_deferred(): a Ctrl-C is recorded in _DEFERRED, not raised
_DEFERRED = threading.Event()


def _sigint_handler(signum, frame):
    """Python's own Ctrl-C handler (KeyboardInterrupt), remembering that it ran: a library that swallows the
    KeyboardInterrupt (a bare except in an import) or turns it into another error cannot make it disappear."""
    _SIGINT_SEEN.set()
    if _DEFERRING.is_set():
        _DEFERRED.set()
        return
    signal.default_int_handler(signum, frame)


@contextlib.contextmanager
def interrupts_deferred():
    """Within (in the main thread, under swallowed_interrupts_redelivered): a Ctrl-C is recorded and raised as
    KeyboardInterrupt when the block ends. For imports of extensions that run Python code from C++ (torch's):
    a KeyboardInterrupt raised in there reaches C++ as an exception it does not catch, and std::terminate
    aborts the process ("terminate called after throwing ... KeyboardInterrupt", exit -6). Elsewhere, or
    nested, the block changes nothing."""
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _sigint_handler
    if not own or _DEFERRING.is_set():
        yield
        return
    _DEFERRED.clear()
    _DEFERRING.set()
    try:
        yield
    finally:
        _DEFERRING.clear()
    if _DEFERRED.is_set():
        _DEFERRED.clear()
        raise KeyboardInterrupt


class _InterruptsDeferredDuringImport:
    """A meta-path finder that finds nothing itself: it gives the spec the other finders find for `names`, with
    the module's execution inside interrupts_deferred(). torch's import runs Python code from C++, where a
    KeyboardInterrupt aborts the process; wherever torch is first imported, a Ctrl-C then waits for its end."""

    def __init__(self, *names):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery

        if fullname not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                with interrupts_deferred():
                    run(module)

            spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


_TORCH_IMPORT_HOLDS_INTERRUPTS = _InterruptsDeferredDuringImport("torch")


def interrupted() -> bool:
    """Whether a Ctrl-C reached the command that swallowed_interrupts_redelivered runs."""
    return _SIGINT_SEEN.is_set()


def _interrupt_main_later(active) -> None:
    time.sleep(0.05)
    if active.is_set():  # not after the work has ended: the interrupt would hit the interpreter's exit
        _thread.interrupt_main()


def _redeliver_swallowed_interrupt(previous_hook, active, unraisable) -> None:
    """A Ctrl-C that lands in a weakref callback or __del__ (an import's module-lock callback, say) is
    "ignored" by CPython with a traceback and the run goes on; deliver it again so that it stops the run.
    From another thread and a moment later: raised here, inside the hook, it would be ignored once more."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _sigint_handler):
        _thread.start_new_thread(_interrupt_main_later, (active,))
    else:
        previous_hook(unraisable)


@contextlib.contextmanager
def swallowed_interrupts_redelivered():
    """Within: a Ctrl-C that CPython would swallow stops the work like any other (sys.unraisablehook), one
    that a library swallowed or turned into another error is still known (interrupted()), and one during
    torch's import waits for its end (_InterruptsDeferredDuringImport)."""
    previous_hook, active = sys.unraisablehook, threading.Event()
    active.set()
    sys.unraisablehook = functools.partial(_redeliver_swallowed_interrupt, previous_hook, active)
    # the outermost use, in the main thread, with Python's handler in place (not SIGINT ignored) installs the recording one
    own = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if own:
        _SIGINT_SEEN.clear()
        signal.signal(signal.SIGINT, _sigint_handler)
        sys.meta_path.insert(0, _TORCH_IMPORT_HOLDS_INTERRUPTS)
    try:
        yield
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(_TORCH_IMPORT_HOLDS_INTERRUPTS)
        sys.unraisablehook = previous_hook
        active.clear()
