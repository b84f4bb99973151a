"""A recipe's ``calibration`` entry as plain data: which text, how many samples of how many tokens, in
batches of how many, cut into windows or sentences. :func:`matpress.walk.calibration_data` draws the
batches it describes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from matpress.errors import CalibrationError, quote

BUILTIN = "builtin"
WINDOW = "window"  # samples are windows of seq_len tokens of running text (causal LMs)
SENTENCE = "sentence"  # samples are single sentences, padded per batch (sentence encoders)
UNITS = (WINDOW, SENTENCE)


def check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CalibrationError(f"calibration {key} must be a positive integer, got {quote(value)}")


def check_unit(unit: Any) -> None:
    if unit not in UNITS:
        raise CalibrationError(f"calibration unit must be one of {list(UNITS)}, got {quote(unit)}")


@dataclass(frozen=True)
class CalibrationSettings:
    """A recipe's ``calibration`` entry: text (``builtin``, a text or ``.jsonl`` file path, or a list of
    strings), samples, seq_len, batch_size, unit (``window`` or ``sentence``; None: by model kind), and
    chat_template (default true: format the text with the tokenizer's chat template when it has one;
    see :meth:`matpress.walk.CalibrationData.from_text`)."""

    text: Union[str, tuple[str, ...]] = BUILTIN
    samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    unit: Optional[str] = None
    chat_template: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.text, str) and self.text.strip()) and not (
            isinstance(self.text, tuple) and self.text and all(isinstance(t, str) for t in self.text)
        ):
            raise CalibrationError(f"calibration text must be '{BUILTIN}', a file path or a list of strings, got {quote(self.text)}")
        check_positive(samples=self.samples, seq_len=self.seq_len, batch_size=self.batch_size)
        if self.unit is not None:
            check_unit(self.unit)
        if not isinstance(self.chat_template, bool):
            raise CalibrationError(f"calibration chat_template must be true or false, got {quote(self.chat_template)}")

    @classmethod
    def from_dict(cls, values: Any, where: str = "calibration") -> "CalibrationSettings":
        if not isinstance(values, dict):
            raise CalibrationError(f"{where}: must be a mapping such as {{text: builtin, samples: 128}}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields, key=str)
        if unknown:
            raise CalibrationError(f"{where}: unknown key(s) {quote(unknown)}; it takes {sorted(fields)}")
        values = dict(values)
        if isinstance(values.get("text"), list):
            values["text"] = tuple(values["text"])
        try:
            return cls(**values)
        except CalibrationError as e:
            raise CalibrationError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(self.text, tuple):
            d["text"] = list(self.text)
        return d

    @property
    def text_file(self) -> Optional[str]:
        """The calibration text file, or None for the built-in text or a list of strings."""
        return self.text if isinstance(self.text, str) and self.text != BUILTIN else None
