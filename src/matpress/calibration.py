"""Calibration: token batches from real text, and the statistics of each linear layer's inputs.

:class:`CalibrationData` turns text (the calibration split of :mod:`matpress.evaluation.text`, a user's
file, or a list of strings) into padded token batches. :func:`collect_stats` runs a model over them with
forward hooks on its linear layers and sums ``x x^T`` and ``|x|`` over the real tokens (padding is
masked out), giving one :class:`~matpress.methods.LayerStats` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError
from matpress.evaluation.text import CALIBRATION, corpus, read_text_file, sentences
from matpress.methods import LayerStats
from matpress.model_pass import find_linear_layers

BUILTIN = "builtin"
WINDOW = "window"  # samples are windows of seq_len tokens of running text (causal LMs)
SENTENCE = "sentence"  # samples are single sentences, padded per batch (sentence encoders)
UNITS = (WINDOW, SENTENCE)

TextSource = Union[None, str, Path, Sequence[str]]


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
        _check_positive(batch_size=batch_size)
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
    ) -> "CalibrationData":
        """Calibration batches from ``text``: None or ``"builtin"`` (the calibration split of the built-in
        corpus, never used for evaluation), a path to a UTF-8 text file, or a list of strings.

        ``unit="window"``: ``n_samples`` windows of ``seq_len`` tokens spread evenly over the running
        text (fewer if the text is short; an error if it holds less than one window). ``unit="sentence"``:
        ``n_samples`` sentences spread evenly over the text, each truncated to ``seq_len`` tokens and
        padded per batch, which matches how sentence encoders are used.
        """
        _check_positive(n_samples=n_samples, seq_len=seq_len, batch_size=batch_size)
        if unit not in UNITS:
            raise CalibrationError(f"calibration unit must be one of {list(UNITS)}, got {unit!r}")
        if tokenizer is None:
            raise CalibrationError("calibration needs the model's tokenizer; none was given")
        if unit == WINDOW:
            running, source = _running_text(text)
            ids = tokenizer(running, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            available = len(ids) // seq_len
            if available == 0:
                raise CalibrationError(
                    f"calibration text ({source}) has {len(ids)} tokens, fewer than one sequence of "
                    f"{seq_len}; give more text or a smaller seq_len"
                )
            windows = ids[: available * seq_len].view(available, seq_len)[_spread(available, n_samples)]
            return cls.from_token_ids(windows, batch_size, source=f"{source}: {len(windows)} windows of {seq_len} tokens")
        found, source = _sentence_list(text)
        found = [found[i] for i in _spread(len(found), n_samples).tolist()]
        if getattr(tokenizer, "pad_token", None) is None:
            raise CalibrationError(
                "the tokenizer has no padding token, so sentences cannot be batched; use unit='window'"
            )
        batches = []
        for i in range(0, len(found), batch_size):
            enc = tokenizer(found[i : i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
            batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return cls(batches, f"{source}: {len(found)} sentences")


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CalibrationError(f"calibration {key} must be a positive integer, got {value!r}")


def _spread(available: int, wanted: int) -> torch.Tensor:
    """Indices of ``min(available, wanted)`` items spread evenly over ``available``, so calibration sees
    the whole text rather than its first topics."""
    n = min(available, wanted)
    return torch.linspace(0, available - 1, n).round().long()


def _user_texts(text: Sequence[str]) -> list[str]:
    texts = [t for t in text if isinstance(t, str) and t.strip()]
    if len(texts) != len(text):
        raise CalibrationError("calibration texts must all be non-empty strings")
    if not texts:
        raise CalibrationError("calibration text is empty: pass 'builtin', a text file, or non-empty strings")
    return texts


def _running_text(text: TextSource) -> tuple[str, str]:
    if text is None or text == BUILTIN:
        return corpus(CALIBRATION), "pydoc_data.topics (calibration split)"
    if isinstance(text, (str, Path)):
        return read_text_file(_existing_file(text)), str(text)
    return "\n\n".join(_user_texts(text)), "given texts"


def _sentence_list(text: TextSource) -> tuple[list[str], str]:
    if text is None or text == BUILTIN:
        return sentences(split=CALIBRATION), "pydoc_data.topics (calibration split)"
    if isinstance(text, (str, Path)):
        return sentences(text_file=_existing_file(text)), str(text)
    return _user_texts(text), "given texts"


def _existing_file(text: Union[str, Path]) -> Path:
    if not str(text).strip():
        raise CalibrationError("calibration text is empty: pass 'builtin', a text file, or non-empty strings")
    path = Path(text)
    if not path.is_file():
        raise CalibrationError(
            f"calibration text {str(text)[:80]!r} is not an existing file; pass '{BUILTIN}', a path to a "
            "text file, or a list of strings"
        )
    return path


class StatsCollector:
    """Forward pre-hooks summing each watched linear layer's inputs into a :class:`LayerStats`.

    Set :attr:`mask` (``(batch, seq)`` bool, True on real tokens) before each forward so that padding
    never enters the statistics; inputs whose leading shape differs from the mask are taken whole.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.mask: Optional[torch.Tensor] = None
        self.stats: dict[str, LayerStats] = {}
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).float()
            st = self.stats.get(name)
            if st is None:
                n = x.shape[-1]
                st = self.stats[name] = LayerStats(
                    torch.zeros(n, n, device=x.device), 0, torch.zeros(n, device=x.device)
                )
            st.xtx.addmm_(x.T, x)
            st.abs_sum.add_(x.abs().sum(0))
            st.n_tokens += x.shape[0]

        return hook


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def batch_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["attention_mask"].bool()


def select_layers(model: nn.Module, layer_names: Optional[Iterable[str]]) -> dict[str, nn.Module]:
    """The linear layers of ``model`` named in ``layer_names`` (all when None), with clear errors."""
    layers = find_linear_layers(model)
    if not layers:
        raise CalibrationError(f"this {type(model).__name__} has no linear layers (nn.Linear / Conv1D) to calibrate")
    if layer_names is None:
        return layers
    names = list(layer_names)
    missing = [n for n in names if n not in layers]
    if missing:
        raise CalibrationError(
            f"layer(s) {missing[:5]} are not linear layers of this {type(model).__name__}; "
            f"its linear layers include {list(layers)[:5]}"
        )
    if not names:
        raise CalibrationError("no layers were named to calibrate")
    return {n: layers[n] for n in names}


@torch.inference_mode()
def collect_stats(
    model: nn.Module,
    data: CalibrationData,
    layer_names: Optional[Iterable[str]] = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Run ``model`` (uncompressed) over ``data`` and return the input statistics of its linear layers
    (those in ``layer_names``, or all), padding tokens masked out."""
    layers = select_layers(model, layer_names)
    if not data.batches:
        raise CalibrationError("calibration data holds no batches")
    device = model_device(model)
    with StatsCollector(layers) as collector:
        for batch in tqdm(data.batches, desc="calibrating", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            collector.mask = batch_mask(batch)
            model(**batch)
    return collector.stats
