"""Calibration data: token batches from real text (the calibration split of
:mod:`matpress.evaluation.text`, a user's text or JSON Lines file, or a list of strings), formatted with
the tokenizer's chat template when it has one, padded, with their masks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from matpress.errors import CalibrationError, quote
from matpress.evaluation.text import (
    CALIBRATION, Record, chat_text, corpus, has_chat_template, is_jsonl, read_jsonl_file, read_text_file, sentences,
)
from matpress.inputs import check_text
from matpress.nn.layout import ENCODER, model_kind
from matpress.recipe.calibration import BUILTIN, SENTENCE, WINDOW, CalibrationSettings, check_positive, check_unit

TextSource = Union[None, str, Path, Sequence[str]]
BUILTIN_SOURCE = "pydoc_data.topics (calibration split)"
PASSAGE_CHARS = 2000  # running text meets a chat template in passages of about this size, one message each


@dataclass
class CalibrationData:
    """Token batches for calibration: each a dict with ``input_ids`` and ``attention_mask``
    (``(batch, seq)``, 0 on padding)."""

    batches: list[dict[str, torch.Tensor]]
    source: str

    @property
    def n_samples(self) -> int:
        return sum(b["input_ids"].shape[0] for b in self.batches)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(sum(b["attention_mask"].sum() for b in self.batches))

    @classmethod
    def from_token_ids(
        cls, input_ids: torch.Tensor, batch_size: int = 8, attention_mask: Optional[torch.Tensor] = None,
        source: str = "token ids",
    ) -> "CalibrationData":
        """Batches from a ``(n_samples, seq_len)`` tensor of token ids (all real unless masked)."""
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise CalibrationError(f"calibration token ids must be a non-empty (samples, seq_len) tensor, got {tuple(input_ids.shape)}")
        check_positive(batch_size=batch_size)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        batches = [
            {"input_ids": input_ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
            for i in range(0, input_ids.shape[0], batch_size)
        ]
        return cls(batches, source)

    @classmethod
    def from_text(
        cls,
        tokenizer: Any,
        text: TextSource = None,
        n_samples: int = 128,
        seq_len: int = 128,
        batch_size: int = 8,
        unit: str = WINDOW,
        chat_template: bool = True,
    ) -> "CalibrationData":
        """Calibration batches from ``text``: None or ``"builtin"`` (the calibration split of the built-in
        corpus, never used for evaluation), a path to a UTF-8 text file or a JSON Lines file (``.jsonl``:
        a ``text`` or ``messages`` per line, see :mod:`matpress.evaluation.text`), or a list of strings.

        ``unit="window"``: ``n_samples`` windows of ``seq_len`` tokens spread evenly over the running
        text (fewer if the text is short; an error if it holds less than one window). ``unit="sentence"``:
        ``n_samples`` sentences (a JSON Lines file: records) spread evenly over the text, each truncated
        to ``seq_len`` tokens and padded per batch, which matches how sentence encoders are used.

        ``chat_template`` (when the tokenizer has one, as instruct models' do): the text is formatted as
        the model sees it in use, each plain text (running text: each passage of about
        :data:`PASSAGE_CHARS` characters, cut at paragraph breaks) as a user message and each
        conversation as it is, with the template's special tokens and default system prompt. Without
        it, a conversation is its messages' contents separated by blank lines.
        """
        check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
        check_unit(unit)
        if tokenizer is None:
            raise CalibrationError("calibration needs the model's tokenizer; none was given")
        templated = chat_template and has_chat_template(tokenizer)
        if unit == WINDOW:
            records, source = _records(text, sentence_unit=False)
            running = "\n\n".join(_formatted(records, tokenizer if templated else None, passages=True))
            ids = tokenizer(running, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            available = len(ids) // seq_len
            if available == 0:
                raise CalibrationError(
                    f"calibration text ({source}) has {len(ids)} tokens, fewer than one sequence of "
                    f"{seq_len}; give more text or a smaller seq_len"
                )
            windows = ids[: available * seq_len].view(available, seq_len)[_spread(available, n_samples)]
            source = f"{source}{', chat template' if templated else ''}: {len(windows)} windows of {seq_len} tokens"
            return cls.from_token_ids(windows, batch_size, source=source)
        records, source = _records(text, sentence_unit=True)
        found = _formatted([records[i] for i in _spread(len(records), n_samples).tolist()], tokenizer if templated else None, passages=False)
        if getattr(tokenizer, "pad_token", None) is None:
            raise CalibrationError(
                "the tokenizer has no padding token, so sentences cannot be batched; use unit='window'"
            )
        batches = []
        for i in range(0, len(found), batch_size):
            enc = tokenizer(
                found[i : i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt",
                add_special_tokens=not templated,  # a chat template writes the special tokens itself
            )
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return cls(batches, f"{source}{', chat template' if templated else ''}: {len(found)} sentences")


def _spread(available: int, wanted: int) -> torch.Tensor:
    """Indices of ``min(available, wanted)`` items spread evenly over ``available``, so calibration sees
    the whole text rather than its first topics."""
    n = min(available, wanted)
    return torch.linspace(0, available - 1, n).round().long()


def _user_texts(text: Sequence[str]) -> list[str]:
    texts = [t for t in text if isinstance(t, str) and t.strip()]
    if len(texts) != len(text):
        raise CalibrationError("calibration texts must all be non-empty strings")
    for i, t in enumerate(texts):
        check_text(t, f"calibration text [{i}]", CalibrationError)
    if not texts:
        raise CalibrationError("calibration text is empty: pass 'builtin', a text file, or non-empty strings")
    return texts


def _records(text: TextSource, sentence_unit: bool) -> tuple[list[Record], str]:
    """The calibration texts and conversations of ``text``, and where they came from. Plain text is
    one running text, or its sentences for ``sentence_unit``."""
    if text is None or text == BUILTIN:
        return (sentences(split=CALIBRATION) if sentence_unit else [corpus(CALIBRATION)]), BUILTIN_SOURCE
    if isinstance(text, (str, Path)):
        path = _existing_file(text)
        if is_jsonl(path):
            return read_jsonl_file(path), str(text)
        return (sentences(text_file=path) if sentence_unit else [read_text_file(path)]), str(text)
    return _user_texts(text), "given texts"


def _passages(text: str) -> list[str]:
    """``text`` cut at paragraph breaks into passages of at least :data:`PASSAGE_CHARS` characters (the
    last may be shorter)."""
    passages, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        if paragraph.strip():
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= PASSAGE_CHARS:
            passages.append(current)
            current = ""
    return [*passages, current] if current else passages


def _formatted(records: Sequence[Record], chat_tokenizer: Any, passages: bool) -> list[str]:
    """``records`` as text: through ``chat_tokenizer``'s chat template (a plain text as a user message,
    cut into passages first if ``passages``), or plainly when it is None."""
    texts = []
    for record in records:
        if chat_tokenizer is None:
            texts.append(record if isinstance(record, str) else "\n\n".join(m["content"] for m in record))
        elif isinstance(record, str):
            pieces = _passages(record) if passages else [record]
            texts.extend(chat_text(chat_tokenizer, [{"role": "user", "content": p}]) for p in pieces)
        else:
            texts.append(chat_text(chat_tokenizer, record))
    return texts


def _existing_file(text: Union[str, Path]) -> Path:
    if not str(text).strip():
        raise CalibrationError("calibration text is empty: pass 'builtin', a text file, or non-empty strings")
    path = Path(text)
    if not path.is_file():
        raise CalibrationError(
            f"calibration text {quote(str(text))} is not an existing file; pass '{BUILTIN}', a path to a "
            "text file, or a list of strings"
        )
    return path


def calibration_data(settings: Optional[CalibrationSettings], tokenizer: Any, model: Optional[nn.Module] = None) -> CalibrationData:
    """The calibration batches ``settings`` (None: the defaults) describe, drawn with ``tokenizer``;
    without a ``unit``, sentences for encoders and windows otherwise."""
    settings = settings or CalibrationSettings()
    if tokenizer is None:
        raise CalibrationError(
            "calibrated methods (gptq, awq) need calibration text: pass tokenizer= (or calibration=) to compress"
        )
    unit = settings.unit or (SENTENCE if model is not None and model_kind(model) == ENCODER else WINDOW)
    text = list(settings.text) if isinstance(settings.text, tuple) else settings.text
    return CalibrationData.from_text(
        tokenizer, text, settings.samples, settings.seq_len, settings.batch_size, unit, settings.chat_template
    )
