"""Text generation with little per-token overhead, and its speed.

For Llama-family models (``model_type`` ``llama``: SmolLM2, Llama 2/3) a lean decode loop of our own
runs the model's own modules (projections, compressed or not, norms, MLPs, rotary embedding) with a
static key/value cache preallocated once, one scaled-dot-product attention call per layer and the LM
head on the last position only: per token it does what the arithmetic needs and little else, where
``transformers``' ``generate`` spends about as long again on masks, cache objects and logits
processors as the matmuls take. Other causal LMs decode through their own forward with its cache.
Both yield one token at a time, greedy or sampled (temperature, top-k), so the CLI streams text.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

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
        stackable = all(type(m) is CompressedLinear and m.bias is None for m in linears)
        self.layout = lowbit.stacked_layout([m.fmt for m in linears]) if stackable else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout is not None and lowbit.takes(x):
            return lowbit.layout_matmul(self.layout, x)
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
        dtype = inner.norm.weight.dtype
        shape = (1, self.kv_heads, max_tokens, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in self.layers]
        self.max_tokens, self.length = max_tokens, 0

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
        # a causal mask only where several new tokens attend to each other (prefill)
        mask = torch.arange(end).unsqueeze(0) <= torch.arange(start, end).unsqueeze(1) if n > 1 else None
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        for layer, qkv, gate_up, keys, values in zip(self.layers, self.qkv, self.gate_up, self.keys, self.values):
            qkv_out = qkv(layer.input_layernorm(h)).view(1, n, heads + 2 * kv_heads, head_dim).transpose(1, 2)
            # q and k rotated together: the same elementwise products as rotating each
            qk = qkv_out[:, : heads + kv_heads]
            qk = qk * cos + self.rotate_half(qk) * sin
            keys[:, :, start:end] = qk[:, heads:]
            values[:, :, start:end] = qkv_out[:, heads + kv_heads :]
            o = torch.nn.functional.scaled_dot_product_attention(
                qk[:, :heads], keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=self.scaling,
                enable_gqa=heads != kv_heads,
            )
            h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, n, heads * head_dim))
            mlp = layer.mlp
            gate, up = gate_up(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        self.length = end
        return self.model.lm_head(inner.norm(h[:, -1])).squeeze(0)


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
