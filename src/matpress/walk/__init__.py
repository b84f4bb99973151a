"""Walking a model: :func:`walk`, the one walk every pass consumes (:mod:`.walker`), and what it is made
of: calibration data, the statistics of layers' inputs, the repeated blocks, their captured inputs,
traces and execution stages."""

from matpress.walk.data import CalibrationData, calibration_data
from matpress.walk.stats import StatsCollector, collect_stats
from matpress.walk.walker import Block, BlockSource, walk

__all__ = ["Block", "CalibrationData", "StatsCollector", "BlockSource", "calibration_data", "collect_stats", "walk"]
