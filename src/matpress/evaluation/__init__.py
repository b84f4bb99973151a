"""Evaluation: what a compression cost in quality, on real installed text or a user's file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from matpress.errors import MatpressError
from matpress.evaluation.metrics import (
    embedding_fidelity, language_model_quality, reference_log_probs, sentence_embeddings, token_windows,
)
from matpress.evaluation.text import CALIBRATION, EVALUATION, corpus, sentences
from matpress.nn.layout import CAUSAL_LM, ENCODER, model_kind


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    reference: Optional[nn.Module] = None,
    text_file: Union[str, Path, None] = None,
    kind: Optional[str] = None,
    n_sentences: int = 600,
    seq_len: int = 256,
    max_windows: int = 32,
    progress: bool = True,
) -> dict[str, float]:
    """Measure ``model`` against the uncompressed ``reference`` on held-out text.

    Encoders: mean/min cosine between compressed and original sentence embeddings and top-10 retrieval
    agreement on ``n_sentences`` sentences (a reference is required). Causal LMs: perplexity on
    ``max_windows`` windows of ``seq_len`` tokens, and with a reference its perplexity and the mean
    KL divergence of next-token distributions. Text: ``text_file``, else the evaluation split of
    ``pydoc_data.topics`` (never used for calibration).
    """
    score = evaluator(reference, tokenizer, kind or model_kind(model), text_file, n_sentences, seq_len, max_windows, progress)
    return score(model)


def evaluator(
    reference: Optional[nn.Module],
    tokenizer: Any,
    kind: Optional[str] = None,
    text_file: Union[str, Path, None] = None,
    n_sentences: int = 600,
    seq_len: int = 256,
    max_windows: int = 32,
    progress: bool = True,
) -> Callable[[nn.Module], dict[str, float]]:
    """:func:`evaluate` as a function of the model, for scoring many compressed copies of one
    ``reference``: its sentence embeddings are computed once, here (``kind`` defaults to the reference's)."""
    if tokenizer is None:
        raise MatpressError("evaluation needs the model's tokenizer; none was found beside the model")
    kind = kind or model_kind(reference)
    if kind == ENCODER:
        if reference is None:
            raise MatpressError("encoder evaluation compares embeddings with the original: pass reference=")
        texts = sentences(n_sentences, EVALUATION, text_file)
        ref = sentence_embeddings(reference, tokenizer, texts, progress=progress)
        return lambda model: embedding_fidelity(ref, sentence_embeddings(model, tokenizer, texts, progress=progress))
    if kind == CAUSAL_LM:
        windows = token_windows(tokenizer, corpus(EVALUATION, text_file), seq_len, max_windows)
        return lambda model: language_model_quality(model, windows, reference, progress=progress)
    raise MatpressError(f"unknown model kind {kind!r}; expected {ENCODER!r} or {CAUSAL_LM!r}")


def distortion_measure(
    reference: nn.Module,
    tokenizer: Any,
    kind: Optional[str] = None,
    n_sentences: int = 128,
    seq_len: int = 128,
    n_windows: int = 8,
    text_file: Union[str, Path, None] = None,
) -> Callable[[nn.Module], float]:
    """A function measuring how far a model's output drifts from ``reference``'s on *calibration* text:
    1 - mean embedding cosine for encoders, mean next-token KL for causal LMs. The reference's outputs
    are computed once, here."""
    kind = kind or model_kind(reference)
    if kind == ENCODER:
        texts = sentences(n_sentences, CALIBRATION, text_file)
        ref = sentence_embeddings(reference, tokenizer, texts)
        return lambda model: 1.0 - float((ref * sentence_embeddings(model, tokenizer, texts)).sum(-1).mean())
    windows = token_windows(tokenizer, corpus(CALIBRATION, text_file), seq_len, n_windows)
    with torch.inference_mode():
        ref_logp = F.log_softmax(reference(windows).logits.float(), dim=-1)

    def kl(model: nn.Module) -> float:
        with torch.inference_mode():
            logp = F.log_softmax(model(windows).logits.float(), dim=-1)
        return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())

    return kl


__all__ = [
    "distortion_measure", "embedding_fidelity", "evaluate", "evaluator", "language_model_quality", "reference_log_probs",
    "sentence_embeddings",
    "token_windows",
]
