"""Methods: algorithms producing a format from a dense weight and calibration statistics."""

from matpress.methods import lowrank, prune, rtn, structured, ternary  # noqa: F401  (register the methods)
from matpress.methods.base import METHODS, LayerStats, Method, get_method, register_method
from matpress.methods.rtn import DenseParams, IntParams

__all__ = ["METHODS", "DenseParams", "IntParams", "LayerStats", "Method", "get_method", "register_method"]
