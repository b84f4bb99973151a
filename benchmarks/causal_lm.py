"""A small causal language model for benchmarks: a 4-layer Llama, briefly trained on this machine.

No model is downloaded: a byte-level BPE tokenizer (``tokenizers``) and a Llama built from a
``LlamaConfig`` (hidden 256, 4 layers, 4 heads, intermediate 768, so every linear dimension is a
multiple of 128) are trained for a few minutes on the *calibration* split of the built-in corpus
(``pydoc_data.topics``); quality is always measured on the held-out evaluation split. The result is
saved with ``save_pretrained`` and reloaded with ``from_pretrained`` on later calls. It is a briefly
trained model: its perplexity is far from a real LM's, but its weights and activations carry learned
structure (outlier channels, correlated inputs) that random weights lack.

    flock /tmp/matpress-heavy.lock python benchmarks/causal_lm.py   # train (or just load) and score it
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Union

import torch

VOCAB = 2048
SEQ_LEN = 128
BATCH = 16
STEPS = 400
DESCRIPTION = (
    f"a 4-layer Llama (hidden 256, intermediate 768, vocab {VOCAB}) briefly trained ({STEPS} steps of "
    f"{BATCH}x{SEQ_LEN} tokens) on the calibration split of pydoc_data.topics"
)


def train_tokenizer(text: str) -> Any:
    """Byte-level BPE trained on ``text``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(tokenizer: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = STEPS) -> list[float]:
    """Next-token training on random windows of ``ids``; returns the loss of each step."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def load_or_train(cache_dir: Union[str, Path] = "out/causal-lm") -> tuple[torch.nn.Module, Any]:
    """The benchmark causal LM and its tokenizer: loaded from ``cache_dir`` if saved there, else trained
    (a few minutes on 2 cores; run under ``flock /tmp/matpress-heavy.lock``) and saved there."""
    from transformers import LlamaForCausalLM

    from matpress.evaluation.text import CALIBRATION, corpus
    from matpress.models import from_pretrained, load_tokenizer_from

    cache_dir = Path(cache_dir)
    if not (cache_dir / "config.json").is_file():
        text = corpus(CALIBRATION)
        tokenizer = train_tokenizer(text)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        model = build_model(tokenizer)
        start = time.perf_counter()
        losses = train(model, ids)
        print(f"trained in {time.perf_counter() - start:.0f} s on {len(ids)} tokens; final loss {losses[-1]:.3f}")
        cache_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache_dir)
        tokenizer.save_pretrained(cache_dir)
    # through matpress's loader: out/ is a directory anyone could have written into
    return from_pretrained(LlamaForCausalLM, cache_dir, dtype="float32").eval(), load_tokenizer_from(cache_dir)


if __name__ == "__main__":
    from matpress.evaluation import evaluate

    lm, tok = load_or_train()
    print(DESCRIPTION)
    print(evaluate(lm, tok, progress=False))
