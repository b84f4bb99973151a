"""Modules whose weight is held in a :class:`Format`: :class:`CompressedLinear` stands in for
``nn.Linear``, :class:`CompressedEmbedding` for ``nn.Embedding``, and :class:`TiedLinear` is an LM head
that multiplies by its input embedding's stored matrix (tied word embeddings)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from matpress import kernels
from matpress.errors import RecipeError
from matpress.formats import Format, format_class


class FormatModule(nn.Module):
    """Holds ``fmt``'s stored tensors as buffers, so ``.to(device)``, ``state_dict()`` and friends see
    them; their dtypes belong to the format and are never changed by ``.half()`` or ``.to(dtype)``."""

    def __init__(self, fmt: Format):
        super().__init__()
        self.format_name = fmt.name
        self.format_config: dict[str, Any] = fmt.config()
        self.fmt = fmt
        self._format_keys = []
        for key, t in fmt.to_tensors().items():
            self.register_buffer(key, t)
            self._format_keys.append(key)

    def _apply(self, fn: Callable, recurse: bool = True) -> "FormatModule":
        super()._apply(fn, recurse)
        self.refresh_format()
        return self

    def refresh_format(self) -> None:
        """Rebuild ``fmt`` on the module's buffers as they are now (moved, or replaced by a loader), each
        in the dtype the format stores it in (undoing casts such as ``.half()``)."""
        for k, t in self.fmt.to_tensors().items():
            if getattr(self, k).dtype != t.dtype:
                setattr(self, k, getattr(self, k).to(t.dtype))
        self.fmt = format_class(self.format_name).from_tensors(
            self.fmt.shape, self.format_config, {k: getattr(self, k) for k in self._format_keys}
        )

    @property
    def weight_nbytes(self) -> int:
        return self.fmt.nbytes


class CompressedLinear(FormatModule):
    """``y = x @ W.T + b`` with ``W`` stored in ``fmt``."""

    decoded: Optional[torch.Tensor] = None  # the decoded weight, inside decoded_forwards only

    def __init__(self, fmt: Format, bias: Optional[torch.Tensor] = None):
        super().__init__(fmt)
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self._set_bias(bias)

    def _set_bias(self, bias: Optional[torch.Tensor]) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoded is not None:
            y = nn.functional.linear(x, self.decoded.to(x.dtype))
        else:
            y = kernels.matmul(self.fmt, x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.fmt.describe()}, "
            f"bpw={self.fmt.bits_per_weight:.3f}"
        )


@contextmanager
def decoded_forwards(module: nn.Module, cache: dict[str, tuple[Format, torch.Tensor]]) -> Iterator[None]:
    """Inside, the :class:`CompressedLinear` layers in ``module`` multiply by their decoded fp32 weights
    (a plain dense product) instead of their formats' kernels. For calibration forwards over thousands
    of tokens: one decode per layer, then the BLAS product, where a format's kernel re-applies its input
    transform and unpacks its codes at every call, and rounds the activations (to int8, or to bf16 on
    large batches); the dense product does not, so calibration sees the compressed weights' error only.
    ``cache`` (submodule name -> (format, decoded weight)), kept by the caller across calls, decodes
    each layer's format once."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, CompressedLinear) and not isinstance(m, TiedLinear)]
    for name, layer in layers:
        if name not in cache or cache[name][0] is not layer.fmt:
            cache[name] = (layer.fmt, layer.fmt.decode(torch.float32))
        layer.decoded = cache[name][1]
    try:
        yield
    finally:
        for _, layer in layers:
            layer.decoded = None


# nn.Embedding options a compressed lookup cannot honour: max_norm rescales the looked-up rows of the
# weight in place; the other two only change gradients, which a stored format has none of.
UNSUPPORTED_EMBEDDING_OPTIONS = {"max_norm": None, "scale_grad_by_freq": False, "sparse": False}


def check_plain_embedding(module: nn.Module, name: str) -> None:
    """Refuse, naming the layer and the option, an embedding a :class:`CompressedEmbedding` cannot
    replace exactly: a subclass with its own forward (e.g. a scaled word embedding) or one using
    ``max_norm``, ``scale_grad_by_freq`` or ``sparse``."""
    if type(module) is not nn.Embedding:
        raise RecipeError(
            f"embedding {name}: {type(module).__name__} is not a plain nn.Embedding (its forward may do more "
            "than look rows up), so it cannot be compressed; leave it out of the recipe's rules"
        )
    for option, default in UNSUPPORTED_EMBEDDING_OPTIONS.items():
        if getattr(module, option) != default:
            raise RecipeError(
                f"embedding {name}: {option}={getattr(module, option)!r} is not supported by compressed "
                f"embeddings (only {option}={default!r}); set it to {default!r} or leave the layer out of the recipe"
            )


class CompressedEmbedding(FormatModule):
    """``nn.Embedding`` lookup with the ``(num_embeddings, embedding_dim)`` weight stored in ``fmt``:
    only the rows looked up are decoded (:meth:`Format.decode_rows`).

    ``padding_idx`` is kept for reference; it changes only gradients and initialisation in
    ``nn.Embedding``, so the lookup is the same. Rows come out in the module's floating dtype (fp32,
    or what ``.half()`` / ``.to(dtype)`` made it), like an ``nn.Embedding`` cast the same way.
    """

    def __init__(self, fmt: Format, padding_idx: Optional[int] = None):
        super().__init__(fmt)
        self.num_embeddings = fmt.out_features
        self.embedding_dim = fmt.in_features
        self.padding_idx = padding_idx
        # an empty float tensor that casts follow: the dtype the rows are returned in
        self.register_buffer("output_dtype_marker", torch.empty(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"embedding lookup: ids must be an int64 or int32 tensor, got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(
                f"embedding lookup: index out of range: ids lie in [{int(flat.min())}, {int(flat.max())}] but "
                f"the embedding has {self.num_embeddings} rows (0 to {self.num_embeddings - 1})"
            )
        rows = self.fmt.decode_rows(flat, self.output_dtype_marker.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"format={self.fmt.describe()}, bpw={self.fmt.bits_per_weight:.3f}"
        )


class TiedLinear(CompressedLinear):
    """An LM head tied to an input embedding: ``x @ E.T`` with ``E`` the embedding's one stored format.
    It stores nothing of its own (the embedding's tensors are saved and counted once) and follows the
    embedding through ``.to()`` and reloads."""

    def __init__(self, embedding: CompressedEmbedding, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings
        self._source = (embedding,)  # a tuple, so the embedding is not registered (and saved) twice
        self._set_bias(bias)

    @property
    def source(self) -> CompressedEmbedding:
        return self._source[0]

    @property
    def fmt(self) -> Format:  # type: ignore[override]
        return self.source.fmt

    @property
    def format_name(self) -> str:  # type: ignore[override]
        return self.source.format_name

    @property
    def format_config(self) -> dict[str, Any]:  # type: ignore[override]
        return self.source.format_config

    def _apply(self, fn: Callable, recurse: bool = True) -> "TiedLinear":
        return nn.Module._apply(self, fn, recurse)  # the bias only: the format is the embedding's

    def refresh_format(self) -> None:
        pass  # the format is the embedding's, refreshed with it

    @property
    def weight_nbytes(self) -> int:
        return 0  # counted with the embedding
