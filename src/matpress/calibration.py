"""Calibration: token batches from real text, the statistics of each linear layer's inputs, and the
memory-bounded block-by-block compression pass.

:class:`CalibrationData` turns text (the calibration split of :mod:`matpress.evaluation.text`, a user's
file, or a list of strings) into padded token batches. :func:`collect_stats` runs a model over them with
forward hooks on its linear layers and sums ``x x^T`` and ``|x|`` over the real tokens (padding is
masked out), giving one :class:`~matpress.methods.LayerStats` per layer.

:func:`compress_sequential` is what :func:`matpress.compress` runs for calibrated methods: it finds the
model's repeated transformer blocks, catches the first block's inputs (and keyword arguments such as
attention masks and position embeddings), then per block collects statistics of its linear layers in
execution order (the layers sharing an input, such as q/k/v, together), compresses them, and runs the
compressed block to make the next block's inputs. Later layers thus see the errors of earlier ones and
compensate for them, as in GPTQ, and only one block's activations are held at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import dataclasses
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError, quote
from matpress.evaluation.text import CALIBRATION, corpus, read_text_file, sentences
from matpress.inputs import check_text
from matpress.methods import LayerStats, get_method
from matpress.model_pass import LayerReport, compress_layer, find_linear_layers, is_linear
from matpress.models import ENCODER, model_kind
from matpress.recipe import Rule

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
            raise CalibrationError(f"calibration unit must be one of {list(UNITS)}, got {quote(unit)}")
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
            raise CalibrationError(f"calibration {key} must be a positive integer, got {quote(value)}")


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
            f"calibration text {quote(str(text))} is not an existing file; pass '{BUILTIN}', a path to a "
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


@dataclass(frozen=True)
class CalibrationSettings:
    """A recipe's ``calibration`` entry: text (``builtin``, a file path, or a list of strings), samples,
    seq_len, batch_size, and unit (``window`` or ``sentence``; None: by model kind)."""

    text: Union[str, tuple[str, ...]] = BUILTIN
    samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    unit: Optional[str] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.text, str) and self.text.strip()) and not (
            isinstance(self.text, tuple) and self.text and all(isinstance(t, str) for t in self.text)
        ):
            raise CalibrationError(f"calibration text must be '{BUILTIN}', a file path or a list of strings, got {quote(self.text)}")
        _check_positive(samples=self.samples, seq_len=self.seq_len, batch_size=self.batch_size)
        if self.unit is not None and self.unit not in UNITS:
            raise CalibrationError(f"calibration unit must be one of {list(UNITS)}, got {quote(self.unit)}")

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

    def data(self, tokenizer: Any, model: Optional[nn.Module] = None) -> CalibrationData:
        """The calibration batches; without a ``unit``, sentences for encoders and windows otherwise."""
        if tokenizer is None:
            raise CalibrationError(
                "calibrated methods (gptq, awq) need calibration text: pass tokenizer= (or calibration=) to compress"
            )
        unit = self.unit or (SENTENCE if model is not None and model_kind(model) == ENCODER else WINDOW)
        text = list(self.text) if isinstance(self.text, tuple) else self.text
        return CalibrationData.from_text(tokenizer, text, self.samples, self.seq_len, self.batch_size, unit)


# -- the block-by-block pass -------------------------------------------------------------------------


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

    def run(self, block: nn.Module) -> torch.Tensor:
        out = block(self.hidden, *self.args, **self.kwargs)
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
def capture_block_inputs(model: nn.Module, block: nn.Module, data: CalibrationData) -> list[BlockInput]:
    """Run ``model`` over ``data`` up to ``block`` and return what ``block`` receives for each batch."""
    if not data.batches:
        raise CalibrationError("calibration data holds no batches")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _BlockInputsCaught(args, kwargs)

    device = model_device(model)
    inputs = []
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in data.batches:
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
class _Call:
    """One submodule call seen while tracing a block: its input (first argument) and output tensors."""

    name: str
    module: nn.Module
    input: Optional[torch.Tensor]
    output: Optional[torch.Tensor]


@torch.inference_mode()
def trace_block(block: nn.Module, sample: BlockInput) -> list[_Call]:
    """Every submodule call of one run of ``block``, in order of completion (leaves in call order).
    The traced tensors are kept alive, so tensor identity tells which call fed which."""
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, out: Any, name: str) -> None:
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = out[0] if isinstance(out, (tuple, list)) and out else out
        calls.append(_Call(name, module, first, out if isinstance(out, torch.Tensor) else None))

    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name, m in block.named_modules() if name
    ]
    try:
        sample.run(block)
    finally:
        for h in handles:
            h.remove()
    return calls


def execution_stages(calls: list[_Call], names: dict[str, str]) -> list[list[str]]:
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


def _scale_rows(module: nn.Module, s: torch.Tensor) -> None:
    """Divide a module's output channels by ``s`` (a norm's weight vector, or a linear layer's rows)."""
    if is_linear(module) and not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
        module.weight.data /= s
    else:
        module.weight.data /= s.view(-1, *[1] * (module.weight.dim() - 1))
    if getattr(module, "bias", None) is not None:
        module.bias.data /= s


