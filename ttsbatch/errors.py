"""Errors a user can act on. The CLI turns each into one line on stderr and an exit code."""


class TtsbatchError(Exception):
    """Base class: a problem with a clear, one-line explanation."""

    exit_code = 1


class InputError(TtsbatchError):
    """Bad input or usage: missing/empty/binary file, bad voice, unwritable output, bad option."""

    exit_code = 2


class ModelError(TtsbatchError):
    """The model, its weights or the environment cannot be used (no weights, no GPU, ...)."""

    exit_code = 3


class WatermarkError(ModelError):
    """Perth cannot be loaded or did not mark the audio: nothing unmarked is ever written."""
