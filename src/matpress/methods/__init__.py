"""Methods: algorithms producing a format from a dense weight and calibration statistics."""

from matpress.methods import rtn  # noqa: F401  (registers rtn and dense)
from matpress.methods.base import METHODS, LayerStats, Method, get_method, register_method
from matpress.methods.rtn import DenseParams, IntParams

__all__ = ["METHODS", "DenseParams", "IntParams", "LayerStats", "Method", "get_method", "register_method"]
