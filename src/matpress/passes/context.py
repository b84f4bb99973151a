"""What a pass is given besides the model and the rules: statistics or calibration data (or a tokenizer
to draw it with), where block weights come from, and whether to show progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from matpress.methods import LayerStats
from matpress.walk import CalibrationData, BlockSource


@dataclass(frozen=True)
class PassContext:
    """``stats``: precomputed statistics per layer (no calibration run); ``calibration``: batches to
    calibrate on; ``tokenizer``: draws them as the recipe's calibration settings say when none are
    given; ``source``: where the walk materialises block weights from (see
    :class:`~matpress.walk.BlockSource`); ``progress``: progress bars."""

    stats: Optional[dict[str, LayerStats]] = None
    calibration: Optional[CalibrationData] = None
    tokenizer: Any = None
    source: Optional[BlockSource] = None
    progress: bool = True