def _scale_inputs(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear layer's input columns by ``s``."""
    if isinstance(module, nn.Linear):
        module.weight.data *= s
    else:
        module.weight.data *= s.unsqueeze(1)


@torch.inference_mode()
def fold_awq_scales(
    model: nn.Module, block: nn.Module, head: str, stages: list[list[str]], chosen: dict[str, Rule],
    inputs: list[BlockInput], calls: list[_Call],
) -> dict[str, Rule]:
    """AWQ with folding (Lin et al. 2023): for each stage of ``awq`` layers sharing an input, search one
    scale ``s`` on the uncompressed block, multiply the layers' input columns by ``s`` and divide the
    producer of their input by ``s``: a norm whose output they read, or else the nearest earlier linear
    layer of the block with that many outputs (v_proj for o_proj, up_proj for down_proj). A fold is kept
    only if the block's output stays the same (so a norm also feeding a residual, or a linear followed
    by a nonlinearity, is left alone). Returns the rules of the folded layers from now on: their scale
    lives in the producer, so their own AWQ pass searches none (``grid=0``)."""
    from matpress.methods.awq import search_input_scale
    from matpress.model_pass import linear_weight

    by_name = {call.name: call for call in calls}
    candidates: dict[int, tuple[list[str], list[nn.Module]]] = {}
    for k, stage in enumerate(stages):
        rules = {chosen[n] for n in stage}
        first = by_name.get(stage[0][len(head):])
        if first is None or len(rules) != 1 or not all(r.method == "awq" and r.params.fold for r in rules):
            continue
        n = first.input.shape[-1]
        position = calls.index(first)
        modules = [model.get_submodule(name) for name in stage]
        producers = [  # a norm whose output the stage reads, then earlier linear layers, nearest first
            c.module for c in calls[:position]
            if c.output is first.input and getattr(c.module, "weight", None) is not None
            and c.module.weight.dim() == 1 and c.module.weight.numel() == n
        ] + [
            c.module for c in reversed(calls[:position])
            if is_linear(c.module) and c.module not in modules and linear_weight(c.module).shape[0] == n
        ]
        if producers:
            candidates[k] = (stage, modules, producers)
    if not candidates:
        return {}
    stats = _block_stats(block, head, [stage[0] for stage, _, _ in candidates.values()], inputs)
    reference = inputs[0].run(block)
    folded: dict[str, Rule] = {}
    for stage, modules, producers in candidates.values():
        rule = chosen[stage[0]]
        params = rule.params
        weights = [linear_weight(m).float() for m in modules]
        s = search_input_scale(weights, stats[stage[0]], params.bits, params.group_size, params.symmetric, params.grid)
        if s is None:
            continue

        def fold(producer: nn.Module, factor: torch.Tensor) -> None:
            _scale_rows(producer, factor)
            for m in modules:
                _scale_inputs(m, factor)

        for producer in producers:
            fold(producer, s)
            out = inputs[0].run(block)
            if float((out - reference).norm()) <= 1e-4 * float(reference.norm()):
                after = dataclasses.replace(rule, params=dataclasses.replace(params, grid=0))
                folded.update({name: after for name in stage})
                break
            fold(producer, 1 / s)  # undo: the block computes something else now
    return folded


def compress_sequential(
    model: nn.Module, chosen: dict[str, Rule], data: CalibrationData, progress: bool = True
) -> list[LayerReport]:
    """Compress the layers in ``chosen`` (name -> rule) block by block on ``data``: see the module doc."""
    prefix, blocks = find_blocks(model)
    reports: dict[str, LayerReport] = {}
    inputs = capture_block_inputs(model, blocks[0], data)
    for i, block in enumerate(tqdm(blocks, desc="compressing blocks", unit="block", disable=not progress)):
        head = f"{prefix}.{i}." if prefix else f"{i}."
        names = {n[len(head):]: n for n in chosen if n.startswith(head)}
        if names:
            calls = trace_block(block, inputs[0])
            stages = execution_stages(calls, names)
            folded = fold_awq_scales(model, block, head, stages, chosen, inputs, calls)
            called = Counter(head + call.name for call in calls)
            del calls
            for stage in stages:
                stats = _stage_stats(block, head, [n for n in stage if get_method(chosen[n].method).needs_calibration], inputs, called)
                for name in stage:
                    reports[name] = compress_layer(model, name, folded.get(name, chosen[name]), stats.get(name))
        if i + 1 < len(blocks):
            with torch.inference_mode():
                for inp in inputs:  # in place: the previous block's activations are dropped as we go
                    inp.hidden = inp.run(block)
    del inputs
    rest = [n for n in chosen if n not in reports]
    calibrated = [n for n in rest if get_method(chosen[n].method).needs_calibration]
    stats = collect_stats(model, data, calibrated, progress=False) if calibrated else {}
    for name in rest:  # layers outside the blocks (e.g. a pooler or an included lm_head), on the compressed model
        reports[name] = compress_layer(model, name, chosen[name], stats.get(name))
    return [reports[n] for n in chosen]


def _stage_stats(
    block: nn.Module, head: str, names: list[str], inputs: list[BlockInput], called: Counter
) -> dict[str, LayerStats]:
    """Statistics of the layers ``names`` of one stage. They read the very same input tensor, so one
    layer's statistics serve them all, collected once; a layer called more than once per forward sums
    several inputs, and then each layer is collected on its own."""
    if len(names) > 1 and all(called[n] == 1 for n in names):
        first = _block_stats(block, head, names[:1], inputs)
        return {n: first[names[0]] for n in names} if first else {}
    return _block_stats(block, head, names, inputs)


@torch.inference_mode()
def _block_stats(block: nn.Module, head: str, names: list[str], inputs: list[BlockInput]) -> dict[str, LayerStats]:
    if not names:
        return {}
    layers = {n: block.get_submodule(n[len(head):]) for n in names}
    with StatsCollector(layers) as collector:
        for inp in inputs:
            collector.mask = inp.mask
            inp.run(block)
    return collector.stats
