"""Statistics of linear layers' inputs: forward pre-hooks sum ``x x^T`` and ``|x|`` over the real tokens
(padding masked out) into one :class:`~matpress.methods.LayerStats` per layer."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError
from matpress.methods import LayerStats
from matpress.nn.layout import find_linear_layers
from matpress.walk.data import CalibrationData

class StatsCollector:
    """Forward pre-hooks summing each watched linear layer's inputs into a :class:`LayerStats`.

    Set :attr:`mask` (``(batch, seq)`` bool, True on real tokens) before each forward so that padding
    never enters the statistics; inputs whose leading shape differs from the mask are taken whole.
    Set :attr:`references` (layer name -> its input in the uncompressed model on the same batch, as the
    collector keeps inputs: real tokens, ``(tokens, in)``) to sum ``x_ref x^T`` as well
    (:attr:`LayerStats.cross`); a layer whose input does not line up with its reference token for
    token (an expert: the uncompressed router picked other tokens) gets no cross term. With the cross
    terms come the sums of every other batch (:attr:`LayerStats.fold`).
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.mask: Optional[torch.Tensor] = None
        self.references: Optional[dict[str, torch.Tensor]] = None
        self.stats: dict[str, LayerStats] = {}
        self._unaligned: set[str] = set()
        self._batches: dict[str, int] = {}  # batches with a cross term so far, per layer (for the folds)
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in self._unaligned:
            if name in self.stats:
                self.stats[name].cross = self.stats[name].fold = None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = real_tokens(args[0].detach(), self.mask).float()
            st = self.stats.get(name)
            if st is None:
                n = x.shape[-1]
                st = self.stats[name] = LayerStats(
                    torch.zeros(n, n, device=x.device), 0, torch.zeros(n, device=x.device)
                )
            st.xtx.addmm_(x.T, x)
            st.abs_sum.add_(x.abs().sum(0))
            st.n_tokens += x.shape[0]
            reference = None if self.references is None else self.references.get(name)
            if reference is not None and name not in self._unaligned:
                # every token needs its reference: from the layer's first batch on, shape for shape
                if reference.shape != x.shape or (st.cross is None and st.n_tokens != x.shape[0]):
                    self._unaligned.add(name)
                else:
                    reference = reference.to(x.device, torch.float32)
                    if st.cross is None:
                        st.cross = torch.zeros_like(st.xtx)
                        st.fold = (torch.zeros_like(st.xtx), torch.zeros_like(st.xtx), 0)
                        self._batches[name] = 0
                    st.cross.addmm_(reference.T, x)
                    if self._batches[name] % 2 == 0:
                        xtx, cross, n = st.fold
                        st.fold = (xtx.addmm_(x.T, x), cross.addmm_(reference.T, x), n + x.shape[0])
                    self._batches[name] += 1
            elif st.cross is not None:  # a batch without its reference
                self._unaligned.add(name)

        return hook


def real_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """A layer's input ``(..., in)`` as ``(tokens, in)``, without the padding tokens of ``mask``
    (``(batch, seq)``, True on real tokens) where its leading shape is the mask's."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape) and not bool(mask.all()):
        x = x[mask.to(x.device)]  # (windows of running text have no padding: no copy)
    return x.reshape(-1, x.shape[-1])


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
