"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class InputError(ValueError):
    """Bad input from the user: a file, an image, a model or a parameter. The message says what to do."""


class Cancelled(RuntimeError):
    """Raised when a progress callback asks to stop long work."""


class WorkerError(RuntimeError):
    """The worker process failed: it crashed, stopped answering, or a request failed inside it."""
