"""Methods: algorithms producing a format from a dense weight and calibration statistics."""

from matpress.methods import rtn  # noqa: F401  (registers rtn and dense)
from matpress.methods import awq, gptq, hqq  # noqa: F401  (register awq, gptq, hqq)
from matpress.methods import lowrank, prune, structured, ternary  # noqa: F401  (register the other families)
from matpress.methods.awq import AWQParams
from matpress.methods.base import METHODS, LayerStats, Method, get_method, register_method
from matpress.methods.gptq import GPTQParams
from matpress.methods.hqq import HQQParams
from matpress.methods.rtn import DenseParams, IntParams

__all__ = [
    "METHODS", "AWQParams", "DenseParams", "GPTQParams", "HQQParams", "IntParams", "LayerStats", "Method",
    "get_method", "register_method",
]
