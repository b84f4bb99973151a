"""Re-running one block over the same calibration batch without recomputing what has not changed.

The sequential pass runs each block over its calibration batches once per stage (the statistics of
q/k/v, then of o, of gate/up, of down) and once more to propagate, compressing a stage's layers between
runs. Everything a run computes before its first call of a changed submodule is a function of the
block's input and of unchanged modules only, so it equals what the previous run computed: a
:class:`BlockReplay` keeps the outputs of those calls from one run and hands them back in the next,
so each run computes only from the first changed layer on (about one block forward in all, instead of
about three, and the attention once fewer times per stage).

What counts as changed: a submodule whose object, or any of whose own parameters or buffers (object,
storage or in-place version), differs from the previous run's. The kept outputs are copies, so code
that modifies a submodule's output in place cannot alter them; outputs other than tensors (or tuples
of tensors and None) are never kept. The memory held is one block's intermediate activations over
the batch at most: only the outermost calls that ended before ``keep_before``'s layers were first
called are kept.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

# A call: (the enclosing call's key or None, the submodule's name, how many times the enclosing call had
# called it before), so a call skipped by reuse cannot shift the numbering of calls elsewhere.
CallKey = tuple


def module_state(module: nn.Module) -> tuple:
    """What identifies a submodule's computation: the object and its own tensors (object, storage, and
    the in-place version where the tensor keeps one: inference tensors do not)."""
    tensors = [t for t in itertools.chain(module._parameters.values(), module._buffers.values()) if t is not None]
    return (id(module), tuple((id(t), t.data_ptr(), _version(t)) for t in tensors))


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: cannot be changed in place outside inference mode
        return None


def _copy(output: Any) -> Any:
    """A copy of a tensor output (or a tuple of tensors and None); None when it is anything else."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return tuple(None if o is None else o.clone() for o in output)
    return None


def _inside(call: CallKey, outer: CallKey) -> bool:
    """Whether ``call`` ran inside ``outer`` (at any depth)."""
    parent = call[0]
    while parent is not None:
        if parent == outer:
            return True
        parent = parent[0]
    return False


@dataclass
class _Run:
    """What one run recorded: each call's end (on one event clock of call starts and ends), the earliest start seen
    for each submodule name (a replayed call's descendants start with it), the module states, and the
    outputs kept."""

    states: dict[str, tuple]
    ends: dict[CallKey, int] = field(default_factory=dict)
    first_start: dict[str, int] = field(default_factory=dict)
    kept: dict[CallKey, Any] = field(default_factory=dict)

    def reusable(self, states: dict[str, tuple]) -> dict[CallKey, Any]:
        """The kept outputs still valid under the modules' current ``states``: those of calls that ended
        before the recorded run first reached a submodule changed since."""
        changed = [n for n in set(self.states) | set(states) if self.states.get(n) != states.get(n)]
        bound = min((self._start_of(n) for n in changed), default=math.inf)
        return {key: out for key, out in self.kept.items() if self.ends[key] < bound}

    def _start_of(self, name: str) -> float:
        """When the recorded run first reached ``name``; a name it never reached counts from its closest
        ancestor's start (the block itself: 0), as its parent may have called it anyway."""
        while name not in self.first_start:
            if not name:
                return 0
            name = name.rpartition(".")[0]
        return self.first_start[name]


class BlockReplay:
    """Runs of one ``block`` over calibration batches, each batch (by index) reusing what its previous
    run computed that no change has touched since: see the module doc."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.runs: dict[int, _Run] = {}

    def run(self, batch: int, forward: Callable[[], Any], keep_before: Optional[Iterable[str]] = None) -> Any:
        """``forward()`` (a run of the block on batch number ``batch``), reusing the previous run's valid
        outputs. ``keep_before``: local names of the layers the caller will change next; the outputs of
        calls ending before the first of them is reached are kept for the next run (None: keep nothing)."""
        modules = dict(self.block.named_modules())
        states = {name: module_state(m) for name, m in modules.items()}
        previous = self.runs.pop(batch, None)
        reuse = previous.reusable(states) if previous is not None else {}
        record = _Run(states, first_start={"": 0})
        bounds = set(keep_before) if keep_before is not None else None
        clock = itertools.count(1)
        stack: list[CallKey] = []
        counts: dict[tuple, int] = {}
        reached: list[bool] = [bounds is None]  # once a keep_before layer is reached, nothing more is kept

        def pre_hook(name: str) -> Callable:
            def record_start(module: nn.Module, args: tuple) -> None:
                parent = stack[-1] if stack else None
                key = (parent, name, counts.get((parent, name), 0))
                counts[(parent, name)] = key[2] + 1
                start = next(clock)
                stack.append(key)
                record.first_start.setdefault(name, start)
                if key in reuse:  # its descendants will not be called: they start with it
                    for sub in modules:
                        if sub.startswith(name + "."):
                            record.first_start.setdefault(sub, start)
                if bounds is not None and name in bounds:
                    reached[0] = True
            return record_start

        def post_hook(name: str) -> Callable:
            def record_end(module: nn.Module, args: tuple, output: Any) -> None:
                key = stack.pop()
                record.ends[key] = next(clock)
                if reached[0]:
                    return
                kept = reuse[key] if key in reuse else _copy(output)
                if kept is not None:
                    for inner in [k for k in record.kept if _inside(k, key)]:
                        del record.kept[inner]  # only the outermost calls are kept
                    record.kept[key] = kept
            return record_end

        def replayed(name: str, original: Callable) -> Callable:
            def forward_or_reuse(*args: Any, **kwargs: Any) -> Any:
                key = stack[-1]  # the pre-hook just pushed this call
                return _copy(reuse[key]) if key in reuse else original(*args, **kwargs)
            return forward_or_reuse

        handles = []
        overridden: dict[str, Optional[Callable]] = {}
        try:
            for name, module in modules.items():
                if not name:
                    continue
                handles.append(module.register_forward_pre_hook(pre_hook(name), prepend=True))
                handles.append(module.register_forward_hook(post_hook(name), prepend=True))
            for name in {key[1] for key in reuse}:
                module = modules[name]
                overridden[name] = module.__dict__.get("forward")
                module.forward = replayed(name, module.forward)
            return forward()
        finally:
            for handle in handles:
                handle.remove()
            for name, before in overridden.items():
                if before is None:
                    del modules[name].__dict__["forward"]
                else:
                    modules[name].forward = before
            if bounds is not None:
                self.runs[batch] = record
