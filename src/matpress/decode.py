"""Text generation with little per-token overhead, and its speed.

For Llama-family models (``model_type`` ``llama``: SmolLM2, Llama 2/3) a lean decode loop of our own
runs the model's own modules (projections, compressed or not, norms, MLPs, rotary embedding) with a
static key/value cache preallocated once, causal attention in chunks of queries per layer and the LM
head on the last position only: per token it does what the arithmetic needs and little else, where
``transformers``' ``generate`` spends about as long again on masks, cache objects and logits
processors as the matmuls take. When every block's projections have kernel layouts (fp32, RMS norms,
SiLU), one new token runs through all blocks in a single call of the kernels' ``DecodePlan``. Other
causal LMs decode through their own forward with its cache.
Both yield one token at a time, greedy or sampled (temperature, top-k), so the CLI streams text.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from matpress.errors import MatpressError
from matpress.kernels import lowbit
from matpress.nn import CompressedLinear

LEAN_MODEL_TYPES = ("llama",)

Step = Callable[[torch.Tensor], torch.Tensor]  # ids (1, T) after those already seen -> logits (vocab,)


def lean_supported(model: torch.nn.Module) -> bool:
    """Whether the lean loop runs ``model``: a Llama-family causal LM laid out as transformers builds it."""
    inner = getattr(model, "model", None)
    return (
        getattr(getattr(model, "config", None), "model_type", None) in LEAN_MODEL_TYPES
        and all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))
        and hasattr(model, "lm_head")
    )


class Projections:
    """Linear layers that read the same input, applied as one: ``x`` -> their outputs side by side.
    Compressed layers whose kernel layouts stack (same width and block geometry, no bias) run as one
    kernel call over the stacked layout, each output as its own layer computes it; other layers run
    one by one and their outputs are concatenated."""

    def __init__(self, linears: list[torch.nn.Module]):
        self.linears = linears
        stackable = all(isinstance(m, CompressedLinear) and m.bias is None and lowbit.has_kernel_format(m.fmt) for m in linears)
        if not stackable:
            self.layout = None
        elif len(linears) == 1:  # the layer's own layout, kept on its format (as its forward keeps it)
            self.layout = lowbit.layout_of(linears[0].fmt)
        else:
            self.layout = lowbit.stacked_layout([m.fmt for m in linears])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lib = lowbit.library_for(x) if self.layout is not None else None
        if lib is not None:
            return lowbit.layout_matmul(self.layout, x, lib)
        if len(self.linears) == 1:
            return self.linears[0](x)
        return torch.cat([m(x) for m in self.linears], dim=-1)


class LeanLlama:
    """The decode loop of a Llama-family model with a static cache of ``max_tokens`` positions; each
    call takes the next ids ``(1, T)`` and returns the logits after the last of them."""

    def __init__(self, model: torch.nn.Module, max_tokens: int):
        from transformers.models.llama.modeling_llama import rotate_half

        self.rotate_half = rotate_half
        self.model, inner, cfg = model, model.model, model.config
        self.layers = list(inner.layers)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        # per layer: q, k and v as one matmul, gate and up as another
        self.qkv = [Projections([a.q_proj, a.k_proj, a.v_proj]) for a in (layer.self_attn for layer in self.layers)]
        self.gate_up = [Projections([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        # single layers straight to their kernel layout too: the module call and the dispatch cost more
        # than a 576-wide matrix's arithmetic
        self.o = [Projections([layer.self_attn.o_proj]) for layer in self.layers]
        self.down = [Projections([layer.mlp.down_proj]) for layer in self.layers]
        self.head = Projections([model.lm_head])
        dtype = inner.norm.weight.dtype
        shape = (1, self.kv_heads, max_tokens, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.max_tokens, self.length = max_tokens, 0
        self.plan = self._decode_plan()

    def _decode_plan(self) -> Any:
        """Every block's one-token step as one prepared call (:func:`lowbit.decode_plan`), or None unless
        every block can take it: all four projections in kernel layouts, fp32 RMS norms of one epsilon,
        SiLU, fp32 caches."""
        norms = [n for layer in self.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        fits = (
            getattr(self.model.config, "hidden_act", None) == "silu"
            and all(getattr(n, "weight", None) is not None and n.weight.dtype == torch.float32 for n in norms)
            and len({getattr(n, "variance_epsilon", None) for n in norms}) == 1
            and all(p.layout is not None for p in (*self.qkv, *self.o, *self.gate_up, *self.down))
            and self.keys[0].dtype == torch.float32
        )
        if not fits or lowbit.load_library() is None:
            return None
        blocks = [
            lowbit.LlamaBlock(
                (qkv.layout, o.layout, gate_up.layout, down.layout),
                (layer.input_layernorm.weight, layer.post_attention_layernorm.weight), keys[0], values[0],
            )
            for layer, qkv, o, gate_up, down, keys, values in zip(
                self.layers, self.qkv, self.o, self.gate_up, self.down, self.keys, self.values
            )
        ]
        return lowbit.decode_plan(blocks, norms[0].variance_epsilon, self.heads, self.scaling)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        start, end = self.length, self.length + n
        if end > self.max_tokens:
            raise MatpressError(
                f"the decode cache holds {self.max_tokens} tokens and {end} were asked for; "
                "ask for fewer new tokens or a shorter prompt"
            )
        inner = self.model.model
        h = inner.embed_tokens(ids)
        cos, sin = (t.unsqueeze(1) for t in inner.rotary_emb(h, torch.arange(start, end).unsqueeze(0)))
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        if n == 1 and self.plan is not None and h.dtype == torch.float32 and lowbit.library_for(h) is not None:
            # one token: every block in one kernel call
            x = self.plan.step(h.reshape(-1), cos.reshape(-1), sin.reshape(-1), start)
            self.length = end
            return self.head(rms_norm(inner.norm, x.view(1, -1))).squeeze(0)
        layers = zip(self.layers, self.qkv, self.o, self.gate_up, self.down, self.keys, self.values)
        for layer, qkv, o_proj, gate_up, down, keys, values in layers:
            qkv_out = qkv(rms_norm(layer.input_layernorm, h)).view(1, n, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            # q and k rotated together: the same elementwise products as rotating each
            qk = qkv_out[:, : heads + kv_heads]
            qk = qk * cos + self.rotate_half(qk) * sin
            keys[:, :, start:end] = qk[:, heads:]
            values[:, :, start:end] = qkv_out[:, heads + kv_heads :]
            if n == 1:
                o = single_query_attention(qk[0, :heads, 0], keys[0, :, :end], values[0, :, :end], self.scaling)
            else:
                o = causal_attention(qk[:, :heads], keys, values, start, self.scaling).transpose(1, 2)
            h = h + o_proj(o.reshape(1, n, heads * head_dim))
            gate, up = gate_up(rms_norm(layer.post_attention_layernorm, h)).chunk(2, dim=-1)
            h = h + down(layer.mlp.act_fn(gate) * up)
        self.length = end
        return self.head(rms_norm(inner.norm, h[:, -1])).squeeze(0)


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` of a Llama RMS norm as one fused op where that is the same arithmetic (fp32: the
    module computes in fp32 and casts back), else through the module."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


# Queries per scaled_dot_product_attention call in a prefill (see causal_attention).
ATTENTION_CHUNK = 128


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of the ``n`` new positions ``start .. start + n - 1``, ``q`` ``(1, heads, n, d)``,
    over the cache ``keys`` / ``values`` ``(1, kv_heads, positions, d)`` (grouped-query where there are
    fewer key/value heads). Queries go in chunks of ``ATTENTION_CHUNK``, each over the keys up to its own
    last position: SDPA's CPU kernel computes a masked product whole, so one call for 512 new tokens
    spends most of its time on the masked half (SmolLM2, 2 threads, on a Zen 5: 4.2 ms a layer in one
    call, 3.1 ms in chunks of 128). Returns ``(1, heads, n, d)``."""
    n, gqa = q.shape[2], q.shape[1] != keys.shape[1]
    outs = []
    for first in range(0, n, ATTENTION_CHUNK):
        last = min(first + ATTENTION_CHUNK, n)  # queries first .. last - 1 of the new ones
        reach = start + last  # the keys they may see
        mask = torch.arange(reach).unsqueeze(0) <= torch.arange(start + first, reach).unsqueeze(1)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, first:last], keys[:, :, :reach], values[:, :, :reach], attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token: ``q`` ``(heads, d)`` over ``keys`` / ``values`` ``(kv_heads, T, d)``,
    each group of ``heads / kv_heads`` query heads sharing one key/value head (as SDPA's GQA maps them).
    Two batched matmuls and a softmax: scaled_dot_product_attention's set-up costs more than this
    arithmetic at decode. Returns ``(heads, d)``."""
    kv_heads = keys.shape[0]
    grouped = q.reshape(kv_heads, -1, q.shape[-1]) * scale
    weights = torch.bmm(grouped, keys.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(weights, values).reshape(q.shape)


class ModelStep:
    """Any causal LM's own forward with its own cache (for models the lean loop does not know)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache = model, None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[0, -1]


def decoder(model: torch.nn.Module, max_tokens: int) -> Step:
    """The fastest step function that runs ``model``: the lean loop, else the model's own forward."""
    return LeanLlama(model, max_tokens) if lean_supported(model) else ModelStep(model)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0), else sampled from the softmax of
    ``logits / temperature`` over the ``top_k`` most likely tokens (all when None), seeded."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MatpressError(f"temperature {self.temperature} is negative; use 0 for greedy decoding or a positive value")
        if self.top_k is not None and self.top_k < 1:
            raise MatpressError(f"top-k {self.top_k} keeps no token; use a positive count")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.numel():
        kth = scaled.topk(sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop: Optional[int] = None,
) -> Iterator[int]:
    """The new tokens after ``prompt_ids``, one at a time, until ``max_new_tokens`` or ``stop``."""
    if not prompt_ids:
        raise MatpressError("the prompt has no tokens; give a prompt that encodes to at least one token")
    step = decoder(model, len(prompt_ids) + max_new_tokens)
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = choose(step(ids), sampling, generator)
            yield token
            if token == stop:
                return
            ids = torch.tensor([[token]])


@dataclass(frozen=True)
class Speed:
    """Tokens per second of prefilling a prompt and of decoding after it (medians over repeats), and
    the process's peak resident memory."""

    path: str
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_rss_mb: float


def measure_speed(model: torch.nn.Module, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3) -> Speed:
    """Prefill ``prompt_tokens`` random token ids, then decode ``new_tokens`` greedily, ``repeats``
    times (after one untimed warm-up); what the generation path of ``model`` reaches."""
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            step = decoder(model, prompt_tokens + new_tokens)
            start = time.perf_counter()
            token = step(prompt).argmax().view(1, 1)
            middle = time.perf_counter()
            for _ in range(new_tokens):
                token = step(token).argmax().view(1, 1)
            end = time.perf_counter()
            prefill.append(prompt_tokens / (middle - start))
            decode.append(new_tokens / (end - middle))
    return Speed(
        path="lean Llama loop, static cache" if lean_supported(model) else "the model's forward with its cache",
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        prefill_tokens_per_s=statistics.median(prefill[1:]),
        decode_tokens_per_s=statistics.median(decode[1:]),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
