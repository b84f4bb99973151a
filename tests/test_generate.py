"""``matpress generate``: a compressed causal LM answers a prompt formatted with its chat template."""

from __future__ import annotations

import copy

import pytest
import torch

import matpress
from matpress.cli import main

from conftest import tiny_bert, tiny_llama

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
RTN = {"default": {"method": "rtn", "bits": 8, "group_size": 32}}


def greedy(model, ids: list[int], steps: int) -> list[int]:
    """``steps`` argmax tokens after ``ids``, one full forward each."""
    ids = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-steps:]


@pytest.fixture(scope="module")
def chat_checkpoint(minilm, tmp_path_factory):
    tokenizer = copy.deepcopy(minilm.tokenizer)
    tokenizer.chat_template = TEMPLATE
    model = tiny_llama(vocab=tokenizer.vocab_size)
    matpress.compress(model, RTN, progress=False)
    return matpress.save(model, tmp_path_factory.mktemp("chat") / "ckpt", tokenizer=tokenizer), tokenizer


@pytest.mark.parametrize("chat_template", [True, False])
def test_generate_greedy_decodes_the_prompt_through_the_chat_template(chat_checkpoint, capsys, chat_template):
    directory, tokenizer = chat_checkpoint
    prompt = "what is a list"
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if chat_template else tokenizer(prompt)["input_ids"]
    expected = tokenizer.decode(greedy(matpress.load(directory), ids, 6), skip_special_tokens=True).strip()
    flags = [] if chat_template else ["--no-chat-template"]
    assert main(["generate", str(directory), "--prompt", prompt, "--max-new-tokens", "6", *flags]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_generate_refuses_an_encoder_in_one_line(minilm, tmp_path, capsys):
    model = tiny_bert(vocab=minilm.tokenizer.vocab_size)
    matpress.compress(model, RTN, progress=False)
    directory = matpress.save(model, tmp_path / "ckpt", tokenizer=minilm.tokenizer)
    capsys.readouterr()  # compress's warning about the dense embedding
    assert main(["generate", str(directory), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BertModel, which does not write text" in err
