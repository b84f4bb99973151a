"""Quality metrics: sentence-embedding fidelity for encoders, perplexity and KL for causal LMs."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError


def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_length: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled (padding masked out), L2-normalised last hidden states, as sentence-transformers
    computes them for all-MiniLM-L6-v2. Returns ``(n, hidden)`` fp32 on CPU."""
    device = next(model.parameters(), torch.empty(0)).device
    out = []
    for batch in tqdm(list(_batches(sentences, batch_size)), desc="embedding", unit="batch", disable=not progress):
        enc = tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(out)


def embedding_fidelity(reference: torch.Tensor, candidate: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Cosine similarity between matching rows, and top-``k`` retrieval agreement: for each sentence as
    a query against all others, the share of the reference's ``k`` nearest neighbours that the
    candidate's embeddings also rank in their top ``k``."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    n = reference.shape[0]
    if n <= k:
        raise ValueError(f"retrieval agreement at k={k} needs more than {k} sentences, got {n}")
    ref = F.normalize(reference.float(), dim=-1)
    cand = F.normalize(candidate.float(), dim=-1)
    cosine = (ref * cand).sum(-1)
    eye = torch.eye(n, dtype=torch.bool)
    top_ref = (ref @ ref.T).masked_fill(eye, -2).topk(k, dim=-1).indices
    top_cand = (cand @ cand.T).masked_fill(eye, -2).topk(k, dim=-1).indices
    hits = (top_ref.unsqueeze(-1) == top_cand.unsqueeze(-2)).any(-1).float().sum(-1)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        f"top{k}_agreement": float(hits.mean() / k),
        "n_sentences": n,
    }


def token_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` token ids from ``text``, ``(n_windows, seq_len)``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(len(ids) // seq_len, max_windows)
    if n == 0:
        raise CalibrationError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def reference_log_probs(reference: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """``reference``'s next-token log-probabilities on ``windows``, one tensor per batch of
    ``batch_size``: what :func:`language_model_quality` compares with, computed once for many models."""
    device = next(reference.parameters(), torch.empty(0)).device
    return [F.log_softmax(reference(b.to(device)).logits[:, :-1].float(), dim=-1) for b in _batches(windows, batch_size)]


@torch.inference_mode()
def language_model_quality(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | list[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexity of ``model`` on the windows' next tokens; with ``reference`` (a model, or its
    :func:`reference_log_probs` on these windows and batch size), also the reference's perplexity and
    the mean per-token KL(reference || model) of the next-token distributions."""
    device = next(model.parameters(), torch.empty(0)).device
    batches = list(_batches(windows, batch_size))
    if isinstance(reference, list) and len(reference) != len(batches):
        raise ValueError(f"{len(reference)} batches of reference log-probabilities for {len(batches)} batches of windows")
    nll_sum, kl_sum, ref_nll_sum, count = 0.0, 0.0, 0.0, 0
    for i, batch in enumerate(tqdm(batches, desc="scoring", unit="batch", disable=not progress)):
        batch = batch.to(device)
        targets = batch[:, 1:]
        logp = F.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
        nll_sum += float(-logp.gather(-1, targets.unsqueeze(-1)).sum())
        count += targets.numel()
        if reference is not None:
            ref_logp = reference[i].to(device) if isinstance(reference, list) else F.log_softmax(reference(batch).logits[:, :-1].float(), dim=-1)
            ref_nll_sum += float(-ref_logp.gather(-1, targets.unsqueeze(-1)).sum())
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
    result = {"perplexity": math.exp(nll_sum / count), "n_tokens": count}
    if reference is not None:
        result["reference_perplexity"] = math.exp(ref_nll_sum / count)
        result["kl_mean"] = kl_sum / count
    return result
