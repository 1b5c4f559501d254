"""Exceptions raised by gradsift for user mistakes (each says what to do)."""


class GradsiftError(Exception):
    """Base class of gradsift's errors."""


class UnsupportedModelError(GradsiftError, ValueError):
    """The model cannot give per-example gradients (e.g. BatchNorm in training mode)."""


class NonFiniteGradientError(GradsiftError, FloatingPointError):
    """A per-example gradient holds NaN or inf."""


class DataError(GradsiftError, ValueError):
    """Input data is malformed (empty, mismatched lengths, labels out of range, ...)."""


class SpecError(GradsiftError, ValueError):
    """A spec string such as ``winsorize:c=2`` could not be parsed."""
