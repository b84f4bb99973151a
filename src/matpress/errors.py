"""Exceptions a user can act on. Each message says what was wrong, where, and what to do."""

import reprlib


class MatpressError(Exception):
    """Base class for all matpress errors."""


class FormatError(MatpressError, ValueError):
    """A weight or stored tensor does not fit the format."""


class RecipeError(MatpressError, ValueError):
    """A recipe is malformed: unknown keys, bad values, or matches nothing."""


class CheckpointError(MatpressError, ValueError):
    """A saved checkpoint is missing, truncated, malformed, tampered with, or of an unknown version, or
    cannot be written where asked."""


class CalibrationError(MatpressError, ValueError):
    """Calibration data is missing or unusable."""


class RemoteCodeError(MatpressError):
    """A model directory ships Python code to run, and the user did not pass ``trust_remote_code``."""


class BudgetError(MatpressError, ValueError):
    """A size budget is malformed or cannot be met."""


QUOTE_LIMIT = 200


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` bounded to about ``limit`` characters, for error messages that quote a user's value.

    Long strings and large or deeply nested containers are elided (``...``) while the repr is built, so a
    hostile value (a YAML alias bomb, a 100 MB string) costs neither time nor memory here.
    """
    short = reprlib.Repr()
    short.maxlevel = 3
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = short.maxdeque = 8
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
