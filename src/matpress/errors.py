"""Exceptions a user can act on. Each message says what was wrong, where, and what to do."""


class MatpressError(Exception):
    """Base class for all matpress errors."""


class FormatError(MatpressError, ValueError):
    """A weight or stored tensor does not fit the format."""


class RecipeError(MatpressError, ValueError):
    """A recipe is malformed: unknown keys, bad values, or matches nothing."""


class CheckpointError(MatpressError, ValueError):
    """A saved checkpoint is missing, truncated, tampered with, or of an unknown version."""


class CalibrationError(MatpressError, ValueError):
    """Calibration data is missing or unusable."""


class BudgetError(MatpressError, ValueError):
    """A size budget is malformed or cannot be met."""
