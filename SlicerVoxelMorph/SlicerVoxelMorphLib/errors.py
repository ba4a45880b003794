"""Exceptions the engine raises on purpose."""


class InputError(ValueError):
    """Bad input from the user: the message names the problem in one line."""


class Cancelled(RuntimeError):
    """Raised by a progress callback to stop a running registration or training."""
