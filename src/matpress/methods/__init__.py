"""Methods: algorithms producing a format from a dense weight and calibration statistics."""

from matpress.methods import awq, codebook, gptq, hqq, lowrank, prune, rtn, structured, ternary, vq  # noqa: F401  (register the methods)
from matpress.methods.awq import AWQParams
from matpress.methods.base import METHODS, BlockHook, BlockView, LayerStats, Method, get_method, register_block_hook, register_method
from matpress.methods.gptq import GPTQParams
from matpress.methods.hqq import HQQParams
from matpress.methods.rtn import DenseParams, IntParams

__all__ = [
    "METHODS", "AWQParams", "BlockHook", "BlockView", "DenseParams", "GPTQParams", "HQQParams", "IntParams", "LayerStats",
    "Method", "get_method", "register_block_hook", "register_method",
]
