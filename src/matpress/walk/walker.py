"""The walk: one way through a model for every pass.

:func:`walk` yields the model's layers to compress block by block, as :class:`Block` objects: the
block's layers grouped in execution stages (the layers sharing one input, such as q/k/v, together)
and, when the walk has calibration data, the statistics of a stage's inputs on request. When the
consumer is done with a block (it compressed the block's layers, say), the walk runs the block over
the captured inputs to make the next block's inputs, so that later layers see the errors of earlier
ones (``propagate``; without it, the next inputs are the original block's outputs, computed before
the consumer changes the block). Only one block's activations are held at a time (two without
propagation). The layers outside the blocks (a pooler, an included lm_head) come last, as one more
:class:`Block` of one stage (read together, like a block), whose statistics come from running the
whole model.

Without data the walk still goes block by block, each layer a stage of its own (nothing is traced),
with the statistics given to it, if any. A :class:`BlockSource` sees each block just before the walk
uses it and just after it is done with it: the point where weights streamed from disk are materialised
and released. By default that is the model's own stream (:class:`~matpress.walk.source.BlockStream`):
a model loaded streamed reads each block's parameters from its safetensors files, and gives them back
after; on any other model the stream does nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError
from matpress.methods import BlockView, LayerStats, get_method
from matpress.nn import decoded_forwards
from matpress.nn.layout import is_linear, linear_weight, scale_inputs, scale_rows
from matpress.recipe import Rule
from matpress.walk.blocks import (
    BlockInput, Call, ReferenceInputs, block_stats, capture_block_inputs, execution_stages, find_blocks, reference_inputs, stage_stats,
    trace_block,
)
from matpress.walk.replay import BlockReplay
from matpress.walk.data import CalibrationData
from matpress.walk.source import BlockStream, materialised
from matpress.walk.stats import collect_stats


class BlockSource(Protocol):
    """Where the weights of a walk's blocks come from. :meth:`materialise` gets a block's qualified name
    and module before the walk traces, measures or runs it; :meth:`release` after the walk is done with
    it (its layers consumed, its outputs propagated). Parameters outside the blocks run for every batch:
    they must stay in memory for the whole walk."""

    def materialise(self, name: str, module: nn.Module) -> None: ...

    def release(self, name: str, module: nn.Module) -> None: ...


@dataclass
class Block:
    """One step of a walk: ``module`` (the model itself for the layers outside the blocks) and the walk's
    layers in it as ``stages`` of model names, in execution order. ``changed``: the rules the block
    hooks of the layers' methods changed (AWQ folds its scales into neighbouring layers, and the folded
    layers then search no scale of their own)."""

    name: str
    module: nn.Module
    stages: list[list[str]]
    changed: dict[str, Rule] = field(default_factory=dict)
    model: Optional[nn.Module] = field(default=None, repr=False)
    inputs: Optional[list[BlockInput]] = field(default=None, repr=False)
    data: Optional[CalibrationData] = field(default=None, repr=False)
    given: Optional[dict[str, LayerStats]] = field(default=None, repr=False)
    called: Counter = field(default_factory=Counter, repr=False)
    decoded: dict = field(default_factory=dict, repr=False)  # the block's compressed layers, decoded once
    replay: Optional[BlockReplay] = field(default=None, repr=False)
    references: Optional[ReferenceInputs] = field(default=None, repr=False)  # the layers' inputs in the uncompressed model

    def stats(self, names: Iterable[str]) -> dict[str, LayerStats]:
        """Input statistics of the layers ``names`` (of one stage), collected now: on the block's inputs
        as the walk made them (on the whole model for the layers outside the blocks), or taken from the
        statistics given to the walk; empty without either."""
        names = list(names)
        if self.given is not None:
            return {n: self.given[n] for n in names if n in self.given}
        if self.data is None or not names:
            return {}
        if self.inputs is None:
            with materialised(self.model, ""):  # the whole model runs: a streamed one reads all of it
                return collect_stats(self.model, self.data, names, progress=False)
        with decoded_forwards(self.module, self.decoded):
            return stage_stats(self.module, f"{self.name}.", names, self.inputs, self.called, self.replay, self.references)


class TracedBlock(BlockView):
    """The :class:`~matpress.methods.BlockView` a method's block hook gets: one traced run of the block
    on the first calibration batch, and the model's weight layout."""

    def __init__(self, model: nn.Module, block: nn.Module, head: str, stages: list[list[str]], calls: list[Call], inputs: list[BlockInput]):
        self.model, self.block, self.head, self.stages, self.calls, self.inputs = model, block, head, stages, calls, inputs

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def call_of(self, name: str) -> Optional[Call]:
        local = name[len(self.head):]
        return next((call for call in reversed(self.calls) if call.name == local), None)

    def run(self) -> torch.Tensor:
        return self.inputs[0].run(self.block)

    def stats(self, names: list[str]) -> dict[str, LayerStats]:
        return block_stats(self.block, self.head, names, self.inputs)

    is_linear = staticmethod(is_linear)
    weight = staticmethod(linear_weight)
    scale_rows = staticmethod(scale_rows)
    scale_inputs = staticmethod(scale_inputs)


