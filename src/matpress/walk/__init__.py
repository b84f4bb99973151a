"""Walking a model: calibration data, the statistics of layers' inputs, the repeated blocks, their
captured inputs, traces and execution stages."""

from matpress.walk.data import CalibrationData, calibration_data
from matpress.walk.stats import StatsCollector, collect_stats

__all__ = ["CalibrationData", "StatsCollector", "calibration_data", "collect_stats"]
