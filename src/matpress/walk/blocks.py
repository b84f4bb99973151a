"""The model's repeated blocks and what runs through them: find the blocks, catch the first block's
inputs on calibration data (and keyword arguments such as attention masks and position embeddings),
trace a block's submodule calls, group its linear layers into execution stages (the layers sharing an
input, such as q/k/v, together) and collect a stage's input statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError
from matpress.methods import LayerStats
from matpress.nn.layout import is_linear
from matpress.walk.data import CalibrationData
from matpress.walk.replay import BlockReplay
from matpress.walk.stats import StatsCollector, batch_mask, model_device, real_tokens

class _BlockInputsCaught(Exception):
    """Raised by the hook on the first block once its inputs are recorded: the rest of the model need
    not run."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


@dataclass
class BlockInput:
    """One calibration batch as a block sees it: the hidden states, the block's other arguments, and
    the batch's padding mask."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor

    def run(self, block: nn.Module, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block's output on this batch (on ``hidden`` in place of the batch's hidden states)."""
        out = block(self.hidden if hidden is None else hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated transformer blocks: the ``nn.ModuleList`` whose members hold the most linear
    layers (``model.layers`` of Llama, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(is_linear(m) for m in module.modules())
            if count > best_count and all(any(is_linear(m) for m in child.modules()) for child in module):
                best, best_count = (name, module), count
    if best is None:
        raise CalibrationError(
            f"no repeated blocks (an nn.ModuleList of modules holding linear layers) found in this "
            f"{type(model).__name__}; pass precomputed stats= to compress instead"
        )
    return best


def _without_cache(value: Any) -> Any:
    """Blocks are re-run many times: never let them append to a key/value cache."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return value
    return None if isinstance(value, Cache) else value


@torch.inference_mode()
def capture_block_inputs(model: nn.Module, block: nn.Module, data: CalibrationData, progress: bool = False) -> list[BlockInput]:
    """Run ``model`` over ``data`` up to ``block`` and return what ``block`` receives for each batch
    (``progress``: a bar over the batches)."""
    if not data.batches:
        raise CalibrationError("calibration data holds no batches")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _BlockInputsCaught(args, kwargs)

    device = model_device(model)
    inputs = []
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tqdm(data.batches, desc="capturing calibration inputs", unit="batch", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                model(**batch)
            except _BlockInputsCaught as caught:
                args, kwargs = list(caught.args), dict(caught.kwargs)
                hidden = args.pop(0) if args else kwargs.pop("hidden_states")
                args = tuple(_without_cache(a) for a in args)
                kwargs = {k: _without_cache(v) for k, v in kwargs.items()}
                if "use_cache" in kwargs:
                    kwargs["use_cache"] = False
                inputs.append(BlockInput(hidden, args, kwargs, batch_mask(batch)))
            else:
                raise CalibrationError(f"the model never called its block {type(block).__name__} on calibration data")
    finally:
        handle.remove()
    return inputs


@dataclass
class Call:
    """One submodule call seen while tracing a block: its input (first argument) and output tensors."""

    name: str
    module: nn.Module
    input: Optional[torch.Tensor]
    output: Optional[torch.Tensor]


@torch.inference_mode()
def trace_block(block: nn.Module, sample: BlockInput) -> list[Call]:
    """Every submodule call of one run of ``block``, in order of completion (leaves in call order).
    The traced tensors are kept alive, so tensor identity tells which call fed which."""
    calls: list[Call] = []

    def hook(module: nn.Module, args: tuple, out: Any, name: str) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = out[0] if isinstance(out, (tuple, list)) and out else out
        calls.append(Call(name, module, first, out if isinstance(out, torch.Tensor) else None))

    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, m in block.named_modules() if name
    ]
    try:
        sample.run(block)
    finally:
        for h in handles:
            h.remove()
    return calls


def execution_stages(calls: list[Call], names: dict[str, str]) -> list[list[str]]:
    """The layers of ``names`` (local name -> model name) in the order the traced block called them,
    consecutive layers reading the very same input tensor grouped in one stage (q/k/v, gate/up)."""
    stages: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for call in calls:
        full = names.get(call.name)
        if full is None or full in seen:
            continue  # not a layer to compress, or a layer called twice: it keeps its first place
        if stages and call.input is last_input:
            stages[-1].append(full)
        else:
            stages.append([full])
        seen.add(full)
        last_input = call.input
    stages.extend([n] for n in names.values() if n not in seen)  # never called on calibration data
    return stages


# layer name -> its input in the uncompressed model, one ``(tokens, in)`` tensor per calibration batch
ReferenceInputs = dict[str, list[torch.Tensor]]


@torch.inference_mode()
def reference_inputs(
    block: nn.Module, head: str, names: list[str], inputs: list[BlockInput], hidden: list[torch.Tensor],
) -> tuple[ReferenceInputs, list[torch.Tensor]]:
    """Run ``block`` (not compressed yet) over ``hidden``, the uncompressed model's hidden states of the
    batches of ``inputs``: the inputs of the layers ``names`` (model names, each called once per
    forward), real tokens only as the statistics take them, and the block's outputs (the next block's
    reference hidden states). Layers reading one tensor (q/k/v) share one stored copy. Only inputs
    holding every token of the batch in place count: a layer fed a selection of tokens (an expert,
    after its router) has no reference, as its tokens need not be the uncompressed model's."""
    layers = {n: block.get_submodule(n[len(head):]) for n in names}
    seen: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # the last input tensor seen and its stored copy

    def hook(name: str):
        def capture(module: nn.Module, args: tuple) -> None:
            if tuple(args[0].shape[:-1]) != tuple(mask.shape):
                return
            if args[0] is not last[0]:
                last[:] = [args[0], real_tokens(args[0].detach(), mask).clone()]
            seen[name] = last[1]
        return capture

    references: ReferenceInputs = {n: [] for n in names}
    outputs = []
    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        for inp, h in zip(inputs, hidden):
            mask = inp.mask
            seen.clear()
            last[:] = [None, None]
            outputs.append(inp.run(block, h))
            for n in names:
                references[n].append(seen.get(n))
    finally:
        for handle in handles:
            handle.remove()
    return {n: refs for n, refs in references.items() if all(r is not None for r in refs)}, outputs


def stage_stats(
    block: nn.Module, head: str, names: list[str], inputs: list[BlockInput], called: Counter,
    replay: Optional[BlockReplay] = None, references: Optional[ReferenceInputs] = None,
) -> dict[str, LayerStats]:
    """Statistics of the layers ``names`` of one stage. They read the very same input tensor, so one
    layer's statistics serve them all, collected once; a layer called more than once per forward sums
    several inputs, and then each layer is collected on its own. Layers called once per forward need
    the block only up to their inputs, so its forward stops there. ``replay``: the block's runs reuse
    what earlier runs computed before the layers changed since (:mod:`matpress.walk.replay`).
    ``references``: the layers' inputs in the uncompressed model, for the cross terms."""
    once = all(called[n] == 1 for n in names)
    if len(names) > 1 and once:
        first = block_stats(block, head, names[:1], inputs, stop_early=True, replay=replay, changing=names, references=references)
        return {n: first[names[0]] for n in names} if first else {}
    return block_stats(block, head, names, inputs, stop_early=once, replay=replay, references=references)


class _StageInputsSeen(Exception):
    """Raised once the last layer of a stage has received its input: the rest of the block need not run."""


def _stop_forward(module: nn.Module, args: tuple) -> None:
    raise _StageInputsSeen


@torch.inference_mode()
def block_stats(
    block: nn.Module, head: str, names: list[str], inputs: list[BlockInput], stop_early: bool = False,
    replay: Optional[BlockReplay] = None, changing: Optional[list[str]] = None, references: Optional[ReferenceInputs] = None,
) -> dict[str, LayerStats]:
    """Statistics of the layers ``names`` on ``inputs``; with ``stop_early`` (each layer called once per
    forward, ``names`` in call order) each forward stops at the last layer's input. ``replay``: run the
    block through it, keeping what comes before the layers ``changing`` (default ``names``: the layers
    the caller compresses next) for the next run. ``references``: sum the cross terms with these
    inputs of the uncompressed model (:class:`~matpress.walk.stats.StatsCollector`)."""
    if not names:
        return {}
    layers = {n: block.get_submodule(n[len(head):]) for n in names}
    with StatsCollector(layers) as collector:
        # registered after the collector's hooks, so the last layer's input is summed before the stop
        stop = layers[names[-1]].register_forward_pre_hook(_stop_forward) if stop_early else None
        try:
            keep_before = [n[len(head):] for n in (changing or names)]
            for k, inp in enumerate(inputs):
                collector.mask = inp.mask
                if references:
                    collector.references = {n: references[n][k] for n in names if n in references}
                try:
                    if replay is None:
                        inp.run(block)
                    else:
                        replay.run(k, lambda: inp.run(block), keep_before)
                except _StageInputsSeen:
                    pass
        finally:
            if stop is not None:
                stop.remove()
    return collector.stats