def run_block_hooks(view: TracedBlock, rules: dict[str, Rule]) -> dict[str, Rule]:
    """The rules the block hooks of the methods in ``rules`` change (each method's hook once)."""
    changed: dict[str, Rule] = {}
    for method in dict.fromkeys(rule.method for rule in rules.values()):
        hook = get_method(method).block_hook
        if hook is not None:
            changed.update(hook(view, {**rules, **changed}))
    return changed


def walk(
    model: nn.Module,
    names: Sequence[str],
    data: Optional[CalibrationData] = None,
    stats: Optional[dict[str, LayerStats]] = None,
    rules: Optional[dict[str, Rule]] = None,
    propagate: bool = True,
    source: Optional[BlockSource] = None,
    progress: bool = True,
    desc: str = "compressing blocks",
    reference: bool = False,
) -> Iterator[Block]:
    """Walk the layers ``names`` of ``model`` block by block, as the module doc says.

    ``data``: calibration batches (traced stages, statistics, propagation); ``stats``: statistics given
    instead (then nothing runs). ``rules`` (name -> rule): run the block hooks of their methods on each
    traced block. ``source``: told when each block is needed and when it is done with (by default the
    model's stream, see the module doc). ``reference`` (with propagation): also carry the uncompressed
    model's hidden states from block to block, so that the statistics of the blocks' layers called
    once per forward hold the cross terms with their inputs in the uncompressed model
    (:attr:`~matpress.methods.LayerStats.cross`): one more forward per block, and each block's layer
    inputs over the calibration batches held while it is compressed.
    """
    prefix, blocks = _blocks_of(model, data is not None and stats is None)
    stream = source if source is not None else BlockStream(model)
    inputs = None
    reference_hidden: Optional[list[torch.Tensor]] = None
    if blocks is not None and data is not None and stats is None:
        with materialised(model, "", skip=prefix):  # a streamed model: what runs before the first block
            inputs = capture_block_inputs(model, blocks[0], data, progress)
        if reference and propagate:  # without propagation the inputs are the uncompressed model's already
            reference_hidden = [inp.hidden.clone() for inp in inputs]
    walked: set[str] = set()
    reference_next: Optional[list[torch.Tensor]] = None  # the uncompressed model's outputs of the current block
    for i, block in enumerate(tqdm(blocks or [], desc=desc, unit="block", disable=not progress)):
        name = f"{prefix}.{i}" if prefix else str(i)
        local = {n[len(name) + 1:]: n for n in names if n.startswith(name + ".")}
        stream.materialise(name, block)
        decoded: dict = {}  # the forwards over the calibration batches multiply by decoded weights
        replay = BlockReplay(block)  # and reuse what earlier forwards computed before the layers changed
        following = None
        if inputs is not None and not propagate and i + 1 < len(blocks):
            with torch.inference_mode():
                following = [inp.run(block) for inp in inputs]
        if local:
            step = Block(
                name, block, [[n] for n in local.values()], model=model, inputs=inputs, data=data, given=stats, decoded=decoded,
                replay=replay,
            )
            if inputs is not None:
                calls = trace_block(block, inputs[0])
                step.stages = execution_stages(calls, local)
                if rules is not None:
                    step.changed = run_block_hooks(TracedBlock(model, block, name + ".", step.stages, calls, inputs), {n: rules[n] for n in local.values()})
                step.called = Counter(f"{name}.{call.name}" for call in calls)
                del calls
                if reference_hidden is not None:  # after the block hooks: their folds keep the block's function
                    once = [n for n in local.values() if step.called[n] == 1]
                    step.references, reference_next = reference_inputs(block, name + ".", once, inputs, reference_hidden)
            yield step
            walked.update(local.values())
            step.references = None
        if reference_hidden is not None and i + 1 < len(blocks):
            if reference_next is None:  # a block without layers to compress
                with torch.inference_mode():
                    reference_next = [inp.run(block, h) for inp, h in zip(inputs, reference_hidden)]
            reference_hidden, reference_next = reference_next, None
        if inputs is not None and i + 1 < len(blocks):
            with torch.inference_mode(), decoded_forwards(block, decoded):
                for k, inp in enumerate(inputs):  # in place: the previous block's activations are dropped as we go
                    inp.hidden = replay.run(k, lambda: inp.run(block)) if following is None else following[k]
        del decoded, replay
        stream.release(name, block)
    del inputs
    rest = [n for n in names if n not in walked]
    if rest:
        for n in rest:
            stream.materialise(n, model.get_submodule(n))
        yield Block("", model, [rest], model=model, data=data if stats is None else None, given=stats)
        for n in rest:
            stream.release(n, model.get_submodule(n))


def _blocks_of(model: nn.Module, needed: bool) -> tuple[str, Optional[nn.ModuleList]]:
    """The model's repeated blocks; a model without any is walked as one piece unless they are
    ``needed`` (to run calibration data through)."""
    try:
        return find_blocks(model)
    except CalibrationError:
        if needed:
            raise
        return "", None
