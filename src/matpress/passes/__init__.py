"""Compression passes, each a consumer of a walk over the model: plain (:mod:`.plain`), sequential
calibrated (:mod:`.sequential`) and budgeted (:mod:`.budget`); :func:`~.pipeline.compress` picks one."""

from matpress.passes.layers import CompressionReport, LayerReport
from matpress.passes.pipeline import compress

__all__ = ["CompressionReport", "LayerReport", "compress"]
